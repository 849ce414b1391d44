#!/usr/bin/env bash
# Throwaway TLS material for the local stack, made once and reused:
#   ca.pem / ca.key             the stack's CA
#   server.pem / server.key     server certificate (SAN DNS:localhost, IP:127.0.0.1), PKCS#8 key
#   server-keystore.pem         key + certificate chain, the PEM keystore Kafka reads
#   wrong-ca.pem / wrong-ca.key an unrelated CA, for tests that verification fails
#   mtls-keystore.pem           key + chain of the mutual-TLS listener (SAN DNS:localhost only)
#   client.pem / client.key     a client certificate signed by the CA, PKCS#8 key without a password
#   client-encrypted.key        the same key encrypted (password in .stack/secrets/client-key.password)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DAYS=825
dir="$CERT_DIR"
mkdir -p "$dir"
log="$dir/openssl.log"

valid() {
    local f
    for f in ca.pem ca.key server.pem server.key server-keystore.pem wrong-ca.pem; do
        [[ -s "$dir/$f" ]] || return 1
    done
    openssl verify -CAfile "$dir/ca.pem" "$dir/server.pem" >/dev/null 2>&1 || return 1
    # Renew a week before expiry rather than fail in the middle of a test run.
    openssl x509 -checkend 604800 -noout -in "$dir/server.pem" >/dev/null 2>&1 || return 1
    openssl x509 -checkend 604800 -noout -in "$dir/wrong-ca.pem" >/dev/null 2>&1
}

# The client certificate and the mutual-TLS listener's keystore, signed by the current CA; made
# again when missing or when the CA changed.
client_valid() {
    local f
    for f in client.pem client.key client-encrypted.key mtls.pem mtls-keystore.pem; do
        [[ -s "$dir/$f" ]] || return 1
    done
    [[ -s "$SECRETS_DIR/client-key.password" ]] || return 1
    openssl verify -CAfile "$dir/ca.pem" "$dir/client.pem" "$dir/mtls.pem" >/dev/null 2>&1 || return 1
    openssl x509 -checkend 604800 -noout -in "$dir/client.pem" >/dev/null 2>&1
}

make_client() {
    local t password
    password="$(new_secret "$SECRETS_DIR/client-key.password")"
    t="$(mktemp -d "$dir/.client.XXXXXX")"
    printf '%s' "$password" >"$t/password"
    cat >"$t/client.ext" <<'EOF2'
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid
EOF2
    cat >"$t/mtls.ext" <<'EOF2'
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid
EOF2
    {
        openssl req -new -newkey rsa:2048 -nodes -sha256 -keyout "$t/client.rsa.key" \
            -out "$t/client.csr" -subj "/O=metric-etl local stack/CN=metric-etl client" &&
            openssl x509 -req -in "$t/client.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
                -CAcreateserial -days "$DAYS" -sha256 -extfile "$t/client.ext" -out "$t/client.pem" &&
            openssl pkcs8 -topk8 -nocrypt -in "$t/client.rsa.key" -out "$t/client.key" &&
            openssl pkcs8 -topk8 -v2 aes-256-cbc -in "$t/client.rsa.key" -passout "file:$t/password" \
                -out "$t/client-encrypted.key" &&
            openssl req -new -newkey rsa:2048 -nodes -sha256 -keyout "$t/mtls.rsa.key" \
                -out "$t/mtls.csr" -subj "/O=metric-etl local stack/CN=localhost" &&
            openssl x509 -req -in "$t/mtls.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
                -CAcreateserial -days "$DAYS" -sha256 -extfile "$t/mtls.ext" -out "$t/mtls.pem" &&
            openssl pkcs8 -topk8 -nocrypt -in "$t/mtls.rsa.key" -out "$t/mtls.key"
    } >>"$log" 2>&1 || { rm -rf "$t"; die "openssl: could not make the client certificate" "$log"; }
    cat "$t/mtls.key" "$t/mtls.pem" "$dir/ca.pem" >"$t/mtls-keystore.pem"
    for f in client.key client-encrypted.key mtls-keystore.pem; do
        chmod 600 "$t/$f"
        mv -f "$t/$f" "$dir/$f"
    done
    for f in client.pem mtls.pem; do
        chmod 644 "$t/$f"
        mv -f "$t/$f" "$dir/$f"
    done
    rm -rf "$t"
    note "made a client certificate and the mutual-TLS listener's certificate in $dir"
}

if valid; then
    client_valid || make_client
    exit 0
fi

make_ca() { # make_ca NAME SUBJECT
    openssl req -x509 -new -newkey rsa:2048 -nodes -sha256 -days "$DAYS" \
        -keyout "$tmp/$1.key" -out "$tmp/$1.pem" -subj "$2" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -addext "subjectKeyIdentifier=hash" >>"$log" 2>&1 || die "openssl: could not make $1" "$log"
}

tmp="$(mktemp -d "$dir/.new.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
: >"$log"
umask 077

make_ca ca "/O=metric-etl local stack/CN=metric-etl local CA"
make_ca wrong-ca "/O=metric-etl unrelated/CN=metric-etl unrelated CA"

cat >"$tmp/server.ext" <<'EOF'
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid
EOF
{
    openssl req -new -newkey rsa:2048 -nodes -sha256 -keyout "$tmp/server.rsa.key" \
        -out "$tmp/server.csr" -subj "/O=metric-etl local stack/CN=localhost" &&
        openssl x509 -req -in "$tmp/server.csr" -CA "$tmp/ca.pem" -CAkey "$tmp/ca.key" \
            -CAcreateserial -days "$DAYS" -sha256 -extfile "$tmp/server.ext" -out "$tmp/server.pem" &&
        openssl pkcs8 -topk8 -nocrypt -in "$tmp/server.rsa.key" -out "$tmp/server.key"
} >>"$log" 2>&1 || die "openssl: could not make the server certificate" "$log"
cat "$tmp/server.key" "$tmp/server.pem" "$tmp/ca.pem" >"$tmp/server-keystore.pem"
openssl verify -CAfile "$tmp/ca.pem" "$tmp/server.pem" >>"$log" 2>&1 ||
    die "openssl: the new server certificate does not verify" "$log"

for f in ca.key wrong-ca.key server.key server-keystore.pem; do
    chmod 600 "$tmp/$f"
    mv -f "$tmp/$f" "$dir/$f"
done
for f in ca.pem wrong-ca.pem server.pem; do
    chmod 644 "$tmp/$f"
    mv -f "$tmp/$f" "$dir/$f"
done
chmod 755 "$dir"
note "made a throwaway CA and server certificate in $dir"
make_client

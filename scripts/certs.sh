#!/usr/bin/env bash
# Throwaway TLS material for the local stack, made once and reused:
#   ca.pem / ca.key             the stack's CA
#   server.pem / server.key     server certificate (SAN DNS:localhost, IP:127.0.0.1), PKCS#8 key
#   server-keystore.pem         key + certificate chain, the PEM keystore Kafka reads
#   wrong-ca.pem / wrong-ca.key an unrelated CA, for tests that verification fails
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

valid && exit 0

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

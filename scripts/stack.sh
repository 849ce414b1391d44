#!/usr/bin/env bash
# The local stack: one Apache Kafka broker and one PostgreSQL, on 127.0.0.1, under .stack/.
#
#   scripts/stack.sh up      install what is missing, make certificates, start both, write .stack/env
#   scripts/stack.sh down    stop both; no process is left behind (data stays)
#   scripts/stack.sh status  what is running; exit 0 when both are up
#   scripts/stack.sh env     print the env file (eval "$(scripts/stack.sh env)", or: . .stack/env)
#   scripts/stack.sh clean   down, then delete .stack/ (the cached Kafka jars stay)
#
# Ports: Kafka 9092 (PLAINTEXT), 9093 (controller), 9094 (SSL), 9095 (SASL_SSL), 9096 (SASL_PLAINTEXT),
# 9097 (SSL requiring a client certificate; its certificate names localhost only);
# PostgreSQL 55432. METRIC_ETL_STACK_KAFKA_PORT (the first of six) and METRIC_ETL_STACK_PG_PORT move them;
# `up` remembers them in .stack/ports.
# METRIC_ETL_STACK_PG_URL: an admin URL of an existing PostgreSQL to use instead of a throwaway cluster.
#
# `up` is idempotent: on a running stack it only re-checks and re-prints.
set -euo pipefail
SCRIPTS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$SCRIPTS/lib.sh"

lock() {
    mkdir -p "$STACK_DIR"
    exec 9>"$STACK_DIR/.lock"
    flock -w 120 9 || die "another scripts/stack.sh is still running (lock $STACK_DIR/.lock)"
}

# env_line NAME VALUE: `export NAME=VALUE`, readable by bash, sh and make (values are plain words).
env_line() {
    local value="$2"
    if [[ ! "$value" =~ ^[A-Za-z0-9_./:@,=+%-]*$ ]]; then
        # Shells still read it; make would keep the quotes.
        value="$(printf '%q' "$value")"
    fi
    printf 'export %s=%s\n' "$1" "$value"
}

write_env() {
    local pg_host pg_port pg_admin_url pg_tls
    pg_host="$(sed -n 's/^PG_HOST=//p' "$STACK_DIR/pg.env")"
    pg_port="$(sed -n 's/^PG_PORT=//p' "$STACK_DIR/pg.env")"
    pg_admin_url="$(sed -n 's/^PG_ADMIN_URL=//p' "$STACK_DIR/pg.env")"
    pg_tls="$(sed -n 's/^PG_TLS=//p' "$STACK_DIR/pg.env")"
    local tmp="$ENV_FILE.tmp"
    (
        umask 077
        {
            echo "# The metric-etl local stack (written by scripts/stack.sh up). Source it: . .stack/env"
            env_line STACK_DIR "$STACK_DIR"
            env_line METRIC_ETL_BOOTSTRAP_SERVERS "$STACK_HOST:$KAFKA_PORT_PLAINTEXT"
            env_line METRIC_ETL_DB_URL "postgresql://etl@$pg_host:$pg_port/metrics"
            env_line METRIC_ETL_DB_PASSWORD "$(cat "$SECRETS_DIR/pg-etl.password")"
            env_line STACK_CA_FILE "$CERT_DIR/ca.pem"
            env_line STACK_WRONG_CA_FILE "$CERT_DIR/wrong-ca.pem"
            env_line STACK_KAFKA_PLAINTEXT "$STACK_HOST:$KAFKA_PORT_PLAINTEXT"
            env_line STACK_KAFKA_SSL "$STACK_HOST:$KAFKA_PORT_SSL"
            env_line STACK_KAFKA_SASL_SSL "$STACK_HOST:$KAFKA_PORT_SASL_SSL"
            env_line STACK_KAFKA_SASL_PLAINTEXT "$STACK_HOST:$KAFKA_PORT_SASL_PLAINTEXT"
            env_line STACK_KAFKA_MTLS "localhost:$KAFKA_PORT_MTLS"
            env_line STACK_CLIENT_CERT "$CERT_DIR/client.pem"
            env_line STACK_CLIENT_KEY "$CERT_DIR/client.key"
            env_line STACK_CLIENT_KEY_ENCRYPTED "$CERT_DIR/client-encrypted.key"
            env_line STACK_CLIENT_KEY_PASSWORD "$(cat "$SECRETS_DIR/client-key.password")"
            env_line STACK_SASL_USER etl
            env_line STACK_SASL_PASSWORD "$(cat "$SECRETS_DIR/kafka-etl.password")"
            env_line STACK_SASL_MECHANISMS SCRAM-SHA-512,SCRAM-SHA-256,PLAIN
            env_line STACK_KAFKA_PID_FILE "$STACK_DIR/kafka/kafka.pid"
            env_line STACK_PG_HOST "$pg_host"
            env_line STACK_PG_PORT "$pg_port"
            env_line STACK_PG_DATABASE metrics
            env_line STACK_PG_USER etl
            env_line STACK_PG_ADMIN_URL "$pg_admin_url"
            env_line STACK_PG_TLS "$pg_tls"
        } >"$tmp"
    )
    mv -f "$tmp" "$ENV_FILE"
}

summary() {
    local pg_host pg_port tls_note=""
    pg_host="$(sed -n 's/^PG_HOST=//p' "$STACK_DIR/pg.env")"
    pg_port="$(sed -n 's/^PG_PORT=//p' "$STACK_DIR/pg.env")"
    grep -q '^PG_TLS=1' "$STACK_DIR/pg.env" && tls_note="  (TLS: sslmode=verify-full with the CA)"
    cat <<EOF
Local stack is up:
  Kafka PLAINTEXT       $STACK_HOST:$KAFKA_PORT_PLAINTEXT
  Kafka SSL             $STACK_HOST:$KAFKA_PORT_SSL
  Kafka SASL_SSL        $STACK_HOST:$KAFKA_PORT_SASL_SSL  (SCRAM-SHA-512, SCRAM-SHA-256, PLAIN; user etl)
  Kafka SASL_PLAINTEXT  $STACK_HOST:$KAFKA_PORT_SASL_PLAINTEXT  (same mechanisms)
  Kafka SSL, mutual     localhost:$KAFKA_PORT_MTLS  (client certificate required: $CERT_DIR/client.pem)
  PostgreSQL            postgresql://etl@$pg_host:$pg_port/metrics$tls_note
  CA file               $CERT_DIR/ca.pem
  Env file              $ENV_FILE  (passwords are in it: . $ENV_FILE)
EOF
}

cmd_up() {
    lock
    printf 'METRIC_ETL_STACK_KAFKA_PORT=%s\nMETRIC_ETL_STACK_PG_PORT=%s\n' "$KAFKA_PORT_PLAINTEXT" "$PG_PORT" \
        >"$PORTS_FILE"
    # 9>&-: the servers must not inherit the lock, or they would hold it for their lifetime.
    "$SCRIPTS/deps.sh" 9>&-
    "$SCRIPTS/certs.sh" 9>&-
    "$SCRIPTS/kafka.sh" up 9>&-
    "$SCRIPTS/pg.sh" up 9>&-
    write_env
    summary
}

cmd_down() {
    lock
    local rc=0
    "$SCRIPTS/kafka.sh" down 9>&- || rc=1
    "$SCRIPTS/pg.sh" down 9>&- || rc=1
    return "$rc"
}

cmd_status() {
    local rc=0
    "$SCRIPTS/kafka.sh" status || rc=3
    "$SCRIPTS/pg.sh" status || rc=3
    if [[ -f "$ENV_FILE" ]]; then
        echo "Env file: $ENV_FILE"
    else
        echo "Env file: none yet (scripts/stack.sh up)"
    fi
    return "$rc"
}

cmd_env() {
    [[ -f "$ENV_FILE" ]] || die "no env file yet: run scripts/stack.sh up (or make stack-up)"
    cat "$ENV_FILE"
}

cmd_clean() {
    cmd_down
    rm -rf "$STACK_DIR"
    echo "removed $STACK_DIR"
}

case "${1:-}" in
up) cmd_up ;;
down) cmd_down ;;
status) cmd_status ;;
env) cmd_env ;;
clean) cmd_clean ;;
*)
    echo "usage: $0 up|down|status|env|clean" >&2
    exit 2
    ;;
esac

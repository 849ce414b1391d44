# Shared helpers for the local stack scripts. Source it; do not run it.
# shellcheck shell=bash

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STACK_DIR="${METRIC_ETL_STACK_DIR:-$REPO_ROOT/.stack}"
CACHE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/metric-etl"

STACK_HOST=127.0.0.1
# Ports can be moved (a second checkout, a port already taken): Kafka uses six in a row from the first.
# `up` remembers them in .stack/ports, so a later `down` or `status` finds the same stack without them.
PORTS_FILE="$STACK_DIR/ports"
if [[ -f "$PORTS_FILE" ]]; then
    while IFS='=' read -r name value; do
        case "$name" in
        METRIC_ETL_STACK_KAFKA_PORT | METRIC_ETL_STACK_PG_PORT)
            [[ -n "${!name:-}" ]] || printf -v "$name" '%s' "$value"
            ;;
        esac
    done <"$PORTS_FILE"
fi
KAFKA_PORT_PLAINTEXT="${METRIC_ETL_STACK_KAFKA_PORT:-9092}"
KAFKA_PORT_CONTROLLER=$((KAFKA_PORT_PLAINTEXT + 1))
KAFKA_PORT_SSL=$((KAFKA_PORT_PLAINTEXT + 2))
KAFKA_PORT_SASL_SSL=$((KAFKA_PORT_PLAINTEXT + 3))
KAFKA_PORT_SASL_PLAINTEXT=$((KAFKA_PORT_PLAINTEXT + 4))
# SSL that requires a client certificate (mutual TLS), as hosted Kafka services do.
KAFKA_PORT_MTLS=$((KAFKA_PORT_PLAINTEXT + 5))
PG_PORT="${METRIC_ETL_STACK_PG_PORT:-55432}"

CERT_DIR="$STACK_DIR/certs"
SECRETS_DIR="$STACK_DIR/secrets"
ENV_FILE="$STACK_DIR/env"

note() { printf '%s\n' "$*" >&2; }

# die MESSAGE [LOGFILE]: print the message, the last lines of the log if given, and exit 1.
die() {
    printf 'error: %s\n' "$1" >&2
    if [[ -n "${2:-}" && -f "$2" ]]; then
        printf -- '--- last lines of %s ---\n' "$2" >&2
        tail -n 40 "$2" >&2
        printf -- '---\n' >&2
    fi
    exit 1
}

port_open() {
    (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

# A process is ours when it is alive and its command line contains the marker.
pid_alive() {
    local pid="$1" marker="${2:-}"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    [[ -z "$marker" ]] && return 0
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$marker"
}

# wait_gone PID SECONDS: wait for a process to exit; 1 if it is still there.
wait_gone() {
    local pid="$1" deadline=$((SECONDS + $2))
    while kill -0 "$pid" 2>/dev/null; do
        ((SECONDS >= deadline)) && return 1
        sleep 0.2
    done
    return 0
}

# stop_pid PID NAME: SIGTERM, wait up to 30 s, then SIGKILL.
stop_pid() {
    local pid="$1" name="$2"
    kill -TERM "$pid" 2>/dev/null || return 0
    if ! wait_gone "$pid" 30; then
        note "$name (pid $pid) did not stop after 30 s; killing it"
        kill -KILL "$pid" 2>/dev/null || true
        wait_gone "$pid" 10 || die "$name (pid $pid) survived SIGKILL"
    fi
}

# new_secret FILE: a random hex password, created once (mode 600) and reused.
new_secret() {
    local file="$1"
    if [[ ! -s "$file" ]]; then
        mkdir -p "$(dirname "$file")"
        chmod 700 "$(dirname "$file")"
        (umask 077 && openssl rand -hex 16 >"$file.tmp" && mv "$file.tmp" "$file")
    fi
    chmod 600 "$file"
    cat "$file"
}

is_root() { [[ "$(id -u)" == 0 ]]; }

# Close every file descriptor above 2 in the current (sub)shell, so that a server started from it holds
# no pipe of its caller (a caller waiting for EOF on such a pipe would hang) and no lock.
close_extra_fds() {
    local fd
    for fd in /proc/"$BASHPID"/fd/*; do
        fd="${fd##*/}"
        if ((fd > 2)); then
            eval "exec $fd>&-" 2>/dev/null || true
        fi
    done
}

#!/usr/bin/env bash
# Check and install what the local stack needs: Java and Maven (checked), and the Debian
# packages openssl, postgresql, logrotate, prometheus, prometheus-node-exporter and kcat (installed with
# apt-get when missing; kcat is optional).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

missing_tools=()
command -v java >/dev/null || missing_tools+=("java (a JDK 17+: apt-get install -y openjdk-17-jdk-headless)")
command -v mvn >/dev/null || missing_tools+=("mvn (Maven 3.8+: apt-get install -y maven)")
if ((${#missing_tools[@]})); then
    printf 'error: missing: %s\n' "${missing_tools[@]}" >&2
    exit 1
fi
java_major="$(java -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java\.specification\.version = //p')"
if [[ -n "$java_major" && "${java_major%%.*}" -lt 17 ]]; then
    die "Kafka 4 needs Java 17 or newer; found $java_major (apt-get install -y openjdk-17-jdk-headless)"
fi

have_initdb() {
    command -v initdb >/dev/null && return 0
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null
}

apt_install() {
    local sudo=()
    if ! is_root; then
        command -v sudo >/dev/null || die "please install as root: apt-get install -y $*"
        sudo=(sudo)
    fi
    local log="$STACK_DIR/apt.log"
    mkdir -p "$STACK_DIR"
    note "installing with apt-get: $*"
    if [[ ! -f "$STACK_DIR/.apt-updated" ]]; then
        "${sudo[@]}" apt-get update -q >"$log" 2>&1 || die "apt-get update failed" "$log"
        touch "$STACK_DIR/.apt-updated"
    fi
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q --no-install-recommends "$@" \
        >>"$log" 2>&1 || die "apt-get install $* failed" "$log"
}

SUDO=
is_root || SUDO=sudo

wanted=()
command -v openssl >/dev/null || wanted+=(openssl)
have_initdb || wanted+=(postgresql)
command -v psql >/dev/null || wanted+=(postgresql-client)
# logrotate: the test of the shipped cron/metric-etl.logrotate runs it (logrotate -d).
command -v logrotate >/dev/null || wanted+=(logrotate)
# prometheus (promtool and prometheus) and prometheus-node-exporter: tests/test_alerts.py checks and
# unit-tests cron/prometheus/metric-etl.rules.yml with promtool, then fires an alert in a real Prometheus
# scraping a real node_exporter. The tests start their own on free loopback ports: a daemon the package
# may start (with systemd) is never used.
command -v promtool >/dev/null && command -v prometheus >/dev/null || wanted+=(prometheus)
command -v prometheus-node-exporter >/dev/null || wanted+=(prometheus-node-exporter)
if ((${#wanted[@]})); then
    command -v apt-get >/dev/null || die "missing ${wanted[*]} and no apt-get here: install them by hand"
    apt_install "${wanted[@]}"
fi

# kcat (librdkafka's producer) is for the benchmark and the compressed-topic tests, which fail
# without it: try once, never fail the set-up for it.
kcat_candidate() { apt-cache policy kcat 2>/dev/null | sed -n 's/^ *Candidate: *//p' | grep -v '(none)'; }
if ! command -v kcat >/dev/null && ! command -v kafkacat >/dev/null \
    && [[ ! -f "$STACK_DIR/.kcat-unavailable" ]] && command -v apt-get >/dev/null \
    && { is_root || command -v sudo >/dev/null; }; then
    if [[ -z "$(kcat_candidate)" && ! -f "$STACK_DIR/.apt-updated" ]]; then
        mkdir -p "$STACK_DIR"
        ${SUDO:-} apt-get update -q >"$STACK_DIR/apt.log" 2>&1 && touch "$STACK_DIR/.apt-updated" || true
    fi
    if [[ -n "$(kcat_candidate)" ]]; then
        (apt_install kcat) || true
    fi
    if ! command -v kcat >/dev/null; then
        note "note: kcat is not available from apt here; the benchmark and tests/test_real_producers.py need it"
        mkdir -p "$STACK_DIR"
        touch "$STACK_DIR/.kcat-unavailable"
    fi
fi

# Shared set-up steps for the project's scripts: each is idempotent and installs or starts only
# what is missing, so the same script works on a fresh Debian machine with Rust and on a warm one.
# Source it: `source "$(dirname "$0")/lib.sh"`.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
# The server tests and the demo create their databases on (trust auth on loopback here).
export ADMIN_DATABASE_URL="${ADMIN_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null 2>&1; then sudo "$@"; else
        die "need root to run: $* (run as root or install sudo)"
    fi
}

apt_updated=0
apt_install() {
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found: install $* by hand"
    if [ "$apt_updated" -eq 0 ]; then
        as_root apt-get update -qq >/dev/null || die "apt-get update failed"
        apt_updated=1
    fi
    say "installing $*"
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null || die "apt-get install $* failed"
}

require_rust() {
    command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust (https://rustup.rs) and retry"
}

pg_ready() { pg_isready -q -h 127.0.0.1 -p 5432 >/dev/null 2>&1; }

# PostgreSQL on 127.0.0.1:5432: install it if missing, start the cluster if it is down.
ensure_postgres() {
    if ! command -v pg_isready >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
        apt_install postgresql postgresql-client
    fi
    if pg_ready; then ensure_trust_auth; return 0; fi
    say "starting PostgreSQL"
    if command -v pg_ctlcluster >/dev/null 2>&1; then
        local version
        version="$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)"
        [ -n "$version" ] || die "no PostgreSQL cluster found under /etc/postgresql: run pg_createcluster"
        as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    fi
    for _ in $(seq 1 30); do pg_ready && break; sleep 1; done
    pg_ready || die "PostgreSQL does not answer on 127.0.0.1:5432; see /var/log/postgresql"
    ensure_trust_auth
}

# The project connects as `postgres` over loopback without a password (ADMIN_DATABASE_URL). When
# that fails, nothing is changed unless asked: CI_ALLOW_PG_TRUST_AUTH=1 (CI on a throw-away machine)
# switches loopback to trust in pg_hba.conf and prints the lines it changes; otherwise the error
# says how to give a URL with credentials instead.
ensure_trust_auth() {
    if psql "$ADMIN_DATABASE_URL" -Atqc 'select 1' >/dev/null 2>&1; then return 0; fi
    if [ "${CI_ALLOW_PG_TRUST_AUTH:-0}" != "1" ]; then
        die "cannot connect to $ADMIN_DATABASE_URL. Either give a URL with credentials:
  ADMIN_DATABASE_URL=postgres://USER:PASSWORD@127.0.0.1:5432/postgres $0
(the role must be able to create databases), or, on a throw-away machine only, let the script
switch loopback connections to trust authentication in pg_hba.conf:
  CI_ALLOW_PG_TRUST_AUTH=1 $0"
    fi
    local hba
    hba="$(ls /etc/postgresql/*/main/pg_hba.conf 2>/dev/null | sort -V | tail -n 1)"
    [ -n "$hba" ] || die "cannot connect as postgres on 127.0.0.1 and no pg_hba.conf found"
    say "CI_ALLOW_PG_TRUST_AUTH=1: switching loopback to trust auth in $hba; lines before:"
    grep -E '^host\s+all\s+all\s+(127\.0\.0\.1/32|::1/128)\s' "$hba" >&2 || true
    as_root sed -i -E 's/^(host\s+all\s+all\s+(127\.0\.0\.1\/32|::1\/128)\s+)\S+/\1trust/' "$hba"
    say "lines after:"
    grep -E '^host\s+all\s+all\s+(127\.0\.0\.1/32|::1/128)\s' "$hba" >&2 || true
    as_root pg_ctlcluster --skip-systemctl-redirect "$(basename "$(dirname "$(dirname "$hba")")")" main reload
    psql "$ADMIN_DATABASE_URL" -Atqc 'select 1' >/dev/null 2>&1 || die "still cannot connect to $ADMIN_DATABASE_URL"
}

# A database by name on the local server, created if missing.
ensure_database() {
    local name="$1"
    if [ "$(psql "$ADMIN_DATABASE_URL" -Atqc "select 1 from pg_database where datname = '$name'")" != "1" ]; then
        psql "$ADMIN_DATABASE_URL" -qc "create database \"$name\"" >/dev/null
    fi
}

# The AWS emulator (moto) on 127.0.0.1:4566, in a venv the script creates.
ensure_emulator() {
    if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
        apt_install python3-venv
    fi
    bash "$ROOT/scripts/aws-emulator.sh" start >/dev/null
}

# A command from a Debian package, installed when missing (e.g. `ensure_command promtool prometheus`).
# --no-install-recommends: only the command and what it needs (prometheus would bring exporters).
ensure_command() {
    local command="$1" package="$2"
    command -v "$command" >/dev/null 2>&1 && return 0
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found: install $package by hand"
    if [ "$apt_updated" -eq 0 ]; then
        as_root apt-get update -qq >/dev/null || die "apt-get update failed"
        apt_updated=1
    fi
    say "installing $package (for $command)"
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "$package" >/dev/null \
        || die "apt-get install $package failed"
    command -v "$command" >/dev/null 2>&1 || die "$package did not provide $command"
}

# What the web console's browser test needs: Debian's chromium, and playwright-core (a driver
# without browsers of its own) from npm, kept under target/console-test.
ensure_console_browser() {
    ensure_command chromium chromium
    ensure_command node nodejs
    ensure_command npm npm
    local dir="$CARGO_TARGET_DIR/console-test"
    if [ ! -f "$dir/node_modules/playwright-core/package.json" ]; then
        say "installing playwright-core into $dir"
        mkdir -p "$dir"
        (cd "$dir" && npm install --silent --no-audit --no-fund --prefix "$dir" playwright-core@1 >/dev/null) \
            || die "npm install playwright-core failed"
    fi
    export OUTBOX_TEST_PLAYWRIGHT_DIR="$dir"
}

# The Kafka-protocol broker (tansu) on 127.0.0.1:19092 for the kafka destinations' tests; installs
# tansu with cargo the first time (about 7 minutes, once per machine).
ensure_kafka() {
    bash "$ROOT/scripts/kafka.sh" start >/dev/null
}

# Whether something listens on 127.0.0.1:PORT.
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") >/dev/null 2>&1; }

# NATS with JetStream on 127.0.0.1:4222 (tests of kind = "nats"): started when installed and down.
# Not installed: says what to install, and fails.
ensure_nats() {
    port_open 4222 && return 0
    local bin
    bin="$(command -v nats-server 2>/dev/null || echo /usr/sbin/nats-server)"
    [ -x "$bin" ] || die "NATS does not answer on 127.0.0.1:4222 and nats-server is not installed.
On Debian: sudo apt-get install nats-server; this script then starts it with JetStream
(nats-server -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server). Or point NATS_URL at a server with -js."
    say "starting nats-server with JetStream on 127.0.0.1:4222"
    as_root mkdir -p /var/lib/nats-server
    as_root start-stop-daemon --start --oknodo --background --exec "$bin" -- \
        -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log
    for _ in $(seq 1 40); do port_open 4222 && return 0; sleep 0.5; done
    die "nats-server did not start on 127.0.0.1:4222: see /var/log/nats-server.log"
}

# RabbitMQ on 127.0.0.1:5672 with guest/guest (tests of kind = "rabbitmq"): started when
# installed and down. Not installed: says what to install, and fails.
ensure_rabbitmq() {
    port_open 5672 && return 0
    command -v rabbitmq-server >/dev/null 2>&1 || [ -x /usr/sbin/rabbitmq-server ] || \
        die "RabbitMQ does not answer on 127.0.0.1:5672 and rabbitmq-server is not installed.
On Debian: sudo apt-get install rabbitmq-server (it starts on 5672 with the user guest/guest,
which may connect from loopback only). Or point AMQP_URL at a broker."
    say "starting rabbitmq-server"
    as_root rabbitmq-server -detached
    # The Erlang VM takes a few seconds to boot.
    for _ in $(seq 1 60); do port_open 5672 && return 0; sleep 1; done
    die "rabbitmq-server did not start on 127.0.0.1:5672: see /var/log/rabbitmq/"
}

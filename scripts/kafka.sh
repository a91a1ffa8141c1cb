#!/usr/bin/env bash
# Local Kafka-protocol broker for the `kafka` destinations and the outbox-kafka tests: tansu
# (crates.io, Apache-2.0) on loopback with in-memory storage. No Docker, no JVM.
#
#   scripts/kafka.sh start     # install tansu if missing (~7 min, once per machine), start it unless the port answers
#   scripts/kafka.sh stop      # stop the broker this script started (never anything else)
#   scripts/kafka.sh restart   # stop + start (the in-memory storage starts empty)
#   scripts/kafka.sh status    # exit 0 when the port answers
#
# Environment: KAFKA_PORT (default 19092), KAFKA_HOST (default 127.0.0.1), KAFKA_WAIT_SECONDS
# (default 30: how long `start` waits for the port), KAFKA_INSTALL=0 (fail instead of installing tansu). State: .run/kafka-PORT.pid and .log (gitignored).
# Idempotent: `start` with a broker already answering on the port (ours or another Kafka) only reports it.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

HOST="${KAFKA_HOST:-127.0.0.1}"
PORT="${KAFKA_PORT:-19092}"
WAIT_SECONDS="${KAFKA_WAIT_SECONDS:-30}"
TANSU_VERSION="0.6.0"
RUN_DIR="$ROOT/.run"
PID_FILE="$RUN_DIR/kafka-$PORT.pid"
LOG_FILE="$RUN_DIR/kafka-$PORT.log"

log() { printf 'kafka: %s\n' "$*" >&2; }

# bash's /dev/tcp: no client tool needed to see that the port accepts connections.
answers() { (exec 3<>"/dev/tcp/$HOST/$PORT") 2>/dev/null; }

tansu_bin() {
    local bin
    for bin in "$(command -v tansu 2>/dev/null || true)" "${CARGO_HOME:-$HOME/.cargo}/bin/tansu"; do
        if [[ -n "$bin" && -x "$bin" ]] && "$bin" --version 2>/dev/null | grep -q "$TANSU_VERSION"; then
            echo "$bin"
            return 0
        fi
    done
    return 1
}

# The pid we recorded, if that process is still alive and is tansu (a recycled pid is someone else's).
our_pid() {
    [[ -f "$PID_FILE" ]] || return 1
    local pid
    pid="$(cat "$PID_FILE" 2>/dev/null || true)"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    if [[ -r "/proc/$pid/cmdline" ]] && ! tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q tansu; then
        return 1
    fi
    echo "$pid"
}

ensure_tansu() {
    if tansu_bin >/dev/null; then return 0; fi
    [[ "${KAFKA_INSTALL:-1}" != "0" ]] || die "tansu $TANSU_VERSION is not installed and KAFKA_INSTALL=0: run scripts/kafka.sh start"
    require_rust
    # `memory://` storage needs the feature `dynostore` (default features cannot store anything).
    log "installing tansu $TANSU_VERSION with cargo (about 7 minutes on 2 cores, once per machine)"
    cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore,postgres >&2 ||
        die "cargo install tansu failed (needs gcc and network access to crates.io)"
    tansu_bin >/dev/null || die "tansu $TANSU_VERSION is not on PATH or in ~/.cargo/bin after installing"
}

start() {
    if answers; then
        log "already running at $HOST:$PORT"
        echo "$HOST:$PORT"
        return 0
    fi
    ensure_tansu
    local bin
    bin="$(tansu_bin)"
    mkdir -p "$RUN_DIR"
    log "starting tansu on $HOST:$PORT (log: $LOG_FILE)"
    # setsid: the broker outlives this script and the shell that ran it (tests call `start`).
    setsid "$bin" broker \
        --listener-url "tcp://$HOST:$PORT" \
        --advertised-listener-url "tcp://$HOST:$PORT" \
        --storage-engine "memory://tansu/" >>"$LOG_FILE" 2>&1 </dev/null &
    echo $! >"$PID_FILE"
    local waited=0
    until answers; do
        if ! our_pid >/dev/null; then
            log "tansu exited during start-up; last log lines:"
            tail -n 20 "$LOG_FILE" >&2 || true
            rm -f "$PID_FILE"
            exit 1
        fi
        if ((waited >= WAIT_SECONDS * 10)); then
            log "tansu did not answer within ${WAIT_SECONDS}s; see $LOG_FILE"
            exit 1
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    log "ready at $HOST:$PORT"
    echo "$HOST:$PORT"
}

stop() {
    local pid
    if ! pid="$(our_pid)"; then
        rm -f "$PID_FILE"
        if answers; then
            log "something answers at $HOST:$PORT but this script did not start it; leaving it alone"
        else
            log "not running"
        fi
        return 0
    fi
    kill "$pid" 2>/dev/null || true
    local waited=0
    while kill -0 "$pid" 2>/dev/null; do
        if ((waited >= 100)); then
            log "tansu (pid $pid) ignored SIGTERM for 10s; sending SIGKILL"
            kill -9 "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    rm -f "$PID_FILE"
    log "stopped (pid $pid)"
}

status() {
    if answers; then
        local who="started elsewhere"
        local pid
        if pid="$(our_pid)"; then who="pid $pid, log $LOG_FILE"; fi
        echo "running at $HOST:$PORT ($who)"
        return 0
    fi
    echo "not running at $HOST:$PORT (start it with: scripts/kafka.sh start)"
    return 1
}

case "${1:-}" in
start) start ;;
stop) stop ;;
restart)
    stop
    start
    ;;
status) status ;;
*)
    echo "usage: $0 start|stop|restart|status" >&2
    exit 2
    ;;
esac

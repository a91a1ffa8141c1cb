#!/usr/bin/env bash
# Local AWS emulator for the `local` profile and the outbox-aws tests: moto's server (PyPI
# `moto[server]`) on loopback, serving SQS, EventBridge, S3 and DynamoDB. No Docker needed.
#
#   scripts/aws-emulator.sh start     # create .venv-aws if missing, start moto unless the port answers
#   scripts/aws-emulator.sh stop      # stop the server this script started (never anything else)
#   scripts/aws-emulator.sh restart   # stop + start (used by the outage test)
#   scripts/aws-emulator.sh status    # exit 0 when the endpoint answers
#
# Environment: AWS_EMULATOR_PORT (default 4566), AWS_EMULATOR_HOST (default 127.0.0.1),
# AWS_EMULATOR_WAIT_SECONDS (default 30: how long `start` waits for the server to answer).
# State lives at the repository root: .venv-aws/ (the venv) and .run/ (pid and log), both gitignored.
# Idempotent: `start` on a running emulator (ours or e.g. LocalStack in Docker) only reports it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HOST="${AWS_EMULATOR_HOST:-127.0.0.1}"
PORT="${AWS_EMULATOR_PORT:-4566}"
WAIT_SECONDS="${AWS_EMULATOR_WAIT_SECONDS:-30}"
VENV="$ROOT/.venv-aws"
RUN_DIR="$ROOT/.run"
PID_FILE="$RUN_DIR/aws-emulator-$PORT.pid"
LOG_FILE="$RUN_DIR/aws-emulator-$PORT.log"
ENDPOINT="http://$HOST:$PORT"

log() { printf 'aws-emulator: %s\n' "$*" >&2; }

# True when something answers HTTP on the endpoint. Uses bash's /dev/tcp so curl is optional.
answers() {
    if command -v curl >/dev/null 2>&1; then
        curl -fsS -o /dev/null --max-time 2 "$ENDPOINT/moto-api/" 2>/dev/null && return 0
        # LocalStack has no /moto-api/; its health endpoint proves it is up.
        curl -fsS -o /dev/null --max-time 2 "$ENDPOINT/_localstack/health" 2>/dev/null && return 0
        return 1
    fi
    (exec 3<>"/dev/tcp/$HOST/$PORT") 2>/dev/null
}

# The pid we recorded, if that process is still alive.
our_pid() {
    [[ -f "$PID_FILE" ]] || return 1
    local pid
    pid="$(cat "$PID_FILE" 2>/dev/null || true)"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    # A recycled pid belongs to someone else: only ever signal our moto_server.
    if [[ -r "/proc/$pid/cmdline" ]] && ! tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q moto_server; then
        return 1
    fi
    echo "$pid"
}

ensure_venv() {
    if [[ -x "$VENV/bin/moto_server" ]]; then
        return 0
    fi
    command -v python3 >/dev/null 2>&1 || {
        log "python3 is not installed: install it (e.g. apt-get install python3 python3-venv) and retry"
        exit 1
    }
    if [[ ! -x "$VENV/bin/pip" ]]; then
        rm -rf "$VENV"
        if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
            log "python3 -m venv failed; installing python3-venv with apt-get"
            rm -rf "$VENV"
            if command -v apt-get >/dev/null 2>&1; then
                local sudo=""
                [[ "$(id -u)" -eq 0 ]] || sudo="sudo"
                $sudo apt-get update -qq >&2
                local pyver
                pyver="$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
                $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv "python${pyver}-venv" >&2 ||
                    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >&2
                python3 -m venv "$VENV"
            else
                log "cannot create a venv and apt-get is not available: install the venv module for python3"
                exit 1
            fi
        fi
    fi
    log "installing moto[server] into $VENV (about a minute, once)"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check 'moto[server]' >&2
}

start() {
    if answers; then
        log "already running at $ENDPOINT"
        echo "$ENDPOINT"
        return 0
    fi
    ensure_venv
    mkdir -p "$RUN_DIR"
    log "starting moto_server on $ENDPOINT (log: $LOG_FILE)"
    # setsid: the server outlives this script and the shell that ran it (tests call `start`).
    setsid "$VENV/bin/moto_server" -H "$HOST" -p "$PORT" >>"$LOG_FILE" 2>&1 </dev/null &
    echo $! >"$PID_FILE"
    local waited=0
    until answers; do
        if ! our_pid >/dev/null; then
            log "moto_server exited during start-up; last log lines:"
            tail -n 20 "$LOG_FILE" >&2 || true
            rm -f "$PID_FILE"
            exit 1
        fi
        if ((waited >= WAIT_SECONDS * 10)); then
            log "moto_server did not answer within ${WAIT_SECONDS}s; see $LOG_FILE"
            exit 1
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    log "ready at $ENDPOINT"
    echo "$ENDPOINT"
}

stop() {
    local pid
    if ! pid="$(our_pid)"; then
        rm -f "$PID_FILE"
        if answers; then
            log "something answers at $ENDPOINT but this script did not start it; leaving it alone"
        else
            log "not running"
        fi
        return 0
    fi
    kill "$pid" 2>/dev/null || true
    local waited=0
    while kill -0 "$pid" 2>/dev/null; do
        if ((waited >= 50)); then
            log "moto_server (pid $pid) ignored SIGTERM for 5s; sending SIGKILL"
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
        echo "running at $ENDPOINT ($who)"
        return 0
    fi
    echo "not running at $ENDPOINT (start it with: scripts/aws-emulator.sh start)"
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

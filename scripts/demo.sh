#!/usr/bin/env bash
# The main job: the whole outbox story on this machine, end to end.
#
#   scripts/demo.sh                      # orders service with the relay embedded
#   scripts/demo.sh --standalone-relay   # same, with the relay extracted to `outbox relay`
#   scripts/demo.sh --orders 20          # a longer stream (default 12)
#
# Installs and starts what is missing (PostgreSQL, the AWS emulator), builds, creates the local AWS
# resources (`outbox aws bootstrap`: queue, dead-letter queue + redrive policy, DynamoDB table),
# migrates, starts the orders service and the shipping consumer, drives a stream of orders through
# them over HTTP and prints a summary. Idempotent: run it again any time. Background processes it
# started are stopped on exit; their logs stay in .run/demo-*.log. Walkthrough: docs/DEMO.md.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

MODE=embedded
ORDERS=12
while [ $# -gt 0 ]; do
    case "$1" in
        --standalone-relay) MODE=standalone ;;
        --orders) shift; ORDERS="${1:?--orders needs a number}" ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) die "unknown argument $1 (use --standalone-relay, --orders N)" ;;
    esac
    shift
done

ADMIN_URL="${ADMIN_DATABASE_URL:-${OUTBOX_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}}"
BASE_URL="${ADMIN_URL%/*}"
export OUTBOX_CONFIG="$ROOT/crates/outbox-demo/outbox.toml"
export OUTBOX_PROFILE=local
export DATABASE_URL="$BASE_URL/outbox_demo"
export SHIPPING_DATABASE_URL="$BASE_URL/outbox_demo_shipping"
export OUTBOX_LOG="${OUTBOX_LOG:-warn}"
RUN_DIR="$ROOT/.run"
mkdir -p "$RUN_DIR"

PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        # Each stops gracefully (finishes in-flight work) within a few seconds; bounded anyway.
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
PORT="${DEMO_PORT:-}"
if [ -z "$PORT" ]; then
    for candidate in $(seq 18080 18099); do
        if port_free "$candidate"; then PORT="$candidate"; break; fi
    done
    [ -n "$PORT" ] || die "no free port in 18080-18099: set DEMO_PORT"
fi

say "checking prerequisites (PostgreSQL, AWS emulator)"
require_rust
ensure_postgres
ensure_database outbox_demo
ensure_database outbox_demo_shipping
ensure_emulator

say "building (cargo build -p outbox-cli -p outbox-demo)"
cargo build --quiet -p outbox-cli -p outbox-demo
BIN="$CARGO_TARGET_DIR/debug"

say "creating the local AWS resources (outbox aws bootstrap)"
"$BIN/outbox" aws bootstrap
say "migrating the outbox schema (outbox migrate)"
"$BIN/outbox" migrate

say "starting the shipping consumer (inbox idempotency)"
"$BIN/outbox-demo" shipping --wait 2 2>"$RUN_DIR/demo-shipping.log" &
PIDS+=($!)

if [ "$MODE" = standalone ]; then
    say "starting the orders service on 127.0.0.1:$PORT with relay.enabled = false"
    OUTBOX_RELAY__ENABLED=false "$BIN/outbox-demo" orders --listen "127.0.0.1:$PORT" 2>"$RUN_DIR/demo-orders.log" &
    PIDS+=($!)
    say "starting the standalone relay (outbox relay) against the same database"
    OUTBOX_LOG=info "$BIN/outbox" relay 2>"$RUN_DIR/demo-relay.log" &
    PIDS+=($!)
else
    say "starting the orders service on 127.0.0.1:$PORT with the relay embedded"
    "$BIN/outbox-demo" orders --listen "127.0.0.1:$PORT" 2>"$RUN_DIR/demo-orders.log" &
    PIDS+=($!)
fi

say "driving $ORDERS orders through the API"
set +e
"$BIN/outbox-demo" drive --producer "http://127.0.0.1:$PORT" --orders "$ORDERS" --timeout 60
rc=$?
set -e
for pid in "${PIDS[@]}"; do
    if ! kill -0 "$pid" 2>/dev/null; then
        printf 'a demo process exited early; see %s/demo-*.log\n' "$RUN_DIR" >&2
        rc=1
    fi
done

cleanup
PIDS=()
if [ "$rc" -eq 0 ]; then
    say "demo finished: OK (mode: $MODE relay; logs in .run/demo-*.log; walkthrough: docs/DEMO.md)"
else
    say "demo finished: FAILED (exit $rc); logs in .run/demo-*.log"
fi
exit "$rc"

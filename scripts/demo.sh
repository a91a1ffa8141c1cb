#!/usr/bin/env bash
# The main job: the whole outbox story on this machine, end to end.
#
#   scripts/demo.sh                      # orders service with the relay embedded, over SQS
#   scripts/demo.sh --standalone-relay   # same, with the relay extracted to `outbox relay`
#   scripts/demo.sh --orders 20          # a longer stream (default 12)
#   scripts/demo.sh --broker kafka       # the same story over kafka, nats or rabbitmq (default sqs)
#
# Installs and starts what is missing (PostgreSQL; the AWS emulator, or the Kafka-protocol broker;
# NATS and RabbitMQ are started when installed), builds, creates the broker's local resources
# (sqs: `outbox aws bootstrap`: queue, dead-letter queue + redrive policy, DynamoDB table; the
# others: `outbox-demo bootstrap`: topic, stream, or exchange + queue), migrates, starts the
# orders service and the shipping consumer, drives a stream of orders through them over HTTP and
# prints a summary. Idempotent: run it again any time, also right after a run.
# Background processes it started are stopped on exit (and, should a run have been killed before
# it could, at the start of the next one); their logs stay in .run/demo-*.log. Walkthrough:
# docs/DEMO.md.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

MODE=embedded
ORDERS=12
BROKER=sqs
BROKERS="sqs kafka nats rabbitmq"
while [ $# -gt 0 ]; do
    case "$1" in
        --standalone-relay) MODE=standalone ;;
        --orders) shift; ORDERS="${1:?--orders needs a number}" ;;
        --broker) [ $# -ge 2 ] || die "--broker needs one of: ${BROKERS// /, }"; shift; BROKER="$1" ;;
        --broker=*) BROKER="${1#--broker=}" ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) die "unknown argument $1 (use --standalone-relay, --orders N, --broker ${BROKERS// /|})" ;;
    esac
    shift
done
case " $BROKERS " in
    *" $BROKER "*) ;;
    *) die "unknown broker '$BROKER': use --broker with one of ${BROKERS// /, } (default sqs)" ;;
esac
[[ "$ORDERS" =~ ^[0-9]+$ ]] || die "--orders needs a number, got '$ORDERS'"

ADMIN_URL="${ADMIN_DATABASE_URL:-${OUTBOX_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}}"
BASE_URL="${ADMIN_URL%/*}"
# One configuration per broker: the same story, the `orders` destination of its kind.
if [ "$BROKER" = sqs ]; then
    export OUTBOX_CONFIG="$ROOT/crates/outbox-demo/outbox.toml"
else
    export OUTBOX_CONFIG="$ROOT/crates/outbox-demo/outbox.$BROKER.toml"
fi
export OUTBOX_PROFILE=local
export DATABASE_URL="$BASE_URL/outbox_demo"
export SHIPPING_DATABASE_URL="$BASE_URL/outbox_demo_shipping"
export OUTBOX_LOG="${OUTBOX_LOG:-warn}"
RUN_DIR="$ROOT/.run"
mkdir -p "$RUN_DIR"
BIN="$CARGO_TARGET_DIR/debug"
# The shipping consumer's long-poll wait (seconds; SQS's receive, a JetStream pull). A stop lets a
# poll in progress answer (and handles what it returns), so stopping takes up to this long.
SHIPPING_WAIT=2
# How long the processes get to stop after SIGTERM before SIGKILL.
STOP_SECONDS=$((SHIPPING_WAIT + 13))
# The background processes of the run in progress, so that the next run can stop them should
# this one be killed before its clean-up ran.
PID_FILE="$RUN_DIR/demo.pids"

# One demo at a time: two would share the queue and the databases. The lock file holds the pid of
# the run in progress (a pid file rather than flock: the lock must not pass to the processes a run
# starts, and the emulator it may start outlives it); one whose run is gone is stale.
LOCK_FILE="$RUN_DIR/demo.lock"
take_lock() {
    local holder
    for _ in 1 2; do
        if (set -C; echo "$$" >"$LOCK_FILE") 2>/dev/null; then return 0; fi
        holder="$(cat "$LOCK_FILE" 2>/dev/null || true)"
        if [[ "$holder" =~ ^[0-9]+$ ]] && kill -0 "$holder" 2>/dev/null &&
            tr '\0' ' ' <"/proc/$holder/cmdline" 2>/dev/null | grep -q 'demo\.sh'; then
            die "another scripts/demo.sh is running (pid $holder); wait for it to finish"
        fi
        rm -f "$LOCK_FILE"
    done
    die "cannot take the lock $LOCK_FILE: remove it if no demo is running"
}
take_lock

# Stops processes: SIGTERM (each finishes its in-flight work; the consumer also lets its long poll
# answer, so that no message is taken for nobody and left invisible for the visibility timeout,
# which would delay and reorder the next run), SIGKILL only past STOP_SECONDS. A consumer killed
# that way may leave a poll open at the queue: wait it out before going on.
stop_pids() {
    local pid killed=0 deadline=$((SECONDS + STOP_SECONDS))
    for pid in "$@"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "$@"; do
        while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            kill -KILL "$pid" 2>/dev/null || true
            killed=1
        fi
    done
    if [ "$killed" -eq 1 ]; then
        printf 'a demo process did not stop within %ss and was killed; waiting %ss for a long poll it may have left open\n' \
            "$STOP_SECONDS" "$SHIPPING_WAIT" >&2
        sleep "$SHIPPING_WAIT"
    fi
}

# Processes a killed earlier run left behind (its clean-up never ran): stop them, and let a long
# poll a killed consumer left open at the queue end, before this run starts its own.
stop_leftovers() {
    [ -f "$PID_FILE" ] || return 0
    local pid cmd left=()
    while read -r pid; do
        [[ "$pid" =~ ^[0-9]+$ ]] || continue
        kill -0 "$pid" 2>/dev/null || continue
        # A recycled pid belongs to someone else: only ever signal the demo's own binaries.
        cmd="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)"
        case "$cmd" in
            "$BIN/outbox-demo "* | "$BIN/outbox relay"*) left+=("$pid") ;;
        esac
    done <"$PID_FILE"
    if [ "${#left[@]}" -gt 0 ]; then
        say "stopping ${#left[@]} process(es) an earlier demo run left behind (pids ${left[*]})"
        stop_pids "${left[@]}"
    fi
    say "an earlier demo run did not finish cleanly: waiting ${SHIPPING_WAIT}s for its consumer's long poll to end"
    sleep "$SHIPPING_WAIT"
    rm -f "$PID_FILE"
}

PIDS=()
DRIVE_PID=
started() {
    PIDS+=("$1")
    echo "$1" >>"$PID_FILE"
}
cleanup() {
    if [ -n "$DRIVE_PID" ]; then
        kill -TERM "$DRIVE_PID" 2>/dev/null || true
    fi
    if [ "${#PIDS[@]}" -gt 0 ]; then
        stop_pids "${PIDS[@]}"
    fi
    PIDS=()
    rm -f "$PID_FILE" "$LOCK_FILE"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP
stop_leftovers

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
PORT="${DEMO_PORT:-}"
if [ -z "$PORT" ]; then
    for candidate in $(seq 18080 18099); do
        if port_free "$candidate"; then PORT="$candidate"; break; fi
    done
    [ -n "$PORT" ] || die "no free port in 18080-18099: set DEMO_PORT"
fi

case "$BROKER" in
    sqs) BROKER_NAME="the AWS emulator" ;;
    kafka) BROKER_NAME="the Kafka-protocol broker" ;;
    nats) BROKER_NAME="NATS JetStream" ;;
    rabbitmq) BROKER_NAME="RabbitMQ" ;;
esac
say "checking prerequisites (PostgreSQL, $BROKER_NAME)"
require_rust
ensure_postgres
ensure_database outbox_demo
ensure_database outbox_demo_shipping
case "$BROKER" in
    sqs) ensure_emulator ;;
    kafka) ensure_kafka ;;
    nats) ensure_nats ;;
    rabbitmq) ensure_rabbitmq ;;
esac

# The whole workspace's feature set (as `cargo build --workspace` and `cargo test --workspace`
# resolve it), so that the two binaries reuse what those builds compiled; `-p outbox-cli -p
# outbox-demo` resolves a smaller set (num-traits and byteorder without their default features)
# and compiles chrono, sqlx and every workspace crate a second time.
say "building (cargo build --workspace --bin outbox --bin outbox-demo)"
cargo build --quiet --workspace --bin outbox --bin outbox-demo

if [ "$BROKER" = sqs ]; then
    say "creating the local AWS resources (outbox aws bootstrap)"
    "$BIN/outbox" aws bootstrap
else
    say "creating the local $BROKER resources (outbox-demo bootstrap)"
    "$BIN/outbox-demo" bootstrap
fi
say "migrating the outbox schema (outbox migrate)"
"$BIN/outbox" migrate

say "starting the shipping consumer on $BROKER (inbox idempotency)"
"$BIN/outbox-demo" shipping --broker "$BROKER" --wait "$SHIPPING_WAIT" 2>"$RUN_DIR/demo-shipping.log" &
started $!

if [ "$MODE" = standalone ]; then
    say "starting the orders service on 127.0.0.1:$PORT with relay.enabled = false"
    OUTBOX_RELAY__ENABLED=false "$BIN/outbox-demo" orders --listen "127.0.0.1:$PORT" 2>"$RUN_DIR/demo-orders.log" &
    started $!
    say "starting the standalone relay (outbox relay) against the same database"
    OUTBOX_LOG=info "$BIN/outbox" relay 2>"$RUN_DIR/demo-relay.log" &
    started $!
else
    say "starting the orders service on 127.0.0.1:$PORT with the relay embedded"
    "$BIN/outbox-demo" orders --listen "127.0.0.1:$PORT" 2>"$RUN_DIR/demo-orders.log" &
    started $!
fi

say "driving $ORDERS orders through the API"
set +e
# In the background and waited for, so that a signal reaches the clean-up at once and a killed run
# leaves its pid for the next one.
"$BIN/outbox-demo" drive --producer "http://127.0.0.1:$PORT" --orders "$ORDERS" --timeout 60 &
DRIVE_PID=$!
echo "$DRIVE_PID" >>"$PID_FILE"
wait "$DRIVE_PID"
rc=$?
DRIVE_PID=
set -e
for pid in "${PIDS[@]}"; do
    if ! kill -0 "$pid" 2>/dev/null; then
        printf 'a demo process exited early; see %s/demo-*.log\n' "$RUN_DIR" >&2
        rc=1
    fi
done

say "stopping the services (each finishes its in-flight work)"
cleanup
if [ "$rc" -eq 0 ]; then
    say "demo finished: OK (broker: $BROKER; mode: $MODE relay; logs in .run/demo-*.log; walkthrough: docs/DEMO.md)"
else
    say "demo finished: FAILED (broker: $BROKER; exit $rc); logs in .run/demo-*.log"
fi
exit "$rc"

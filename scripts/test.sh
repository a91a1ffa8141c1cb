#!/usr/bin/env bash
# The whole test suite: starts PostgreSQL, the AWS emulator, Kafka (tansu), NATS (JetStream) and RabbitMQ if needed, then runs every test of
# the workspace against them (unit, integration, end-to-end, fault and CLI tests), then the producer
# examples in other languages (scripts/examples.sh).
#   scripts/test.sh [extra cargo test args]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

require_rust
ensure_postgres
ensure_emulator
ensure_command promtool prometheus
ensure_console_browser
ensure_kafka
ensure_nats
ensure_rabbitmq
export DATABASE_URL="$ADMIN_DATABASE_URL"
# The console's browser test fails instead of skipping when the browser is missing.
export OUTBOX_TEST_REQUIRE_BROWSER=1

say "testing the alert rules (promtool)"
(cd ops/prometheus && promtool check rules alerts.yml && promtool test rules alerts.test.yml)

say "running the test suite"
cargo test --workspace --all-targets --no-fail-fast "$@"
cargo test --workspace --doc
# Producers in Python and Node.js through the SQL contract, relayed by the binary just tested.
OUTBOX_TEST_BIN="$CARGO_TARGET_DIR/debug/outbox" bash "$ROOT/scripts/examples.sh"

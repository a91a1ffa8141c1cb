#!/usr/bin/env bash
# Compiles what `cargo clippy --workspace --all-targets` does not: the feature combinations a user
# can choose (the workspace build unifies features, so e.g. the core without `otel` or the CLI
# without any broker would otherwise never be compiled), the Lambda binary (behind its `lambda`
# feature), and the API docs with warnings denied (broken intra-doc links fail). `cargo check`
# only: the tests run in the workspace build.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"
require_rust

check() {
    say "cargo check $*"
    cargo check --quiet "$@"
}
# The core as a library user gets it, and with each optional feature.
check -p outbox --no-default-features
check -p outbox --features otel
# The consumer without AWS: the broker-independent inbox only.
check -p outbox-consumer --no-default-features
# The CLI with no broker, and with each broker alone.
check -p outbox-cli --no-default-features
for feature in aws kafka nats rabbitmq; do
    check -p outbox-cli --no-default-features --features "$feature"
done
# The Lambda binary.
check -p outbox-lambda --features lambda --bins

say "cargo doc (warnings denied)"
RUSTDOCFLAGS="-D warnings" cargo doc --quiet --workspace --no-deps --all-features
say "feature combinations and docs: OK"

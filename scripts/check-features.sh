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

# Warnings fail the check as they do in clippy (not through RUSTFLAGS, which would rebuild every
# dependency).
check() {
    say "cargo check $*"
    local output
    output="$(cargo check --quiet "$@" 2>&1)" || { printf '%s\n' "$output" >&2; die "cargo check $* failed"; }
    if grep -q '^warning' <<<"$output"; then
        printf '%s\n' "$output" >&2
        die "cargo check $* has warnings"
    fi
}
# The core as a library user gets it, and with each optional feature.
check -p outbox --no-default-features
check -p outbox --features otel
# The consumer without AWS: the broker-independent inbox only.
check -p outbox-consumer --no-default-features
# The CLI with no broker (every broker's code is behind its feature; the default build has them
# all). Each broker alone is not checked: measured at ~4 min for `--features aws` alone here.
check -p outbox-cli --no-default-features
# The OTLP trace exporter alone: its dependencies must not lean on a broker's (reqwest's TLS
# features come from the webhook publisher in the default build).
check -p outbox-cli --no-default-features --features otlp
# The Lambda binary.
check -p outbox-lambda --features lambda --bins

say "cargo doc (warnings denied)"
RUSTDOCFLAGS="-D warnings" cargo doc --quiet --workspace --no-deps --all-features
say "feature combinations and docs: OK"

#!/usr/bin/env bash
# The whole test suite: starts PostgreSQL and the AWS emulator if needed, then runs every test of
# the workspace against them (unit, integration, end-to-end, fault and CLI tests).
#   scripts/test.sh [extra cargo test args]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

require_rust
ensure_postgres
ensure_emulator
export DATABASE_URL="$ADMIN_DATABASE_URL"

say "running the test suite"
cargo test --workspace --all-targets --no-fail-fast "$@"
cargo test --workspace --doc

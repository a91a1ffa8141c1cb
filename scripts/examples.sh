#!/usr/bin/env bash
# The producers in other languages, end to end: for each example (examples/python-producer,
# examples/node-producer), a database of its own, `outbox migrate`, the producer, `outbox relay
# --drain` into a JSON Lines file, then a check of what the relay published against what the
# producer committed (ids, order per key, payloads, headers). Creates the examples' venv and
# node_modules when they are missing or stale; safe to re-run.
#   scripts/examples.sh [python] [node]      (both when none is named)
# OUTBOX_TEST_BIN names the `outbox` binary to use; by default the workspace's test build.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

examples=("$@")
[ ${#examples[@]} -gt 0 ] || examples=(python node)
for example in "${examples[@]}"; do
    case "$example" in
        python | node) ;;
        *) die "unknown example '$example': use python and/or node" ;;
    esac
done

ensure_postgres
if [ -z "${OUTBOX_TEST_BIN:-}" ]; then
    require_rust
    # The test build (what scripts/test.sh builds anyway): a plain `cargo build` would unify other
    # features and rebuild much of the workspace.
    say "building the outbox binary (cargo test --workspace --no-run)"
    cargo test --workspace --no-run -q >/dev/null 2>&1 || cargo test --workspace --no-run
    OUTBOX_TEST_BIN="$CARGO_TARGET_DIR/debug/outbox"
fi
[ -x "$OUTBOX_TEST_BIN" ] || die "no outbox binary at $OUTBOX_TEST_BIN: set OUTBOX_TEST_BIN or run cargo test --workspace --no-run"

# Dependencies are reinstalled when their manifest changed since the last install.
stamp_ok() { [ -f "$2" ] && [ "$(cat "$2")" = "$(sha256sum "$1" | cut -d' ' -f1)" ]; }
stamp() { sha256sum "$1" | cut -d' ' -f1 >"$2"; }

python_deps() {
    local dir="$ROOT/examples/python-producer"
    if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then apt_install python3-venv; fi
    if [ ! -x "$dir/.venv/bin/python" ]; then
        say "creating examples/python-producer/.venv"
        python3 -m venv "$dir/.venv"
    fi
    if ! stamp_ok "$dir/requirements.txt" "$dir/.venv/.requirements.sha256"; then
        say "installing examples/python-producer/requirements.txt"
        "$dir/.venv/bin/pip" install -q --disable-pip-version-check -r "$dir/requirements.txt"
        stamp "$dir/requirements.txt" "$dir/.venv/.requirements.sha256"
    fi
}

node_deps() {
    local dir="$ROOT/examples/node-producer"
    command -v npm >/dev/null 2>&1 || apt_install nodejs npm
    if ! stamp_ok "$dir/package-lock.json" "$dir/node_modules/.package-lock.sha256"; then
        say "installing examples/node-producer (npm ci)"
        (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
        stamp "$dir/package-lock.json" "$dir/node_modules/.package-lock.sha256"
    fi
}

# `url` with its database replaced by `name` (a query string is kept).
url_with_database() {
    local url="$1" name="$2" query=""
    case "$url" in *\?*) query="?${url#*\?}"; url="${url%%\?*}" ;; esac
    printf '%s/%s%s' "${url%/*}" "$name" "$query"
}

# Without the server's NOTICE when the database is not there.
dropdb_quietly() {
    PGOPTIONS='-c client_min_messages=warning' psql "$ADMIN_DATABASE_URL" -qc "DROP DATABASE IF EXISTS $1 WITH (FORCE)" >/dev/null
}

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

run_example() {
    local example="$1" db="outbox_example_$1"
    local url
    url="$(url_with_database "$ADMIN_DATABASE_URL" "$db")"
    say "example: $example producer -> outbox_event -> outbox relay --drain"
    dropdb_quietly "$db"
    psql "$ADMIN_DATABASE_URL" -qc "CREATE DATABASE $db" >/dev/null
    # A clean configuration: no outbox.toml from the working directory (the commands run in an
    # empty one), no inherited OUTBOX_* overrides.
    local outbox=(env)
    local var
    for var in $(compgen -e | grep '^OUTBOX_' || true); do outbox+=(-u "$var"); done
    outbox+=(DATABASE_URL="$url" OUTBOX_LOG=warn "$OUTBOX_TEST_BIN")
    (cd "$work" && "${outbox[@]}" migrate)
    case "$example" in
        python) DATABASE_URL="$url" "$ROOT/examples/python-producer/.venv/bin/python" \
            "$ROOT/examples/python-producer/producer.py" >"$work/$example.expected.jsonl" ;;
        node) DATABASE_URL="$url" node "$ROOT/examples/node-producer/producer.js" \
            >"$work/$example.expected.jsonl" ;;
    esac
    (cd "$work" && "${outbox[@]}" relay --drain --summary-interval 0 --publisher "file:$work/$example.relayed.jsonl")
    python3 "$ROOT/examples/check_relayed.py" "$work/$example.expected.jsonl" "$work/$example.relayed.jsonl"
    dropdb_quietly "$db"
}

for example in "${examples[@]}"; do
    "${example}_deps"
    run_example "$example"
done
say "producer examples: ${examples[*]} relayed and checked"

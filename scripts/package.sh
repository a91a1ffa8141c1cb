#!/usr/bin/env bash
# Packages every publishable crate (those without `publish = false`) as `cargo publish` would,
# without uploading: checks that each has the metadata crates.io shows (description, keywords,
# categories, readme, license) and no placeholder URL, then runs `cargo package --no-verify`, which
# checks the manifests (a version on every path dependency), and that each .crate holds its README
# and both license files. Without the verification build: it would build every dependency again in
# a separate target (the AWS SDK alone takes many minutes); `cargo test` builds the same sources.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"
require_rust

metadata="$(cargo metadata --no-deps --format-version 1)"
# A variable, not a process substitution: a failed check must stop the script.
publishable="$(python3 - "$metadata" <<'PY'
import json, sys
problems = []
for p in json.loads(sys.argv[1])["packages"]:
    if p.get("publish") is not None:  # publish = false: [] in cargo metadata
        continue
    for field in ("description", "keywords", "categories", "readme", "license"):
        if not p.get(field):
            problems.append(f"{p['name']}: no `{field}` in {p['manifest_path']}")
    for field in ("repository", "homepage", "documentation"):
        if "example." in (p.get(field) or ""):
            problems.append(f"{p['name']}: `{field}` is a placeholder ({p[field]}): set the real URL or none")
    print(p["name"])
if problems:
    print("\n".join(problems), file=sys.stderr)
    sys.exit(1)
PY
)"
mapfile -t crates <<<"$publishable"
[ ${#crates[@]} -gt 0 ] || die "no publishable crate found"
say "packaging ${crates[*]}"
args=()
for crate in "${crates[@]}"; do args+=(-p "$crate"); done
# The only warning left is the missing repository/homepage: the project has no public URL yet.
cargo package --no-verify --allow-dirty "${args[@]}" 2>&1 |
    { grep -v -e 'manifest has no documentation, homepage or repository' -e '^ *|$' \
        -e '= note: see https://doc.rust-lang.org/cargo/reference/manifest.html#package-metadata' || true; } >&2
version="$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["packages"][0]["version"])' "$metadata")"
for crate in "${crates[@]}"; do
    file="$CARGO_TARGET_DIR/package/$crate-$version.crate"
    listing="$(tar tzf "$file")"
    for member in README.md LICENSE-MIT LICENSE-APACHE Cargo.toml; do
        grep -qx "$crate-$version/$member" <<<"$listing" || die "$file lacks $member"
    done
done
say "packaged: ${crates[*]}"

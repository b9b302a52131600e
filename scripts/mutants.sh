#!/usr/bin/env bash
# Mutation testing of the request path's pure core with cargo-mutants (outside .ci/run: a full
# run is many builds). Each mutant of the listed files must make a unit test of the library
# fail; survivors are printed at the end (mutants.out/missed.txt) and must be killed by a new
# test or explained as equivalent.
#
#   scripts/mutants.sh                       every request-path module of permiso-core
#   MUTANTS_FILES="crates/core/src/path.rs" scripts/mutants.sh
#
# Environment:
#   MUTANTS_FILES   files to mutate (default: the request-path modules below)
#   MUTANTS_JOBS    parallel builds (default 1: the machine has 2 cores)
#   MUTANTS_TIMEOUT seconds per test run (default 120)
# Installs cargo-mutants when it is missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

C=crates/core/src
FILES="${MUTANTS_FILES:-$C/path.rs $C/routes.rs $C/scope.rs $C/key.rs $C/decision.rs $C/ratelimit.rs $C/headers.rs}"
if ! cargo mutants --version >/dev/null 2>&1; then
    echo "mutants.sh: installing cargo-mutants" >&2
    cargo install cargo-mutants --locked
fi
args=()
for f in $FILES; do
    args+=(--file "$f")
done
# permiso-core's own unit tests judge a mutant: the core is pure, its crate builds in seconds
# without pingora, and they run in about a second. cargo-mutants works in a copy of the tree,
# so the checkout stays untouched.
cargo mutants --package permiso-core --jobs "${MUTANTS_JOBS:-1}" --timeout "${MUTANTS_TIMEOUT:-120}" \
    "${args[@]}" || true
echo "=== caught: $(wc -l < mutants.out/caught.txt 2>/dev/null || echo 0)," \
     "missed: $(wc -l < mutants.out/missed.txt 2>/dev/null || echo 0)," \
     "unviable: $(wc -l < mutants.out/unviable.txt 2>/dev/null || echo 0)," \
     "timeout: $(wc -l < mutants.out/timeout.txt 2>/dev/null || echo 0)"
[ -s mutants.out/missed.txt ] && { echo "=== survivors:"; cat mutants.out/missed.txt; }
exit 0

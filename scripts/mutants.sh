#!/usr/bin/env bash
# Mutation testing of the request path's pure core with cargo-mutants (outside .ci/run: a full
# run is many builds). Each mutant of the listed files must make a unit test of the library
# fail; survivors are printed at the end (mutants.out/missed.txt) and must be killed by a new
# test or explained as equivalent.
#
#   scripts/mutants.sh                       every request-path module of src/core
#   MUTANTS_FILES="src/core/path.rs" scripts/mutants.sh
#
# Environment:
#   MUTANTS_FILES   files to mutate (default: the request-path modules below)
#   MUTANTS_JOBS    parallel builds (default 1: the machine has 2 cores)
#   MUTANTS_TIMEOUT seconds per test run (default 120)
# Installs cargo-mutants when it is missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

FILES="${MUTANTS_FILES:-src/core/path.rs src/core/routes.rs src/core/scope.rs src/core/key.rs src/core/decision.rs src/core/ratelimit.rs src/core/headers.rs}"
if ! cargo mutants --version >/dev/null 2>&1; then
    echo "mutants.sh: installing cargo-mutants" >&2
    cargo install cargo-mutants --locked
fi
args=()
for f in $FILES; do
    args+=(--file "$f")
done
# Only the library's unit tests judge a mutant: the core is pure, and they run in a second.
cargo mutants --jobs "${MUTANTS_JOBS:-1}" --timeout "${MUTANTS_TIMEOUT:-120}" \
    "${args[@]}" -- --lib || true
echo "=== caught: $(wc -l < mutants.out/caught.txt 2>/dev/null || echo 0)," \
     "missed: $(wc -l < mutants.out/missed.txt 2>/dev/null || echo 0)," \
     "unviable: $(wc -l < mutants.out/unviable.txt 2>/dev/null || echo 0)," \
     "timeout: $(wc -l < mutants.out/timeout.txt 2>/dev/null || echo 0)"
[ -s mutants.out/missed.txt ] && { echo "=== survivors:"; cat mutants.out/missed.txt; }
exit 0

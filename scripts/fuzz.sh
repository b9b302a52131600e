#!/usr/bin/env bash
# Runs every cargo-fuzz target (fuzz/fuzz_targets/) for FUZZ_SECONDS each and stops at the
# first crash, printing where libFuzzer saved the crashing input.
#
#   scripts/fuzz.sh                      all targets, 30 s each
#   FUZZ_SECONDS=300 scripts/fuzz.sh jwt_parse config_parse
#
# Environment:
#   FUZZ_SECONDS      time per target (default 30)
#   FUZZ_BUILD_JOBS   cargo build jobs (default 1: the machine is shared)
#   FUZZ_NICE         niceness of builds and runs (default 19)
#   FUZZ_RSS_MB       libFuzzer -rss_limit_mb (default 2048)
# Needs the nightly toolchain; installs cargo-fuzz when it is missing.
# Reproduce a crash:  cd fuzz && cargo +nightly fuzz run <target> <artifact-or-regression-file>
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

FUZZ_SECONDS="${FUZZ_SECONDS:-30}"
FUZZ_BUILD_JOBS="${FUZZ_BUILD_JOBS:-1}"
FUZZ_NICE="${FUZZ_NICE:-19}"
FUZZ_RSS_MB="${FUZZ_RSS_MB:-2048}"
ALL_TARGETS=(key_parse authorization_header jwt_parse config_parse sync_payload path_canonical)
if [ "$#" -gt 0 ]; then
    TARGETS=("$@")
else
    TARGETS=("${ALL_TARGETS[@]}")
fi

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    echo "fuzz.sh: the nightly toolchain is required (rustup toolchain install nightly)" >&2
    exit 2
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    nice -n "$FUZZ_NICE" cargo install cargo-fuzz --locked -j "$FUZZ_BUILD_JOBS"
fi

cd fuzz
export CARGO_BUILD_JOBS="$FUZZ_BUILD_JOBS"

# Build first so the time budget below is all fuzzing (cargo fuzz build has no -j flag;
# CARGO_BUILD_JOBS limits it).
for t in "${TARGETS[@]}"; do
    nice -n "$FUZZ_NICE" cargo +nightly fuzz build "$t"
done

mkdir -p artifacts
summary=()
for t in "${TARGETS[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    log="artifacts/$t/last-run.log"
    # Inputs that once crashed this target are replayed first: a fixed bug must stay fixed.
    regressions=(regressions/"$t"/*)
    if [ -e "${regressions[0]}" ]; then
        echo "=== replaying ${#regressions[@]} regression input(s) for $t"
        nice -n "$FUZZ_NICE" cargo +nightly fuzz run "$t" "${regressions[@]}"
    fi
    echo "=== fuzzing $t for ${FUZZ_SECONDS}s (log: fuzz/$log)"
    set +e
    nice -n "$FUZZ_NICE" cargo +nightly fuzz run "$t" -- \
        -max_total_time="$FUZZ_SECONDS" -rss_limit_mb="$FUZZ_RSS_MB" -print_final_stats=1 \
        2>&1 | tee "$log"
    status="${PIPESTATUS[0]}"
    set -e
    if [ "$status" -ne 0 ]; then
        echo
        echo "fuzz.sh: $t FAILED (exit $status)" >&2
        artifact="$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)"
        if [ -n "$artifact" ]; then
            # libFuzzer prints it relative to fuzz/ (the working directory here) or absolute.
            artifact="$(realpath "$artifact" 2>/dev/null || echo "$artifact")"
            echo "fuzz.sh: crashing input: $artifact" >&2
            echo "fuzz.sh: reproduce with: (cd fuzz && cargo +nightly fuzz run $t $artifact)" >&2
        fi
        echo "fuzz.sh: full log: fuzz/$log" >&2
        exit 1
    fi
    runs="$(sed -n 's/^Done \([0-9]*\) runs in \([0-9]*\) second.*/\1 runs in \2 s/p' "$log" | tail -n 1)"
    eps="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)"
    summary+=("$t: ${runs:-?}, ${eps:-?} exec/s")
done

echo
echo "=== no crashes"
printf '  %s\n' "${summary[@]}"

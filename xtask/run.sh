#!/usr/bin/env bash
# Runs the etap test binaries of this bundle (made by `cargo xtask bundle`) on a GPU machine
# that has no Rust toolchain, then the benchmark if one was bundled, then (with --sanitize)
# compute-sanitizer over the decode kernels.
#
# Usage: ./run.sh [--sanitize] [ARGS...]
#   ARGS (e.g. a test-name filter such as `gemm`) are passed to every test binary, after
#   `--test-threads=1` (the GPU tests share one device). With ARGS the benchmark is skipped.
# Without ARGS, `./etap-bench --quick` runs last and writes results.{csv,json,svg} to
# $ETAP_BENCH_OUT (default: target/bench under this folder).
# --sanitize (or ETAP_SANITIZE=1): afterwards, run compute-sanitizer's memcheck, racecheck and
# synccheck over `tests/gpu_decode --exact sanitizer_cases` (a small set of decode cases: both
# layouts, split and unsplit requests, s_q 1-3, both dtypes), print one summary line per tool
# and fail on any error or hazard. compute-sanitizer
# is looked up on PATH, then in $CUDA_HOME/bin, /usr/local/cuda/bin and /usr/local/cuda-*/bin;
# asked for and not found is a failure. Full logs go to $ETAP_SANITIZE_OUT (default:
# target/sanitizer under this folder). Slow: racecheck takes minutes.
# Exit status: 0 when every binary (and every sanitizer run) passed, 1 otherwise.
#
# ETAP_REQUIRE_GPU=1 is exported (unless already set): a GPU test that finds no CUDA device
# fails instead of skipping, since this runner is meant for the GPU machine. Set
# ETAP_REQUIRE_GPU=0 to let them skip (a dry run elsewhere).
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here" || exit 1
export RUST_BACKTRACE=1
export ETAP_REQUIRE_GPU="${ETAP_REQUIRE_GPU:-1}"
echo "run.sh: ETAP_REQUIRE_GPU=$ETAP_REQUIRE_GPU"

sanitize=0
case "${ETAP_SANITIZE:-0}" in "" | 0) ;; *) sanitize=1 ;; esac
if [ "${1:-}" = "--sanitize" ]; then
    sanitize=1
    shift
fi

[ -f BUNDLE.txt ] && cat BUNDLE.txt
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
else
    echo "run.sh: nvidia-smi not found"
fi

shopt -s nullglob
tests=(tests/*)
if [ ${#tests[@]} -eq 0 ]; then
    echo "run.sh: no test binaries in $here/tests" >&2
    exit 1
fi

passed=()
failed=()
for t in "${tests[@]}"; do
    name="$(basename "$t")"
    echo
    echo "=== $name"
    if "./$t" --test-threads=1 "$@"; then
        passed+=("$name")
    else
        failed+=("$name (exit $?)")
    fi
done

if [ $# -eq 0 ] && [ -x ./etap-bench ]; then
    echo
    bench_out="${ETAP_BENCH_OUT:-target/bench}"
    echo "=== etap-bench --quick --out $bench_out"
    if ./etap-bench --quick --out "$bench_out"; then
        passed+=("etap-bench")
    else
        failed+=("etap-bench (exit $?)")
    fi
fi

# compute-sanitizer: the path of the tool, or nothing.
find_sanitizer() {
    local c
    if command -v compute-sanitizer >/dev/null 2>&1; then
        command -v compute-sanitizer
        return 0
    fi
    for c in ${CUDA_HOME:+"$CUDA_HOME/bin/compute-sanitizer"} /usr/local/cuda/bin/compute-sanitizer \
        /usr/local/cuda-*/bin/compute-sanitizer; do
        if [ -x "$c" ]; then
            echo "$c"
            return 0
        fi
    done
    return 1
}

# One tool over the sanitizer cases: prints its summary line, PASS or FAIL. Passes only when
# the run exits 0, the tests pass, and the tool's summary is there and counts nothing: memcheck
# and synccheck print `ERROR SUMMARY: N errors`, racecheck prints only `RACECHECK SUMMARY: N
# hazards displayed (N errors, N warnings)`.
sanitize_one() {
    local cs="$1" tool="$2" log="$3/$2.log" rc summary errors hazards verdict
    "$cs" --tool "$tool" --error-exitcode 86 ./tests/gpu_decode --exact sanitizer_cases --test-threads=1 \
        >"$log" 2>&1
    rc=$?
    summary="$(grep -E '(ERROR|RACECHECK) SUMMARY' "$log" | sed -E 's/^=+ *//' | paste -sd ';' -)"
    errors="$(grep -Eo 'ERROR SUMMARY: [0-9]+' "$log" | grep -Eo '[0-9]+$' | tail -n 1)"
    hazards="$(grep -Eo 'RACECHECK SUMMARY: [0-9]+' "$log" | grep -Eo '[0-9]+$' | tail -n 1)"
    local counted="${errors:-none}"
    [ "$tool" = racecheck ] && counted="${hazards:-none}"
    verdict=FAIL
    if [ "$rc" -eq 0 ] && [ "$counted" = 0 ] && grep -q '^test result: ok. 1 passed' "$log"; then
        verdict=PASS
    fi
    sanitizer_lines+=("sanitizer $tool: ${summary:-no summary} (exit $rc): $verdict")
    if [ "$verdict" = PASS ]; then
        passed+=("sanitizer-$tool")
    else
        failed+=("sanitizer-$tool (exit $rc; log $log)")
        tail -n 40 "$log"
    fi
}

sanitizer_lines=()
if [ "$sanitize" -eq 1 ]; then
    echo
    if [ ! -x tests/gpu_decode ]; then
        failed+=("sanitizer (no tests/gpu_decode in the bundle)")
    elif cs="$(find_sanitizer)"; then
        san_out="${ETAP_SANITIZE_OUT:-target/sanitizer}"
        mkdir -p "$san_out"
        echo "=== compute-sanitizer ($cs): memcheck, racecheck, synccheck over gpu_decode sanitizer_cases; logs in $san_out"
        "$cs" --version 2>/dev/null | tail -n 1
        for tool in memcheck racecheck synccheck; do
            echo "--- $tool"
            sanitize_one "$cs" "$tool" "$san_out"
            echo "${sanitizer_lines[-1]}"
        done
    else
        failed+=("sanitizer (compute-sanitizer not found on PATH, \$CUDA_HOME/bin or /usr/local/cuda*/bin)")
    fi
fi

echo
for l in ${sanitizer_lines[@]+"${sanitizer_lines[@]}"}; do echo "$l"; done
for p in ${passed[@]+"${passed[@]}"}; do echo "PASS $p"; done
for f in ${failed[@]+"${failed[@]}"}; do echo "FAIL $f"; done
echo "run.sh summary: ${#passed[@]} passed, ${#failed[@]} failed"
[ ${#failed[@]} -eq 0 ]

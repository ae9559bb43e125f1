#!/usr/bin/env bash
# Runs the etap test binaries of this bundle (made by `cargo xtask bundle`) on a GPU machine
# that has no Rust toolchain, then the benchmark if one was bundled.
#
# Usage: ./run.sh [ARGS...]
#   ARGS (e.g. a test-name filter such as `gemm`) are passed to every test binary, after
#   `--test-threads=1` (the GPU tests share one device). With ARGS the benchmark is skipped.
# Without ARGS, `./etap-bench --quick` runs last and writes results.{csv,json,svg} to
# $ETAP_BENCH_OUT (default: target/bench under this folder).
# Exit status: 0 when every binary passed, 1 otherwise.
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

echo
for p in ${passed[@]+"${passed[@]}"}; do echo "PASS $p"; done
for f in ${failed[@]+"${failed[@]}"}; do echo "FAIL $f"; done
echo "run.sh summary: ${#passed[@]} passed, ${#failed[@]} failed"
[ ${#failed[@]} -eq 0 ]

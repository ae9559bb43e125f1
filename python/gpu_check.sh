#!/usr/bin/env bash
# The etap Python package's GPU checks, for a machine with Hopper GPUs, torch and pytest, and no
# internet. Installs the given wheel into a temporary folder (pip --no-deps: torch is the
# machine's own), then runs:
#   1. the host-side and GPU pytest suites (tests/test_host.py, tests/test_gpu.py: FlashMLA's matrix
#      and the shapes of issue 13: h_q 1-128, s_q 1-8, cache pages of 16/32/64/128 rows, and its
#      packed query layout: 0-8 tokens a request through cu_seqlens_q; tests/test_fp8_*.py: the
#      FP8 caches of issue 14, FlashMLA's 656-byte format and per-tensor e4m3, their quantizers),
#   2. the CUDA-graph tests (tests/test_graph.py, FP8 caches included),
#   3. the two-GPU example with torchrun --nproc-per-node 2 (tensor and context parallel),
# with ETAP_REQUIRE_GPU=1 (a missing GPU or torch fails rather than skips), and prints a summary.
#
# Usage (from the repository root): bash python/gpu_check.sh path/to/etap-*.whl
# Env: PYTHON (default python3), GPU_CHECK_KEEP=1 keeps the install folder.
set -uo pipefail

wheel="${1:?usage: bash python/gpu_check.sh path/to/etap-*.whl}"
[ -f "$wheel" ] || { echo "gpu_check: no wheel at $wheel" >&2; exit 2; }
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${PYTHON:-python3}"
site="$(mktemp -d /tmp/etap-gpu-check.XXXXXX)"
[ "${GPU_CHECK_KEEP:-0}" = 1 ] || trap 'rm -rf "$site"' EXIT

echo "== etap GPU check: $(basename "$wheel") [$(date -u +%H:%M:%S)]"
if "$py" -m pip --version >/dev/null 2>&1; then
    "$py" -m pip install --no-deps --no-index --disable-pip-version-check --quiet --target "$site" "$wheel" || {
        echo "gpu_check: pip install of the wheel failed" >&2
        exit 2
    }
else
    # No pip: a wheel is a zip whose top level is the install folder's content.
    echo "gpu_check: no pip for $py; unpacking the wheel instead"
    "$py" -m zipfile -e "$wheel" "$site" || exit 2
fi
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
export ETAP_REQUIRE_GPU=1
"$py" - <<'PY' || exit 2
import etap, torch
print(f"etap {etap.__version__} from {etap.__file__}")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s):",
      ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))
PY
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=index,name,driver_version --format=csv,noheader

declare -a names results
run() {
    local name="$1"
    shift
    echo
    echo "== $name [$(date -u +%H:%M:%S)]: $*"
    local t0=$SECONDS
    "$@"
    local rc=$?
    names+=("$name")
    results+=("$( [ $rc -eq 0 ] && echo PASS || echo "FAIL (exit $rc)" ) in $((SECONDS - t0)) s")
}

# From tests/, so that the source folder python/etap does not shadow the installed wheel.
cd "$here/tests"
# -p no:cacheprovider: the checkout may be read-only. -rs: print every skip's reason.
run "pytest: host-side + GPU matrix, h_q/s_q/page sizes, errors, devices, merge, custom op, bench" \
    "$py" -m pytest -p no:cacheprovider -q -rs --maxfail=25 test_host.py test_gpu.py test_ops.py
run "pytest: FP8 caches (issue 14): checks, quantizers, GPU against the dequantized reference" \
    "$py" -m pytest -p no:cacheprovider -q -rs --maxfail=25 test_fp8_host.py test_fp8_quant.py test_fp8_gpu.py
run "pytest: CUDA graphs (capture, many replays)" \
    "$py" -m pytest -p no:cacheprovider -q -rs --maxfail=25 test_graph.py
if [ "$("$py" -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
    run "torchrun --nproc-per-node 2: TP and CP" \
        "$py" -m torch.distributed.run --nproc-per-node 2 ../examples/two_gpu.py
else
    names+=("torchrun --nproc-per-node 2: TP and CP")
    results+=("FAIL (fewer than two GPUs visible)")
fi

echo
echo "== summary"
fail=0
for i in "${!names[@]}"; do
    printf '  %-58s %s\n' "${names[$i]}" "${results[$i]}"
    case "${results[$i]}" in PASS*) ;; *) fail=1 ;; esac
done
[ $fail -eq 0 ] && echo "ALL PASS" || echo "SOME FAILED"
exit $fail

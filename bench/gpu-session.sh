#!/usr/bin/env bash
# One GPU session's runs, as session 6 made them, for a device machine that has no Rust: build
# here (`cargo xtask bundle`, and `maturin build` for the wheel, which .ci/run does), copy the
# peers' sources into the repository (`cp -r ../shared/peers .peers`, git-ignored through
# .git/info/exclude), carry `target/bundle`, `target/wheels` and `.peers`, then run one step a
# call, chaining the calls within the machine's idle time (the peers' build and the first call's
# files survive only while the machine is held):
#
#   bash bench/gpu-session.sh tests    # peers' build in the background; the bundle's tests in the
#                                      # GPU-required mode with the sanitizers; the Python checks
#   bash bench/gpu-session.sh bench    # etap-bench (serving mode and per call), then the peers on
#                                      # the same batches (bench/peers.py), ratios printed last
#
# Logs go to $OUT (the device tool's folder that comes back), at most 8 files.
set -u
out="${OUT:-/tmp/etap-out}"
mkdir -p "$out"
peers_dir=/root/peerbuild
case "${1:-}" in
tests)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    if [ -d .peers ] && [ ! -f "$peers_dir/env.sh" ]; then
        mkdir -p "$peers_dir"
        (setsid bash .peers/build.sh "$peers_dir" >"$peers_dir/build.log" 2>&1 &)
    fi
    (cd target/bundle && ETAP_SANITIZE_OUT=/root/san ./run.sh --sanitize '' >"$out/bundle.log" 2>&1)
    echo "bundle rc=$?"
    wheel=$(ls target/wheels/etap-*.whl 2>/dev/null | head -1)
    if [ -n "$wheel" ]; then
        bash python/gpu_check.sh "$wheel" >"$out/python.log" 2>&1
        echo "python rc=$?"
        tail -6 "$out/python.log"
    fi
    grep -E "^sanitizer |^PASS|^FAIL|summary" "$out/bundle.log"
    ;;
bench)
    for _ in $(seq 1 60); do [ -f "$peers_dir/env.sh" ] && break; sleep 5; done
    (cd target/bundle && ./etap-bench --out /root/bench >"$out/bench.log" 2>&1)
    echo "etap-bench rc=$?"
    cp /root/bench/results.json /root/bench/results.csv "$out/"
    grep -E "^[a-z0-9-]+ +(bf16|f16)|copy roof|checks passed|FAILED" "$out/bench.log"
    if [ -f "$peers_dir/env.sh" ]; then
        # shellcheck disable=SC1091
        . "$peers_dir/env.sh"
        PYTHONPATH="$FLASHMLA:$FA3" python3 bench/peers.py /root/bench/results.json >"$out/peers.log" 2>&1
        echo "peers rc=$?"
        cp /root/bench/peers.json "$out/" 2>/dev/null
        grep -v "^  " "$out/peers.log"
    else
        echo "the peers are not built: run the 'tests' step first on this machine"
    fi
    ;;
*)
    echo "usage: bash bench/gpu-session.sh tests|bench" >&2
    exit 2
    ;;
esac

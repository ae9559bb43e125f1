#!/usr/bin/env bash
# One GPU session's runs, as sessions 6 and 7 made them, for a device machine that has no Rust: build
# here (`cargo xtask bundle`, and `maturin build` for the wheel, which .ci/run does), copy the
# peers' sources into the repository (`cp -r ../shared/peers .peers`, git-ignored through
# .git/info/exclude), carry `target/bundle`, `target/wheels` and `.peers`, then run one step a
# call, chaining the calls within the machine's idle time (the peers' build and the first call's
# files survive only while the machine is held):
#
#   bash bench/gpu-session.sh tests    # peers' build in the background; the bundle's tests in the
#                                      # GPU-required mode with the sanitizers; the Python checks
#   bash bench/gpu-session.sh bench    # etap-bench (serving mode and per call), then the peers on
#                                      # the same batches (bench/peers.py), ratios printed last;
#                                      # bench/serving_table.py turns the results.json and
#                                      # peers.json it brings back into perf-notes' table
#   bash bench/gpu-session.sh shapes   # issue 13's table: page sizes, head counts, s_q, packed
#   bash bench/gpu-session.sh fp8      # issue 14: the FP8 tests with memcheck/racecheck (and the
#                                      # Python FP8 and custom-op tests if the wheel is carried), the FP8
#                                      # serving table beside bf16 on the issue's shapes and
#                                      # either side of the switch to heads on M
#                                      # (bench/serving_table.py --fp8 makes perf-notes' table)
#   bash bench/gpu-session.sh candidate A [LIMIT]
#                                      # one call for a kernel change when device time is short
#                                      # (session 9): the bundle's FP8, API and graph tests, the
#                                      # FP8 sanitizers, an A/B of etap-bench A (the base; BIN@PTX
#                                      # as in ab) against the bundle's, the Python FP8 and graph
#                                      # tests, then gpu_decode, each step only while LIMIT
#                                      # seconds (default 480) allow it
#   bash bench/gpu-session.sh ncu TAG BIN REGEX [ARGS...]
#                                      # Nsight Compute (full set) of the third launch of the
#                                      # kernel matching REGEX in etap-bench BIN run per call with
#                                      # ARGS (e.g. --shape 16,1,128,65536; an FP8 format needs
#                                      # --layers 1 too: FP8 configurations are timed in serving
#                                      # mode only, so per call the kernel runs once): the
#                                      # details page and the SASS with its stall samples (gzip),
#                                      # files named by TAG
#   bash bench/gpu-session.sh ab A B [C...]
#                                      # an A/B of etap-bench binaries (A: the base; each built
#                                      # here from its commit and carried; BIN@PTX runs BIN with
#                                      # the kernels of PTX, through ETAP_PTX), interleaved twice
#                                      # on the same configurations ($AB_ARGS, default: the FP8
#                                      # table's shapes and formats and the short bf16 shapes),
#                                      # so that run-to-run drift shows; each run within
#                                      # $AB_SIDE_LIMIT seconds (default 120)
#
# Logs go to $OUT (the device tool's folder that comes back), at most 8 files.
set -u
out="${OUT:-/tmp/etap-out}"
mkdir -p "$out"
peers_dir=/root/peerbuild
# compute-sanitizer: on PATH or under a CUDA install.
san=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
# The A/B steps' configurations: $AB_ARGS, else the FP8 table's shapes and formats beside the
# short bf16 shapes.
# shellcheck disable=SC2206
ab_args=(${AB_ARGS:---iters 20 --kv 16,fp8-656,fp8-tensor --shape 16,1,16,1024 --shape 16,1,16,16384 --shape 16,1,16,65536 --shape 64,1,16,8192})
# The A/B steps' columns of results.csv: config, dtype, per-call µs, rel err, lse diff, serving
# µs shuffled / contiguous, status.
ab_cols=3,4,15,21,22,23,24,26
# Hazard reports per kernel in a racecheck log (each report names two accesses, kernel+offset):
# the summary alone does not say which kernel (session 19 found the wide FP8 kernel's hazards
# only in its bf16-q variants this way).
per_kernel() { grep -oE 'etap_[a-z0-9_]+\+0x[0-9a-f]+' "$1" | sed 's/+0x.*//' | sort | uniq -c; }
# Run an A/B side within LIMIT seconds: SIDE is an etap-bench binary, or BIN@PTX for BIN with the
# kernels of PTX (through ETAP_PTX). A side that hangs (an untried kernel's deadlock) costs its
# own limit, not the call's.
run_side() { # LIMIT SIDE ARGS...
    local limit=$1 side=$2 bin ptx=
    shift 2
    bin=${side%%@*}
    [ "$bin" != "$side" ] && ptx=$(realpath "${side#*@}")
    timeout "$limit" env ${ptx:+ETAP_PTX=$ptx} "$bin" "$@"
}
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
shapes)
    B=target/bundle/etap-bench
    $B --out /root/s1 --iters 20 --shape 16,1,16,16384 --shape 16,1,16,65536 --shape 128,1,16,1024 --pages 16,32,64,128 >"$out/pages.log" 2>&1
    echo "pages rc=$?"; cp /root/s1/results.csv "$out/pages.csv"
    $B --out /root/s2 --iters 20 $(for h in 1 3 6 8 12 16 20 24 32 48 64 96 127 128; do echo --shape 16,1,$h,65536; done) >"$out/heads.log" 2>&1
    echo "heads rc=$?"; cp /root/s2/results.csv "$out/heads.csv"
    $B --out /root/s3 --iters 20 --packed $(for s in 1 2 3 4 5 6 7 8; do echo --shape 16,$s,16,16384; done) >"$out/sq.log" 2>&1
    echo "s_q and packed rc=$?"; cp /root/s3/results.csv "$out/sq.csv"
    ;;
fp8)
    (cd target/bundle && ETAP_REQUIRE_GPU=1 ./tests/gpu_fp8 --test-threads=1 --nocapture >"$out/fp8-tests.log" 2>&1)
    echo "fp8 tests rc=$?"; grep -E "^fp8|test result" "$out/fp8-tests.log"
    for tool in memcheck racecheck; do
        (cd target/bundle && ETAP_REQUIRE_GPU=1 "$san" --tool $tool ./tests/gpu_fp8 --test-threads=1 fp8_caches >"/root/san-$tool.log" 2>&1)
        echo "$tool rc=$? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' /root/san-$tool.log)"
    done
    per_kernel /root/san-racecheck.log
    # Pages at other strides move every address the kernels read: memcheck on them too.
    (cd target/bundle && ETAP_REQUIRE_GPU=1 "$san" --tool memcheck ./tests/gpu_fp8 --test-threads=1 fp8_page_strides \
        >/root/san-strides.log 2>&1)
    echo "memcheck page strides rc=$? $(grep -E 'ERROR SUMMARY' /root/san-strides.log)"
    # The Python FP8 tests and the custom ops on the same kernels (the wheel, when carried).
    wheel=$(ls target/wheels/etap-*.whl 2>/dev/null | head -1)
    if [ -n "$wheel" ]; then
        site=$(mktemp -d)
        python3 -m pip install --no-deps --no-index -q --target "$site" "$wheel"
        (cd python/tests && PYTHONPATH=$site ETAP_REQUIRE_GPU=1 timeout 120 python3 -m pytest -p no:cacheprovider -q -rs \
            test_fp8_gpu.py test_ops.py >"$out/fp8-python.log" 2>&1)
        echo "python fp8 rc=$? $(tail -1 "$out/fp8-python.log")"
    fi
    # Issue 14's shapes: the memory-bound ones (b16 h16 16K-64K, b64 8K, varlen) and the
    # compute-bound ones (h128, s_q 2 x h64), each with the 16-bit cache beside the FP8 formats;
    # and either side of the plan's switch to heads on M at 33 columns (s_q 2 x h16 and h64 at
    # 64K).
    target/bundle/etap-bench --out /root/f1 --iters 10 --kv 16,fp8-656,fp8-tensor \
        --only b16-sq1-h16-sk16k,b16-sq1-h16-sk32k,b16-sq1-h16-sk64k,b64-sq1-h16-sk8k,b32-sq1-h16-varlen8k,b16-sq2-h16-sk64k,b16-sq1-h64-sk64k,b16-sq2-h64-sk4k,b64-sq1-h128-sk4k,b16-sq1-h128-sk16k,b16-sq1-h128-sk64k \
        >"$out/fp8-bench.log" 2>&1
    echo "fp8 bench rc=$?"; cp /root/f1/results.csv "$out/fp8.csv"
    # For `python3 bench/serving_table.py --fp8 DIR/fp8 [DIR of the bench step]`.
    mkdir -p "$out/fp8"; cp /root/f1/results.json "$out/fp8/"
    ;;
ab)
    # Sides: etap-bench binaries, each optionally with a PTX file to run instead of its own
    # (BIN@PTX, through ETAP_PTX).
    shift
    [ $# -ge 2 ] || { echo "ab needs two or more sides" >&2; exit 2; }
    for i in 1 2; do
        k=0
        for side in "$@"; do
            k=$((k + 1))
            run_side "${AB_SIDE_LIMIT:-120}" "$side" --out "/root/ab-$k-$i" "${ab_args[@]}" >"/root/ab-$k-$i.log" 2>&1
            echo "$side round $i rc=$?"
        done
    done
    for i in 1 2; do
        k=0
        for side in "$@"; do
            k=$((k + 1))
            echo "== $side round $i"; cut -d, -f$ab_cols "/root/ab-$k-$i/results.csv"
        done
    done | tee "$out/ab.txt"
    ;;
candidate)
    base="${2:?candidate needs the base etap-bench binary}"
    limit="${3:-480}" t0=$SECONDS
    left() { [ $((SECONDS - t0)) -lt "$1" ]; }
    run_test() { # name timeout command...
        local name=$1 to=$2
        shift 2
        (cd target/bundle && ETAP_REQUIRE_GPU=1 timeout "$to" "$@" >"/root/$name.log" 2>&1)
        echo "$name rc=$? t=$((SECONDS - t0)) $(grep -hE 'test result|ERROR SUMMARY|RACECHECK SUMMARY' "/root/$name.log" | tr '\n' ' ')" | tee -a "$out/candidate.log"
    }
    run_test fp8 90 ./tests/gpu_fp8 --test-threads=1 --nocapture
    grep -hE "^fp8 |panicked" /root/fp8.log | tee -a "$out/candidate.log"
    run_test api 30 ./tests/gpu_api --test-threads=1
    run_test graph 60 ./tests/gpu_graph --test-threads=1
    run_test fp8-memcheck 60 "$san" --tool memcheck ./tests/gpu_fp8 --test-threads=1 fp8_caches
    run_test fp8-racecheck 60 "$san" --tool racecheck ./tests/gpu_fp8 --test-threads=1 fp8_caches
    per_kernel /root/fp8-racecheck.log | tee -a "$out/candidate.log"
    for side in base new; do
        left $((limit - 100)) || break
        bin=$base; [ $side = new ] && bin=target/bundle/etap-bench
        run_side 90 "$bin" --out "/root/cand-$side" "${ab_args[@]}" >"/root/cand-$side.log" 2>&1
        echo "ab $side rc=$? t=$((SECONDS - t0))" | tee -a "$out/candidate.log"
        echo "== $side" >>"$out/ab.txt"
        cut -d, -f$ab_cols "/root/cand-$side/results.csv" >>"$out/ab.txt"
    done
    wheel=$(ls target/wheels/etap-*.whl 2>/dev/null | head -1)
    if [ -n "$wheel" ] && left $((limit - 90)); then
        site=$(mktemp -d)
        python3 -m pip install --no-deps --no-index -q --target "$site" "$wheel"
        (cd python/tests && PYTHONPATH=$site ETAP_REQUIRE_GPU=1 timeout 90 python3 -m pytest -p no:cacheprovider -q -rs \
            test_fp8_gpu.py test_graph.py >"$out/python.log" 2>&1)
        echo "python rc=$? t=$((SECONDS - t0)) $(tail -1 "$out/python.log")" | tee -a "$out/candidate.log"
    fi
    left $((limit - 30)) && run_test decode $((limit - (SECONDS - t0) - 10)) ./tests/gpu_decode --test-threads=1
    ;;
ncu)
    tag="${2:?ncu needs TAG BIN REGEX [ARGS]}" bin="${3:?}" regex="${4:?}"
    shift 4
    ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
    timeout 300 "$ncu" --clock-control none --set full --import-source no --kernel-name "regex:$regex" \
        --launch-skip 2 --launch-count 1 -f -o "/root/ncu-$tag" "$bin" --out /root/ncu-bench --iters 3 \
        --layers 0 "$@" >"/root/ncu-$tag.log" 2>&1
    echo "ncu $tag rc=$?"; grep -E "==ERROR==|==WARNING==|FAILED" "/root/ncu-$tag.log" | head -5
    "$ncu" --import "/root/ncu-$tag.ncu-rep" --page details >"$out/ncu-$tag-details.txt" 2>&1
    "$ncu" --import "/root/ncu-$tag.ncu-rep" --page source --print-source sass --csv 2>&1 | gzip >"$out/ncu-$tag-sass.csv.gz"
    grep -E "Duration|DRAM Throughput|Memory Throughput|Issue Slots|No Eligible" "$out/ncu-$tag-details.txt" | head -12
    ;;
*)
    echo "usage: bash bench/gpu-session.sh tests|bench|shapes|fp8|candidate A [LIMIT]|ncu TAG BIN REGEX [ARGS]|ab A B [C...]" >&2
    exit 2
    ;;
esac

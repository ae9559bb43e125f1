#!/usr/bin/env python3
"""Serving-mode timing of the peer MLA decode kernels on etap-bench's own batches, and the ratio
table etap / best peer.

Usage (on the GPU machine, after ../shared/peers/build.sh OUT and etap-bench):
    PYTHONPATH=$FLASHMLA:$FA3 python3 bench/peers.py target/bench/results.json [--layers 61] [--only a,b]

For each bf16 configuration in etap-bench's results.json (the same seqlens, s_q, h): L layers,
each with its own paged cache (pages of 64), one CUDA graph holding the L calls, median of 20
replays / L, with the block table contiguous and shuffled, as etap-bench times etap. The peers'
metadata (get_mla_metadata / get_scheduler_metadata) is made outside the graph, as etap's plan
is. Peers that do not import are left out. Prints one table and writes peers.json beside the
input. This script calls the peers' public Python functions; it contains none of their code.
"""
import json
import math
import os
import subprocess
import sys

import torch

D, DV, PAGE = 576, 512, 64
REPLAYS, WARM = 20, 3


def peers():
    found = {}
    try:
        from flash_mla import flash_mla_with_kvcache, get_mla_metadata

        def flashmla(q, caches, bt, sl, s_q, h):
            md, ns = get_mla_metadata(sl, s_q * h, 1)
            return [lambda kc=kc: flash_mla_with_kvcache(q, kc, bt, sl, DV, md, ns, causal=True) for kc in caches]

        found["FlashMLA"] = flashmla
    except ImportError as e:
        print(f"peers.py: FlashMLA not importable ({e})", flush=True)
    try:
        from flash_attn_interface import flash_attn_with_kvcache, get_scheduler_metadata

        def fa3(q, caches, bt, sl, s_q, h):
            b = q.shape[0]
            md = get_scheduler_metadata(b, s_q, int(sl.max()), h, 1, D - DV, sl, q.dtype, headdim_v=DV,
                                        page_size=PAGE, causal=True)
            scale = 1 / math.sqrt(D)
            return [lambda kc=kc: flash_attn_with_kvcache(q[..., DV:], kc[..., DV:], kc[..., :DV], qv=q[..., :DV],
                                                          cache_seqlens=sl, page_table=bt, softmax_scale=scale,
                                                          causal=True, scheduler_metadata=md,
                                                          return_softmax_lse=True) for kc in caches]

        found["FA3"] = fa3
    except ImportError as e:
        print(f"peers.py: FlashAttention-3 not importable ({e})", flush=True)
    return found


def time_serving(make, seqlens, s_q, h, layers, shuffled, dev):
    b = len(seqlens)
    sl = torch.tensor(seqlens, dtype=torch.int32, device=dev)
    per = [max(1, -(-s // PAGE)) for s in seqlens]
    width = max(per)
    total = sum(per)
    ids = torch.randperm(total, device=dev, dtype=torch.int32) if shuffled else torch.arange(total, device=dev,
                                                                                              dtype=torch.int32)
    bt = torch.zeros(b, width, dtype=torch.int32, device=dev)
    at = 0
    for r, n in enumerate(per):
        bt[r, :n] = ids[at:at + n]
        at += n
    cache_bytes = total * PAGE * D * 2
    free, _ = torch.cuda.mem_get_info()
    layers = max(1, min(layers, int(free * 0.85 / cache_bytes)))
    q = torch.randn(b, s_q, h, D, dtype=torch.bfloat16, device=dev)
    caches = [torch.randn(total, PAGE, 1, D, dtype=torch.bfloat16, device=dev) for _ in range(layers)]
    fns = make(q, caches, bt, sl, s_q, h)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        for f in fns:
            f()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=s):
            for f in fns:
                f()
        for _ in range(WARM):
            g.replay()
        torch.cuda.synchronize()
        ts = []
        for _ in range(REPLAYS):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            g.replay()
            e1.record()
            e1.synchronize()
            ts.append(e0.elapsed_time(e1) * 1000 / layers)
    del g, fns, caches
    torch.cuda.empty_cache()
    ts.sort()
    return ts[len(ts) // 2], layers


def one(argv):
    """`--one PEER S_Q H LAYERS SEQLENS`: time one batch on one peer in this process, both tables;
    prints `RESULT shuffled|contiguous us layers`."""
    peer, s_q, h, layers, seqlens = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), argv[4]
    torch.manual_seed(0)
    make = peers()[peer]
    for mode in ("shuffled", "contiguous"):
        us, n = time_serving(make, [int(x) for x in seqlens.split(",")], s_q, h, layers, mode == "shuffled",
                             torch.device("cuda:0"))
        print(f"RESULT {mode} {us} {n}", flush=True)


def run_one(peer, r, layers):
    """One batch on one peer in a child process (a peer's fault, an illegal address say, then
    spoils only its own case, not the CUDA context of the rest): {table: us}, NaN where it failed."""
    args = [sys.executable, __file__, "--one", peer, str(r["s_q"]), str(r["h_q"]), str(layers),
            ",".join(str(x) for x in r["seqlens"])]
    got = {"shuffled": float("nan"), "contiguous": float("nan")}
    try:
        p = subprocess.run(args, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        print(f"  {peer} {r['config']}: timed out", flush=True)
        return got
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            got[line.split()[1]] = float(line.split()[2])
    if any(v != v for v in got.values()):
        err = (p.stderr.strip().splitlines() or ["no output"])
        msg = next((l for l in reversed(err) if "Error" in l), err[-1])
        print(f"  {peer} {r['config']}: failed: {msg[:160]}", flush=True)
    return got


def main():
    if sys.argv[1] == "--one":
        return one(sys.argv[2:])
    path = sys.argv[1]
    layers = int(sys.argv[sys.argv.index("--layers") + 1]) if "--layers" in sys.argv else 61
    only = sys.argv[sys.argv.index("--only") + 1].split(",") if "--only" in sys.argv else None
    doc = json.load(open(path))
    copy = doc["copy_gbps"]
    found = list(peers())
    out = []
    print(f"serving mode on {doc['card']}, copy {copy:.0f} GB/s, {layers} layers, us per layer "
          f"(peers each in their own process)")
    print(f"{'config':<26} {'table':<6} {'etap us':>8} " + " ".join(f"{p + ' us':>12}" for p in found)
          + f" {'etap/best':>9}", flush=True)
    for r in doc["results"]:
        if r["dtype"] != "bf16" or r.get("serving_us_per_layer_shuffled") is None:
            continue
        if only and not any(o in r["config"] for o in only):
            continue
        row = {"config": r["config"], "etap": {}, "peers": {}, "ratio": {}}
        peer_times = {p: run_one(p, r, layers) for p in found}
        for mode, key in (("shuffled", "serving_us_per_layer_shuffled"),
                          ("contiguous", "serving_us_per_layer_contiguous")):
            etap_us = r[key]
            times = [peer_times[p][mode] for p in found]
            best = min((t for t in times if t == t), default=float("nan"))
            ratio = etap_us / best
            row["etap"][mode] = etap_us
            for p, t in zip(found, times):
                row["peers"].setdefault(p, {})[mode] = t
            row["ratio"][mode] = ratio
            print(f"{r['config']:<26} {mode[:6]:<6} {etap_us:>8.1f} " + " ".join(f"{t:>12.1f}" for t in times)
                  + f" {ratio:>9.3f}", flush=True)
        out.append(row)
    dst = os.path.join(os.path.dirname(path), "peers.json")
    json.dump({"card": doc["card"], "copy_gbps": copy, "layers": layers, "rows": out}, open(dst, "w"), indent=1)
    print(f"wrote {dst}")


if __name__ == "__main__":
    main()

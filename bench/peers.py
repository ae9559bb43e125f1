#!/usr/bin/env python3
"""Serving-mode timing of the peer MLA decode kernels on etap-bench's own batches, and the ratio
table etap / best peer.

Usage (on the GPU machine, after ../shared/peers/build.sh OUT and etap-bench):
    PYTHONPATH=$FLASHMLA:$FA3 python3 bench/peers.py target/bench/results.json [--layers 61]

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


def main():
    path = sys.argv[1]
    layers = int(sys.argv[sys.argv.index("--layers") + 1]) if "--layers" in sys.argv else 61
    doc = json.load(open(path))
    copy = doc["copy_gbps"]
    dev = torch.device("cuda:0")
    torch.manual_seed(0)
    found = peers()
    out = []
    head = (f"{'config':<26} {'layout':<6} {'etap us':>8} " + " ".join(f"{p + ' us':>10}" for p in found)
            + f" {'etap/best':>9}  ({'shuffled | contiguous'})")
    print(f"serving mode on {doc['card']}, copy {copy:.0f} GB/s, {layers} layers, us per layer")
    print(head, flush=True)
    for r in doc["results"]:
        if r["dtype"] != "bf16" or r.get("serving_us_per_layer_shuffled") is None:
            continue
        row = {"config": r["config"], "etap": {}, "peers": {}}
        cells = []
        for mode, key in (("shuffled", "serving_us_per_layer_shuffled"), ("contiguous", "serving_us_per_layer_contiguous")):
            etap_us = r[key]
            row["etap"][mode] = etap_us
            best = None
            times = []
            for name, make in found.items():
                try:
                    us, n = time_serving(make, r["seqlens"], r["s_q"], r["h_q"], layers, mode == "shuffled", dev)
                except Exception as e:  # a peer that cannot run a shape (or runs out of memory)
                    print(f"  {name} {r['config']} {mode}: {type(e).__name__}: {e}", flush=True)
                    us = float("nan")
                row["peers"].setdefault(name, {})[mode] = us
                times.append(us)
                if us == us and (best is None or us < best):
                    best = us
            ratio = etap_us / best if best else float("nan")
            row.setdefault("ratio", {})[mode] = ratio
            cells.append((etap_us, times, ratio))
        for mode, (etap_us, times, ratio) in zip(("shuf", "contig"), cells):
            print(f"{r['config']:<26} {mode:<6} {etap_us:>8.1f} " + " ".join(f"{t:>10.1f}" for t in times)
                  + f" {ratio:>9.3f}", flush=True)
        out.append(row)
    dst = os.path.join(os.path.dirname(path), "peers.json")
    json.dump({"card": doc["card"], "copy_gbps": copy, "layers": layers, "rows": out}, open(dst, "w"), indent=1)
    print(f"wrote {dst}")


if __name__ == "__main__":
    main()

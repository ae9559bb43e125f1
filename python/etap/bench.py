"""``python -m etap.bench``: etap against FlashMLA and FlashAttention-3 (each when importable)
on the very same tensors, in serving mode: one CUDA graph holding the decode of every layer of a
step (each layer its own q and its own paged cache, so no layer finds the previous one's cache in
the L2), replayed; the time per layer is the graph's time over the layer count.

    python -m etap.bench                         # the default configurations, bf16
    python -m etap.bench --shape 64,1,16,8192    # b,s_q,h,s_k
    python -m etap.bench --layers 16 --iters 50
    python -m etap.bench --page-size 16          # etap's cache in pages of 16 rows (peers: 64)

Prints per configuration and library: us per layer, GB/s (q + KV + out bytes), and the ratios of
the peers' times to etap's (> 1: etap is faster). With ``--page-size`` other than 64, etap's
cache has pages of that many rows and the peers (FlashMLA takes 64-row pages only) get a cache of
64-row pages with the same lengths, made after etap's was timed and freed.
"""

import argparse
import sys

DEFAULT_SHAPES = [
    (16, 1, 16, 4096),
    (16, 1, 16, 16384),
    (16, 1, 16, 65536),
    (16, 2, 16, 65536),
    (16, 1, 64, 16384),
    (16, 1, 128, 16384),
    (64, 1, 16, 8192),
    (128, 1, 16, 4096),
    (128, 2, 128, 4096),
]


def _bytes(b, s_q, h, lens_sum):
    return 2 * (b * s_q * h * 576 + lens_sum * 576 + b * s_q * h * 512)


def _time_graph(torch, step, iters, warmup=3):
    """Capture step() once (after a warm-up) and return the median ms of one replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(warmup):
        graph.replay()
    times = []
    for _ in range(iters):
        a, z = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        z.record()
        z.synchronize()
        times.append(a.elapsed_time(z))
    times.sort()
    return times[len(times) // 2]


def _etap_step(etap, layers, bt, sl, s_q, h):
    def step():
        meta, splits = etap.get_mla_metadata(sl, s_q * h, 1)
        for q, k in layers:
            etap.flash_mla_with_kvcache(q, k, bt, sl, 512, meta, splits, causal=True)

    return step


def _flash_mla_step(fm, layers, bt, sl, s_q, h):
    try:
        fm.get_mla_metadata()
        new_api = True
    except TypeError:
        new_api = False

    def step():
        if new_api:
            meta, splits = fm.get_mla_metadata()
        else:
            meta, splits = fm.get_mla_metadata(sl, s_q * h, 1)
        for q, k in layers:
            fm.flash_mla_with_kvcache(q, k, bt, sl, 512, meta, splits, causal=True)

    return step


def _fa3_step(fa3, layers, bt, sl, s_q, h):
    # FA3's MLA form: q_pe/k_pe (the 64 RoPE columns) as q/k, q_nope as qv, the latent (first 512
    # columns of the cache rows) as v: views of the same tensors. Its scheduler metadata is made
    # once, outside the graph, where the version has get_scheduler_metadata.
    views = [(q[..., 512:], q[..., :512], k[..., 512:], k[..., :512]) for q, k in layers]
    extra = {}
    if hasattr(fa3, "get_scheduler_metadata"):
        q0 = layers[0][0]
        extra["scheduler_metadata"] = fa3.get_scheduler_metadata(
            q0.shape[0], s_q, int(sl.max()), h, 1, 64, sl, q0.dtype, headdim_v=512, page_size=64, causal=True
        )

    def step():
        for q_pe, q_nope, k_pe, c_kv in views:
            fa3.flash_attn_with_kvcache(
                q=q_pe, k_cache=k_pe, v_cache=c_kv, qv=q_nope, page_table=bt, cache_seqlens=sl,
                causal=True, softmax_scale=576 ** -0.5, return_softmax_lse=True, **extra,
            )

    return step


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m etap.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", action="append", help="b,s_q,h,s_k (repeatable); default: a standard set")
    ap.add_argument("--layers", type=int, default=8, help="layers per captured step (default 8)")
    ap.add_argument("--iters", type=int, default=30, help="timed replays (median; default 30)")
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    ap.add_argument("--no-peers", action="store_true", help="time etap only")
    ap.add_argument("--page-size", type=int, choices=[16, 32, 64, 128], default=64,
                    help="rows per page of etap's cache (default 64); the peers' cache has 64")
    args = ap.parse_args(argv)

    import torch

    import etap
    from etap.reference import make_inputs

    if not torch.cuda.is_available():
        print("etap.bench: no CUDA device", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shape] if args.shape else DEFAULT_SHAPES
    peers = {}
    if not args.no_peers:
        try:
            import flash_mla

            peers["FlashMLA"] = (flash_mla, _flash_mla_step)
        except Exception as e:  # noqa: BLE001 - any import failure means: not available
            print(f"FlashMLA: not importable ({type(e).__name__}: {e})")
        try:
            import flash_attn_interface

            peers["FA3"] = (flash_attn_interface, _fa3_step)
        except Exception as e:  # noqa: BLE001
            print(f"FlashAttention-3: not importable ({type(e).__name__}: {e})")
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; etap {etap.__version__}; "
          f"{args.dtype}, {args.layers} layers per graph, median of {args.iters} replays; "
          f"etap's cache pages of {args.page_size} rows" + (", the peers' of 64" if peers else ""))
    head = f"{'b':>4} {'s_q':>3} {'h':>4} {'s_k':>6} | {'etap us':>8} {'GB/s':>6}"
    for name in peers:
        head += f" | {name + ' us':>12} {'ratio':>6}"
    print(head)
    for b, s_q, h, s_k in shapes:
        # One block table and seqlens for the step (as an engine has), each layer its own q and
        # cache (copies: the same values, in other memory).
        q, k, bt, sl = make_inputs(b, s_q, h, s_k, dtype=dtype, seed=0, page_size=args.page_size)
        layers = [(q.clone(), k.clone()) for _ in range(args.layers)]
        del q, k
        lens_sum = int(sl.sum())
        gb = _bytes(b, s_q, h, lens_sum) / 1e9
        ms = _time_graph(torch, _etap_step(etap, layers, bt, sl, s_q, h), args.iters)
        us = ms * 1000 / args.layers
        line = f"{b:>4} {s_q:>3} {h:>4} {s_k:>6} | {us:>8.1f} {gb / (us * 1e-6):>6.0f}"
        if peers and args.page_size != 64:
            # The peers take 64-row pages: their own cache, with the same lengths (seed 0, no varlen).
            del layers
            torch.cuda.empty_cache()
            q, k, bt, sl64 = make_inputs(b, s_q, h, s_k, dtype=dtype, seed=0, page_size=64)
            assert torch.equal(sl64, sl), "the peers' lengths must be etap's"
            sl = sl64
            layers = [(q.clone(), k.clone()) for _ in range(args.layers)]
            del q, k
        for name, (mod, make) in peers.items():
            try:
                pms = _time_graph(torch, make(mod, layers, bt, sl, s_q, h), args.iters)
                pus = pms * 1000 / args.layers
                line += f" | {pus:>12.1f} {pus / us:>6.2f}"
            except Exception as e:  # noqa: BLE001 - report and go on
                line += f" | {'failed':>12} {'':>6}"
                print(f"  {name} at {(b, s_q, h, s_k)}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
        print(line, flush=True)
        del layers
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())

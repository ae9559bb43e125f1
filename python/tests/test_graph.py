"""CUDA graphs: a decode step of several layers captured once and replayed many times with new
seqlens, block tables and queries copied into the captured tensors, each replay checked against
the float64 reference (caches of 64-row pages, and of 16, 32 and 128 rows with odd head counts);
etap's own plan re-planned inside a graph, also in the packed query layout (new token counts in
the captured cu_seqlens_q at each replay) and over FP8 caches (issue 14: the reference over the
dequantized cache); the error for a shape first seen inside a capture."""

import random

import pytest

import etap
from etap import quant
from etap.reference import (
    make_inputs,
    make_packed_inputs,
    max_violation,
    mla_decode_fp8_reference,
    mla_decode_packed_reference,
    mla_decode_reference,
)

LAYERS = 4
REPLAYS = 25


def _new_step(rng, torch, q_layers, bt, sl, bt0, s_k, zero_every=4):
    """New inputs in place: lengths in [0, s_k] (some 0), requests' page rows permuted, new q."""
    b = sl.shape[0]
    lens = [0 if rng.random() < 1 / zero_every else rng.randint(1, s_k) for _ in range(b)]
    sl.copy_(torch.tensor(lens, dtype=torch.int32))
    perm = list(range(b))
    rng.shuffle(perm)
    bt.copy_(bt0[perm])
    for ql in q_layers:
        ql.copy_((torch.randn(ql.shape, device=ql.device) / 10).clamp_(-1, 1))


@pytest.mark.parametrize(
    "b, s_q, h_q, page_size",
    [(8, 1, 16, 64), (5, 2, 64, 64), (3, 4, 128, 64), (16, 1, 8, 64), (5, 3, 6, 16), (3, 8, 20, 128)],
)
def test_flash_mla_interface_in_a_graph(torch_cuda, b, s_q, h_q, page_size):
    torch = torch_cuda
    rng = random.Random(b * 100 + s_q * 10 + h_q)
    s_k = 1500
    q, k, bt, sl = make_inputs(b, s_q, h_q, s_k, seed=b + s_q + h_q, page_size=page_size)  # no NaN below s_k
    bt0 = bt.clone()
    q_layers = [q.clone() for _ in range(LAYERS)]

    def step():
        meta, splits = etap.get_mla_metadata(sl, s_q * h_q, 1)
        return [etap.flash_mla_with_kvcache(ql, k, bt, sl, 512, meta, splits, causal=True) for ql in q_layers]

    # Warm-up (makes the plan for this shape), then capture.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        results = step()

    for replay in range(REPLAYS):
        _new_step(rng, torch, q_layers, bt, sl, bt0, s_k)
        # Something eager between replays with other seqlens (the shared plan is re-planned by it).
        if replay % 5 == 2:
            other = (sl // 2).contiguous()
            meta = etap.get_mla_metadata()[0]
            o, l = etap.flash_mla_with_kvcache(q_layers[0], k, bt, other, 512, meta, None, causal=True)
            assert max_violation(o, l, *mla_decode_reference(q_layers[0], k, bt, other)) <= 1.0
        graph.replay()
        torch.cuda.synchronize()
        for layer, (out, lse) in enumerate(results):
            ref = mla_decode_reference(q_layers[layer], k, bt, sl)
            v = max_violation(out, lse, *ref)
            assert v <= 1.0, f"replay {replay}, layer {layer}: error {v:.3f} x tolerance (seqlens {sl.tolist()})"


@pytest.mark.parametrize("fmt, b, s_q, h_q", [("fp8_656", 8, 1, 16), ("fp8_per_tensor", 5, 2, 8),
                                               ("fp8_656", 3, 3, 5), ("fp8_per_tensor", 6, 1, 1)])
def test_fp8_in_a_graph(torch_cuda, fmt, b, s_q, h_q):
    """FP8 caches (issue 14) in a graph: a step of several layers over a quantized cache through
    flash_mla_with_kvcache(is_fp8_kvcache=True), captured, replayed with new seqlens, block tables
    and queries, each replay against the reference over the dequantized cache (the per-tensor
    scale is captured by value); etap.plan / etap.decode over the same cache in a second graph."""
    torch = torch_cuda
    rng = random.Random(b * 100 + s_q * 10 + h_q)
    s_k = 1500
    q, k, bt, sl = make_inputs(b, s_q, h_q, s_k, seed=60 + b + s_q + h_q)  # no NaN below s_k
    if fmt == "fp8_656":
        k8, kv_scale = quant.quantize_fp8_656(k), None
    else:
        kv_scale = quant.per_tensor_scale(k)
        k8 = quant.quantize_e4m3_per_tensor(k, kv_scale)
    bt0 = bt.clone()
    q_layers = [q.clone() for _ in range(LAYERS)]
    outs = [torch.empty(b, s_q, h_q, 512, dtype=q.dtype, device=q.device) for _ in range(LAYERS)]
    lses = [torch.empty(b, h_q, s_q, device=q.device) for _ in range(LAYERS)]
    p = etap.plan(q, k8, bt, sl)  # outside the capture: allocates
    assert p.kv_format == fmt

    def step():
        meta, splits = etap.get_mla_metadata(sl, s_q * h_q, 1, is_fp8_kvcache=True)
        return [etap.flash_mla_with_kvcache(ql, k8, bt, sl, 512, meta, splits, causal=True, is_fp8_kvcache=True,
                                            kv_scale=kv_scale) for ql in q_layers]

    def native_step():
        p.replan(sl)
        for ql, o, l in zip(q_layers, outs, lses):
            etap.decode(p, ql, k8, bt, sl, out=o, lse=l, kv_scale=kv_scale)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
        native_step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph, native = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        results = step()
    with torch.cuda.graph(native):
        native_step()
    for replay in range(REPLAYS):
        _new_step(rng, torch, q_layers, bt, sl, bt0, s_k)
        for o, l in list(zip(outs, lses)) + results:
            o.fill_(float("nan"))
            l.fill_(float("nan"))
        graph.replay()
        native.replay()
        torch.cuda.synchronize()
        for layer in range(LAYERS):
            ref = mla_decode_fp8_reference(q_layers[layer], k8, bt, sl, kv_scale)
            v = max_violation(*results[layer], *ref)
            assert v <= 1.0, f"{fmt} replay {replay}, layer {layer}: error {v:.3f} x tolerance (seqlens {sl.tolist()})"
            ref = mla_decode_fp8_reference(q_layers[layer], k8, bt, sl, kv_scale, empty_lse="-inf")
            v = max_violation(outs[layer], lses[layer], *ref)
            assert v <= 1.0, f"{fmt} native replay {replay}, layer {layer}: error {v:.3f} x tolerance"


@pytest.mark.parametrize("b, s_q, h_q, page_size", [(6, 2, 32, 64), (4, 5, 12, 32)])
def test_native_plan_in_a_graph(torch_cuda, b, s_q, h_q, page_size):
    torch = torch_cuda
    rng = random.Random(5)
    s_k = 2500
    q, k, bt, sl = make_inputs(b, s_q, h_q, s_k, seed=23, page_size=page_size)
    bt0 = bt.clone()
    q_layers = [q.clone() for _ in range(LAYERS)]
    outs = [torch.empty(b, s_q, h_q, 512, dtype=q.dtype, device=q.device) for _ in range(LAYERS)]
    lses = [torch.empty(b, h_q, s_q, device=q.device) for _ in range(LAYERS)]
    p = etap.plan(q, k, bt, sl)  # outside the capture: allocates

    def step():
        p.replan(sl)
        for ql, o, l in zip(q_layers, outs, lses):
            etap.decode(p, ql, k, bt, sl, out=o, lse=l)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for replay in range(REPLAYS):
        _new_step(rng, torch, q_layers, bt, sl, bt0, s_k)
        graph.replay()
        torch.cuda.synchronize()
        for layer in range(LAYERS):
            ref = mla_decode_reference(q_layers[layer], k, bt, sl, empty_lse="-inf")
            v = max_violation(outs[layer], lses[layer], *ref)
            assert v <= 1.0, f"replay {replay}, layer {layer}: error {v:.3f} x tolerance"


def _token_counts(rng, total, b, most):
    """b token counts of 0 to `most` that add up to `total`, some of them 0 where that fits."""
    counts = [0] * b
    room = b - -(-total // most)  # requests that may stay empty
    closed = set(rng.sample(range(b), rng.randint(0, room)))
    for _ in range(total):
        counts[rng.choice([r for r in range(b) if r not in closed and counts[r] < most])] += 1
    return counts


def _offsets(counts):
    out = [0]
    for n in counts:
        out.append(out[-1] + n)
    return out


@pytest.mark.parametrize("h_q, max_seqlen_q, page_size", [(6, 8, 16), (20, 3, 128), (12, 1, 64)])
def test_native_packed_plan_in_a_graph(torch_cuda, h_q, max_seqlen_q, page_size):
    """The packed layout in a graph: each replay with new token counts (the same total_q, the
    captured q's rows) in the captured cu_seqlens_q, new seqlens, block tables and queries."""
    torch = torch_cuda
    rng = random.Random(100 * h_q + max_seqlen_q)
    b, s_k = 6, 2000
    total_q = max(b * max_seqlen_q // 2, 1)
    counts = _token_counts(rng, total_q, b, max_seqlen_q)
    q, cu, k, bt, sl = make_packed_inputs(counts, h_q, s_k, max_seqlen_q=max_seqlen_q, seed=h_q + page_size,
                                          page_size=page_size)  # no NaN below s_k
    assert q.shape[0] == total_q
    bt0 = bt.clone()
    q_layers = [q.clone() for _ in range(LAYERS)]
    outs = [torch.empty(total_q, h_q, 512, dtype=q.dtype, device=q.device) for _ in range(LAYERS)]
    lses = [torch.empty(total_q, h_q, device=q.device) for _ in range(LAYERS)]
    p = etap.plan(q, k, bt, sl, cu_seqlens_q=cu, max_seqlen_q=max_seqlen_q)  # outside the capture: allocates

    def step():
        p.replan(sl)
        for ql, o, l in zip(q_layers, outs, lses):
            etap.decode(p, ql, k, bt, sl, cu_seqlens_q=cu, max_seqlen_q=max_seqlen_q, out=o, lse=l)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for replay in range(REPLAYS):
        _new_step(rng, torch, q_layers, bt, sl, bt0, s_k)
        counts = _token_counts(rng, total_q, b, max_seqlen_q)
        cu.copy_(torch.tensor(_offsets(counts), dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        for layer in range(LAYERS):
            ref = mla_decode_packed_reference(q_layers[layer], cu, k, bt, sl, max_seqlen_q, empty_lse="-inf")
            v = max_violation(outs[layer], lses[layer], *ref)
            assert v <= 1.0, (f"replay {replay}, layer {layer}: error {v:.3f} x tolerance (tokens {counts}, "
                              f"seqlens {sl.tolist()})")


def test_merge_states_in_a_graph(torch_cuda):
    """Decode over two halves of the KV and merge, all in one graph, replayed with new lengths."""
    torch = torch_cuda
    b, h_q, s_k = 4, 16, 1024
    q, k, bt, sl = make_inputs(b, 1, h_q, s_k, seed=29)
    half = (s_k // 64 // 2)
    bt_a = bt[:, :half].contiguous()
    bt_b = bt[:, half : 2 * half].contiguous()
    sl_a, sl_b = sl.clone(), sl.clone()

    def set_lens(lens):
        sl.copy_(torch.tensor(lens, dtype=torch.int32))
        sl_a.copy_(torch.tensor([min(n, half * 64) for n in lens], dtype=torch.int32))
        sl_b.copy_(torch.tensor([max(0, n - half * 64) for n in lens], dtype=torch.int32))

    def step():
        oa, la = etap.flash_mla_with_kvcache(q, k, bt_a, sl_a, 512, etap.get_mla_metadata()[0], None, empty_lse="-inf")
        ob, lb = etap.flash_mla_with_kvcache(q, k, bt_b, sl_b, 512, etap.get_mla_metadata()[0], None, empty_lse="-inf")
        return etap.merge_states([oa, ob], [la, lb], empty_lse="+inf")

    set_lens([s_k] * b)
    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = step()
    rng = random.Random(31)
    for _ in range(10):
        set_lens([rng.choice([0, 1, 63, 64, 65, half * 64, half * 64 + 1, rng.randint(0, s_k)]) for _ in range(b)])
        graph.replay()
        torch.cuda.synchronize()
        assert max_violation(out, lse, *mla_decode_reference(q, k, bt, sl)) <= 1.0


def test_new_shape_inside_a_capture_is_a_clear_error(torch_cuda):
    torch = torch_cuda
    q, k, bt, sl = make_inputs(7, 3, 8, 333, seed=37)  # a shape no other test uses
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="warm-up"):
        with torch.cuda.graph(graph):
            etap.flash_mla_with_kvcache(q, k, bt, sl, 512, etap.get_mla_metadata()[0], None, causal=True)
    torch.cuda.synchronize()
    # After a warm-up the same capture works.
    etap.flash_mla_with_kvcache(q, k, bt, sl, 512, etap.get_mla_metadata()[0], None, causal=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = etap.flash_mla_with_kvcache(q, k, bt, sl, 512, etap.get_mla_metadata()[0], None, causal=True)
    graph.replay()
    torch.cuda.synchronize()
    assert max_violation(out, lse, *mla_decode_reference(q, k, bt, sl)) <= 1.0

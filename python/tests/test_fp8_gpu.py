"""GPU tests of FP8 KV caches (issue 14): FlashMLA's 656-byte format and per-tensor e4m3, through
flash_mla_with_kvcache(is_fp8_kvcache=True[, kv_scale=]) and etap.plan / etap.decode (in the
packed query layout too), against the float64 reference over the dequantized cache
(etap.reference.mla_decode_fp8_reference, mla_decode_fp8_packed_reference) with the bf16
tolerances of the other GPU tests (fp16 q and out: the same rule at fp16's precision, 8x
tighter), each request on its own. The caches are quantized on the GPU by etap.quant from
make_inputs' poisoned caches (NaN in every row past each request's length and in unused pages,
junk past the used block-table slots, shuffled pages), and the quantized bytes are checked
against etap's Rust quantizer; out and lse are poisoned with NaN before each call (every element
must be written). Bad inputs on real tensors: the exception, and nothing written. Skip (with the
reason) without torch or a Hopper GPU; ETAP_REQUIRE_GPU=1 makes that a failure."""

import ctypes
import math

import pytest

import etap
from etap import _etap, quant
from etap.reference import (
    make_inputs,
    make_packed_inputs,
    max_violation,
    mla_decode_fp8_packed_reference,
    mla_decode_fp8_reference,
    mla_decode_reference,
)
from packed_checks import check_each_packed_request

FORMATS = ["fp8_656", "fp8_per_tensor"]
STRIDE = 65 * 656

# (s_q, h_q, seqlens): 1 to 16 (token, head) columns, then past 16 (FP8_WIDE); empty, one-row,
# page-boundary (64-row) requests, shorter than s_q (tokens that see no row), and long ones (split
# over several CTAs).
FP8_CASES = [
    (1, 16, [1, 0, 64, 65, 300, 4000]),
    (2, 8, [129, 7, 2000, 1]),
    (1, 1, [5000, 33]),
    (1, 6, [700, 64, 0]),
    (4, 4, [64, 1, 1000, 3]),
    (1, 16, [20000, 3]),
    (3, 5, [0, 1, 2, 63, 64, 65, 255, 256, 257, 4000]),
    (8, 2, [7, 8, 9, 640, 3000]),
    (5, 3, [4, 5, 6, 128, 129, 1500]),
    (2, 1, [1, 2, 3, 8000]),
    (1, 12, [63, 127, 191, 255, 319]),
]
# Past 16 columns: the FP8 kernel of 32 columns, over column groups of 32 past 32 (2 to 4 CTAs a
# part, each with its Q rows, merge counter and partials): DeepSeek MTP (s_q 2 x h16), h32, h64 with a long
# request, h128 (DP attention), s_q 4 x h8, and a last group of 2 columns (s_q 3 x h6). Short
# requests but one a case, so that the float64 reference stays quick.
FP8_WIDE = [
    (2, 16, [1, 0, 64, 65, 129, 2000]),
    (1, 32, [65, 64, 0, 1, 1500]),
    (1, 64, [6000, 1, 64, 0, 65]),
    (1, 128, [0, 65, 1, 1200, 64]),
    (4, 8, [64, 1, 0, 65, 900, 3]),
    (3, 6, [2, 700, 0, 129]),
]
FP8_CASES += FP8_WIDE


def _fp8_layout(cols):
    """The layout etap's plan picks over an FP8 cache (either format) for `cols` (token, head)
    columns a request: heads on M (the wide FP8 kernel) from 33 columns, else KV on M (the ETAP
    kernel of 16 or 32 columns)."""
    return "HeadsOnM" if cols >= 33 else "KvOnM"


def _host_bytes(torch, t):
    """The bytes of a tensor's elements (row-major), on the host."""
    c = t.detach().contiguous().view(torch.uint8).cpu()
    return ctypes.string_at(c.data_ptr(), c.numel())


def _quantize(torch, k, fmt):
    """k quantized in `fmt` on its device by etap.quant, checked byte for byte against etap's
    Rust quantizer; returns (cache, kv_scale)."""
    if fmt == "fp8_656":
        k8 = quant.quantize_fp8_656(k)
        assert k8.shape == (k.shape[0], 64, 1, 656) and k8.stride() == (STRIDE, 656, 656, 1) and k8.device == k.device
        whole = k8.view(torch.uint8).as_strided((k.shape[0] * STRIDE,), (1,))  # the allocation, 65th slots too
        assert _host_bytes(torch, whole) == _etap.quantize_fp8_656(_host_bytes(torch, k), k.shape[0]), \
            "the GPU quantizer differs from etap's Rust quantizer"
        return k8, None
    s = quant.per_tensor_scale(k)
    assert s == _etap.per_tensor_scale(_host_bytes(torch, k))
    k8 = quant.quantize_e4m3_per_tensor(k, s)
    assert k8.shape == k.shape and k8.is_contiguous() and k8.device == k.device
    assert _host_bytes(torch, k8) == _etap.quantize_e4m3_per_tensor(_host_bytes(torch, k), s), \
        "the GPU quantizer differs from etap's Rust quantizer"
    return k8, s


def _fp8_inputs(torch, s_q, h_q, lens, fmt, seed):
    q, k, bt, sl = make_inputs(len(lens), s_q, h_q, 0, seed=seed, lens=lens)
    assert torch.isnan(k).any()  # the poisoned rows, quantized to e4m3 NaN
    k8, kv_scale = _quantize(torch, k, fmt)
    return q, k, k8, kv_scale, bt, sl


def _decode_poisoned(torch, q, k8, bt, sl, kv_scale, empty_lse="+inf", softmax_scale=None, meta=None):
    """flash_mla_with_kvcache over an FP8 cache into out/lse filled with NaN."""
    b, s_q, h_q, _ = q.shape
    out = torch.full((b, s_q, h_q, 512), float("nan"), dtype=q.dtype, device=q.device)
    lse = torch.full((b, h_q, s_q), float("nan"), device=q.device)
    if meta is None:
        meta = etap.get_mla_metadata(sl, s_q * h_q, 1, is_fp8_kvcache=True)[0]
    o, l = etap.flash_mla_with_kvcache(q, k8, bt, sl, 512, meta, None, softmax_scale, True, True, kv_scale=kv_scale,
                                       out=out, lse=lse, empty_lse=empty_lse)
    assert o.data_ptr() == out.data_ptr() and l.data_ptr() == lse.data_ptr()
    return out, lse


def _check_each_request(torch, out, lse, q, k8, kv_scale, bt, sl, what, empty_lse="+inf", softmax_scale=None):
    """Every request on its own against the float64 reference over the dequantized cache (a
    failure names the request and its length); no NaN anywhere; a token that sees no row has
    out 0 and lse +-inf."""
    torch.cuda.synchronize()
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), f"{what}: NaN in out or lse"
    ref_out, ref_lse = mla_decode_fp8_reference(q, k8, bt, sl, kv_scale, softmax_scale=softmax_scale, causal=True,
                                                empty_lse=empty_lse)
    s_q = q.shape[1]
    lens = sl.tolist()
    for i in range(q.shape[0]):
        v = max_violation(out[i : i + 1], lse[i : i + 1], ref_out[i : i + 1], ref_lse[i : i + 1])
        assert v <= 1.0, f"{what}: request {i} (seqlen {lens[i]}): error {v:.3f} x tolerance"
        blind = min(max(s_q - lens[i], 0), s_q)  # its first tokens see no row
        assert (out[i, :blind] == 0).all() and (lse[i, :, :blind] == float(empty_lse)).all(), f"{what}: request {i}"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("s_q, h_q, lens", FP8_CASES)
def test_fp8_against_the_dequantized_reference(torch_cuda, s_q, h_q, lens, fmt):
    torch = torch_cuda
    q, k, k8, kv_scale, bt, sl = _fp8_inputs(torch, s_q, h_q, lens, fmt, seed=9000 + 10 * h_q + s_q)
    what = f"{fmt} s_q={s_q} h_q={h_q}"
    for empty_lse in ("+inf", "-inf"):
        out, lse = _decode_poisoned(torch, q, k8, bt, sl, kv_scale, empty_lse=empty_lse)
        assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
        _check_each_request(torch, out, lse, q, k8, kv_scale, bt, sl, f"{what} empty_lse={empty_lse}", empty_lse)
    # What quantization costs, against the unquantized bf16 reference (printed, not a criterion).
    ref_out, _ = mla_decode_reference(q, k, bt, sl)
    print(f"{what}: max |out - bf16 reference| = {(out.double() - ref_out).abs().max().item():.3e}")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("s_q, h_q, lens", [FP8_CASES[0], FP8_CASES[4], FP8_CASES[6], FP8_WIDE[0], FP8_WIDE[3]])
def test_fp8_with_fp16_q(torch_cuda, s_q, h_q, lens, fmt):
    """fp16 q and out over the same caches (the `_f16` kernels): against the reference over the
    dequantized cache with fp16's tolerance, each request on its own."""
    torch = torch_cuda
    q, _, k8, kv_scale, bt, sl = _fp8_inputs(torch, s_q, h_q, lens, fmt, seed=9100 + 10 * h_q + s_q)
    q16 = q.half()  # the reference reads q16 itself (bf16 values below fp16's normal range round)
    what = f"{fmt} fp16 q s_q={s_q} h_q={h_q}"
    out, lse = _decode_poisoned(torch, q16, k8, bt, sl, kv_scale)
    assert out.dtype == torch.float16 and lse.dtype == torch.float32
    _check_each_request(torch, out, lse, q16, k8, kv_scale, bt, sl, what)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("s_q, h_q, lens", [FP8_CASES[0], FP8_WIDE[2]])
@pytest.mark.parametrize("rows", [64, 66])
def test_fp8_page_strides(torch_cuda, s_q, h_q, lens, fmt, rows):
    """The same pages another number of token rows apart: 64 (a contiguous cache, as vLLM lays out
    FlashMLA's format) and 66, the slots between pages NaN in every byte (read, they would poison
    the result), through the kernel of 16 columns and the wide FP8 kernel; each request against
    the reference, and bit for bit the result over the format's own layout."""
    torch = torch_cuda
    q, _, k8, kv_scale, bt, sl = _fp8_inputs(torch, s_q, h_q, lens, fmt, seed=9200 + rows + h_q)
    n, _, _, token = k8.shape
    wide = torch.full((n, rows, 1, token), 0xFF, dtype=torch.uint8, device=q.device)
    wide[:, :64] = k8.view(torch.uint8)
    strided = wide[:, :64].view(k8.dtype)
    assert strided.stride()[0] == rows * token
    what = f"{fmt} pages {rows} rows apart s_q={s_q} h_q={h_q}"
    out, lse = _decode_poisoned(torch, q, strided, bt, sl, kv_scale)
    _check_each_request(torch, out, lse, q, strided, kv_scale, bt, sl, what)
    own_out, own_lse = _decode_poisoned(torch, q, k8, bt, sl, kv_scale)
    torch.cuda.synchronize()
    assert torch.equal(out, own_out) and torch.equal(lse, own_lse), f"{what}: another result than the own layout"


@pytest.mark.parametrize("fmt", FORMATS)
def test_fp8_softmax_scale_and_new_outputs(torch_cuda, fmt):
    """A caller's softmax_scale, outputs made by the call, the uint8 view of the cache giving the
    very same result as its float8_e4m3fn dtype."""
    torch = torch_cuda
    q, _, k8, kv_scale, bt, sl = _fp8_inputs(torch, 2, 8, [0, 1, 700, 64, 2500], fmt, seed=77)
    meta = etap.get_mla_metadata()[0]
    out, lse = etap.flash_mla_with_kvcache(q, k8, bt, sl, 512, meta, None, softmax_scale=0.07, causal=True,
                                           is_fp8_kvcache=True, kv_scale=kv_scale)
    assert out.shape == (5, 2, 8, 512) and out.dtype == torch.bfloat16 and lse.shape == (5, 8, 2)
    _check_each_request(torch, out, lse, q, k8, kv_scale, bt, sl, f"{fmt} softmax_scale=0.07", softmax_scale=0.07)
    meta = etap.get_mla_metadata()[0]
    out8, lse8 = etap.flash_mla_with_kvcache(q, k8.view(torch.uint8), bt, sl, 512, meta, None, softmax_scale=0.07,
                                             causal=True, is_fp8_kvcache=True, kv_scale=kv_scale)
    torch.cuda.synchronize()
    assert torch.equal(out8, out) and torch.equal(lse8, lse), "the uint8 cache gave another result"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("s_q, h_q", [(3, 5), (2, 16), (1, 64)])
def test_fp8_native_plan_api(torch_cuda, fmt, s_q, h_q):
    """etap.plan / replan / decode over an FP8 cache: a plan of its format (its layout by
    `_fp8_layout`), into NaN-poisoned out/lse, for two steps' seqlens."""
    torch = torch_cuda
    b = 5
    q, _, k8, kv_scale, bt, sl = _fp8_inputs(torch, s_q, h_q, [2000, 0, 2, 700, 129], fmt, seed=31 + h_q)
    p = etap.plan(q, k8, bt, sl)
    assert p.kv_format == fmt and p.layout == _fp8_layout(s_q * h_q) and p.total_q is None
    assert p.shape == (b, s_q, h_q, k8.shape[0], bt.shape[1], 64)
    assert f"kv_format={fmt}" in repr(p), repr(p)
    for lens in (sl, torch.minimum(sl.flip(0), sl).contiguous()):
        p.replan(lens)
        out = torch.full((b, s_q, h_q, 512), float("nan"), dtype=torch.bfloat16, device=q.device)
        lse = torch.full((b, h_q, s_q), float("nan"), device=q.device)
        etap.decode(p, q, k8, bt, lens, out=out, lse=lse, kv_scale=kv_scale)
        _check_each_request(torch, out, lse, q, k8, kv_scale, bt, lens, f"native plan {fmt}", empty_lse="-inf")


# The packed query layout over an FP8 cache, (h_q, max_seqlen_q, tokens per request, seqlens),
# through each FP8 kernel: the CTA of 16 columns (6 heads x 2 tokens), of 32 (16 x 2; 8 x 4),
# column groups of 32 (64 x 1: two; 5 x 8: 40 columns, a last group of 8); requests of 0 tokens,
# tokens that see no row (a request shorter than its tokens), lengths at page boundaries, and a
# long request a case (split over several CTAs).
FP8_PACKED_CASES = [
    (6, 2, [2, 0, 1, 2, 1], [300, 5, 0, 64, 2000]),
    (16, 2, [2, 1, 0, 2], [65, 1, 700, 4000]),
    (8, 4, [4, 0, 3, 1, 2], [1, 64, 129, 3, 900]),
    (64, 1, [1, 0, 1, 1], [6000, 3, 64, 0]),
    (5, 8, [8, 7, 0, 1], [9, 1000, 5, 64]),
]


@pytest.mark.parametrize("q_dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("h_q, max_seqlen_q, counts, lens", FP8_PACKED_CASES)
def test_fp8_packed_query_layout(torch_cuda, h_q, max_seqlen_q, counts, lens, fmt, q_dtype):
    """etap.plan / etap.decode with cu_seqlens_q over an FP8 cache: each request against the
    float64 packed reference over the dequantized cache, into NaN-poisoned out and lse, both
    empty-lse conventions, bf16 and fp16 q and out."""
    torch = torch_cuda
    q, cu, k, bt, sl = make_packed_inputs(counts, h_q, max_seqlen_q=max_seqlen_q, lens=lens,
                                          seed=9200 + 10 * h_q + max_seqlen_q)
    q = q.to(getattr(torch, q_dtype))
    k8, kv_scale = _quantize(torch, k, fmt)
    total_q = sum(counts)
    p = etap.plan(q, k8, bt, sl, cu_seqlens_q=cu, max_seqlen_q=max_seqlen_q)
    assert p.kv_format == fmt and p.layout == _fp8_layout(max_seqlen_q * h_q) and p.total_q == total_q
    what = f"packed {fmt} {q_dtype} h_q={h_q} max_seqlen_q={max_seqlen_q}"
    for empty_lse in ("-inf", "+inf"):
        out = torch.full((total_q, h_q, 512), float("nan"), dtype=q.dtype, device=q.device)
        lse = torch.full((total_q, h_q), float("nan"), device=q.device)
        o, l = etap.decode(p, q, k8, bt, sl, cu_seqlens_q=cu, max_seqlen_q=max_seqlen_q, out=out, lse=lse,
                           empty_lse=empty_lse, kv_scale=kv_scale)
        assert o.data_ptr() == out.data_ptr() and l.data_ptr() == lse.data_ptr()
        torch.cuda.synchronize()
        ref = mla_decode_fp8_packed_reference(q, cu, k8, bt, sl, kv_scale, max_seqlen_q, empty_lse=empty_lse)
        check_each_packed_request(torch, out, lse, cu, sl, ref, f"{what} empty_lse={empty_lse}", empty_lse)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("b, s_q, h_q", [(5, 1, 16), (4, 3, 6), (3, 2, 16), (2, 1, 128)])
def test_fp8_packed_full_equals_uniform(torch_cuda, fmt, b, s_q, h_q):
    """Every request at s_q tokens: the packed call over the very same q (a view) and FP8 cache
    gives the uniform call's out bit for bit, and its lse transposed."""
    torch = torch_cuda
    q, _, k8, kv_scale, bt, sl = _fp8_inputs(torch, s_q, h_q, [3000, 0, 2, 700, 64][:b], fmt, seed=9300 + h_q + s_q)
    pu = etap.plan(q, k8, bt, sl)
    out_u, lse_u = etap.decode(pu, q, k8, bt, sl, kv_scale=kv_scale)
    qp = q.view(b * s_q, h_q, 576)
    cu = torch.arange(0, b * s_q + 1, s_q, dtype=torch.int32, device=q.device)
    pp = etap.plan(qp, k8, bt, sl, cu_seqlens_q=cu, max_seqlen_q=s_q)
    out_p, lse_p = etap.decode(pp, qp, k8, bt, sl, cu_seqlens_q=cu, max_seqlen_q=s_q, kv_scale=kv_scale)
    _check_each_request(torch, out_u, lse_u, q, k8, kv_scale, bt, sl, f"uniform {fmt}", empty_lse="-inf")
    assert torch.equal(out_p.view(b, s_q, h_q, 512), out_u), "packed out differs from the uniform out"
    assert torch.equal(lse_p.view(b, s_q, h_q), lse_u.transpose(1, 2)), "packed lse differs from the uniform lse"


def test_fp8_packed_reference_is_the_uniform_one(torch_any):
    """The packed FP8 reference (on the CPU): with every request at s_q tokens, the uniform FP8
    reference with lse transposed, both formats; with fewer tokens, each request's rows are the
    uniform reference's last rows of that request."""
    torch = torch_any
    lens = [0, 1, 64, 300]
    s_q, h_q = 2, 4
    for fmt in FORMATS:
        q, k, bt, sl = make_inputs(len(lens), s_q, h_q, 0, device="cpu", seed=53, lens=lens)
        k8, kv_scale = _quantize(torch, k, fmt)
        ro, rl = mla_decode_fp8_reference(q, k8, bt, sl, kv_scale)
        cu = torch.arange(0, len(lens) * s_q + 1, s_q, dtype=torch.int32)
        po, pl = mla_decode_fp8_packed_reference(q.view(-1, h_q, 576), cu, k8, bt, sl, kv_scale, s_q)
        assert torch.equal(po.view(ro.shape), ro) and torch.equal(pl.view(len(lens), s_q, h_q), rl.transpose(1, 2))
        counts = [2, 0, 1, 2]
        qp, cu, _, _, _ = make_packed_inputs(counts, h_q, max_seqlen_q=s_q, device="cpu", seed=53, lens=lens)
        po, pl = mla_decode_fp8_packed_reference(qp, cu, k8, bt, sl, kv_scale, s_q)
        for r, n in enumerate(counts):
            a = int(cu[r])
            torch.testing.assert_close(po[a : a + n], ro[r, s_q - n :], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(pl[a : a + n], rl[r, :, s_q - n :].T, rtol=1e-12, atol=1e-12)
        with pytest.raises(ValueError, match="kv_scale"):
            mla_decode_fp8_packed_reference(qp, cu, k8, bt, sl, None if kv_scale else 1.0, s_q)


def test_fp8_and_16_bit_plans_apart(torch_cuda):
    """One shape over the bf16 cache and both FP8 forms of it, interleaved for a few layers: each
    call with the plan of its own format (a metadata planned for one is refused for another)."""
    torch = torch_cuda
    q, k, bt, sl = make_inputs(4, 1, 16, 0, seed=41, lens=[3000, 5, 64, 900])
    caches = {"bf16": (k, None)}
    for fmt in FORMATS:
        caches[fmt] = _quantize(torch, k, fmt)
    metas = {name: etap.get_mla_metadata()[0] for name in caches}
    for layer in range(3):
        for name, (cache, scale) in caches.items():
            ql = (q.float() * (1 + layer / 4)).to(q.dtype)
            if name == "bf16":
                out, lse = etap.flash_mla_with_kvcache(ql, cache, bt, sl, 512, metas[name], None, causal=True)
                torch.cuda.synchronize()
                assert max_violation(out, lse, *mla_decode_reference(ql, cache, bt, sl)) <= 1.0, f"layer {layer}"
            else:
                out, lse = _decode_poisoned(torch, ql, cache, bt, sl, scale, meta=metas[name])
                _check_each_request(torch, out, lse, ql, cache, scale, bt, sl, f"{name} layer {layer}")
    with pytest.raises(ValueError, match="planned for another shape"):
        etap.flash_mla_with_kvcache(q, caches["fp8_656"][0], bt, sl, 512, metas["bf16"], None, causal=True,
                                    is_fp8_kvcache=True)
    with pytest.raises(ValueError, match="planned for another shape"):
        etap.flash_mla_with_kvcache(q, caches["fp8_per_tensor"][0], bt, sl, 512, metas["fp8_656"], None, causal=True,
                                    is_fp8_kvcache=True, kv_scale=caches["fp8_per_tensor"][1])


def test_fp8_quantizers_divide_on_the_gpu(torch_cuda):
    """The per-tensor quantizer's division on the GPU is a division (a Python scalar divisor
    would be a multiplication by its reciprocal there): 10.9375 / 7 = 1.5625 rounds to even."""
    torch = torch_cuda
    _, k, _, _ = make_inputs(2, 1, 4, 0, seed=43, lens=[100, 300])
    x = torch.tensor([10.9375, -10.9375, 10.9375 * 4, 10.9375 / 64], dtype=torch.bfloat16, device=k.device)
    e = quant.quantize_e4m3_per_tensor(x, 7.0)
    assert e.device == k.device and e.view(torch.uint8).tolist() == [0x3C, 0xBC, 0x4C, 0x0C]
    assert _host_bytes(torch, e) == _etap.quantize_e4m3_per_tensor(_host_bytes(torch, x), 7.0)
    # The dequantizers on the GPU: the Rust ones, bit for bit (NaN for NaN).
    for fmt in FORMATS:
        k8, scale = _quantize(torch, k, fmt)
        if fmt == "fp8_656":
            back = quant.dequantize_fp8_656(k8)
            whole = k8.view(torch.uint8).as_strided((k.shape[0] * STRIDE,), (1,))
            rust = _etap.dequantize_fp8_656(_host_bytes(torch, whole), k.shape[0])
        else:
            back = quant.dequantize_e4m3_per_tensor(k8, scale)
            rust = _etap.dequantize_e4m3_per_tensor(_host_bytes(torch, k8), scale)
        rust = torch.frombuffer(bytearray(rust), dtype=torch.bfloat16).view(back.shape)
        back = back.cpu()
        nan = torch.isnan(back)
        assert torch.equal(nan, torch.isnan(rust)) and torch.equal(nan, torch.isnan(k.cpu()))
        assert torch.equal(back[~nan].view(torch.int16), rust[~nan].view(torch.int16)), fmt


def test_fp8_bad_inputs_raise_and_write_nothing(torch_cuda):
    torch = torch_cuda
    q, k, k8, _, bt, sl = _fp8_inputs(torch, 1, 16, [300, 70], "fp8_656", seed=11)
    kt, st = _quantize(torch, k, "fp8_per_tensor")
    out = torch.full((2, 1, 16, 512), 7.0, dtype=torch.bfloat16, device=q.device)
    lse = torch.full((2, 16, 1), 7.0, device=q.device)
    meta = etap.get_mla_metadata(sl, 16, 1, is_fp8_kvcache=True)[0]

    def call(**kw):
        args = dict(q=q, k_cache=k8, block_table=bt, cache_seqlens=sl, head_dim_v=512, tile_scheduler_metadata=meta,
                    num_splits=None, causal=True, is_fp8_kvcache=True, out=out, lse=lse)
        args.update(kw)
        return etap.flash_mla_with_kvcache(**args)

    n = k8.shape[0]
    short = torch.zeros(n * STRIDE - 656, dtype=torch.uint8, device=q.device).as_strided((n, 64, 1, 656),
                                                                                         (STRIDE, 656, 656, 1))
    misaligned = torch.zeros(n * STRIDE + 16, dtype=torch.uint8, device=q.device)[8:].as_strided(
        (n, 64, 1, 656), (STRIDE, 656, 656, 1))
    bad = [
        (dict(k_cache=k8.contiguous().as_strided(k8.shape, (63 * 656, 656, 656, 1))), ValueError,
         "k_cache: an FP8 cache's tokens lie 656 bytes apart and its pages a whole number of token rows apart, at "
         "least 64"),
        (dict(k_cache=k8[:, :32]), ValueError, "k_cache: page_block_size = 32 rows is not supported with an FP8"),
        (dict(k_cache=short), ValueError, "k_cache: the allocation holds"),
        (dict(k_cache=misaligned), ValueError, "k_cache at 0x[0-9a-f]+ must be 16-byte aligned"),
        (dict(k_cache=k), TypeError, "k_cache: dtype must be torch.float8_e4m3fn or torch.uint8"),
        (dict(k_cache=k8, kv_scale=1.0), ValueError, "kv_scale: given, but k_cache is FlashMLA's FP8 format"),
        (dict(k_cache=kt), ValueError, "kv_scale: needed"),
        (dict(k_cache=kt, kv_scale=float("nan")), ValueError, "kv_scale: nan must be finite and positive"),
        (dict(k_cache=kt, kv_scale=torch.tensor(st)), TypeError, "kv_scale: expected a float"),
        (dict(k_cache=kt[:, :, :, :512], kv_scale=st), ValueError, "k_cache: an FP8 cache has 656 bytes a token"),
        (dict(q=q.float()), TypeError, "q: dtype must be torch.bfloat16 or torch.float16"),
        (dict(q=torch.zeros(2, 1, 129, 576, dtype=torch.bfloat16, device=q.device)), ValueError,
         "q: h_q = 129 heads is not supported"),
        # Past 16 columns is valid (FP8_WIDE), but not with metadata made for 16.
        (dict(q=torch.zeros(2, 2, 16, 576, dtype=torch.bfloat16, device=q.device)), ValueError,
         r"tile_scheduler_metadata: made for num_q_tokens_per_head_k = 16, but q has s_q \* h_q = 2 \* 16 = 32"),
        (dict(is_fp8_kvcache=False), TypeError, "k_cache: dtype torch.float8_e4m3fn is an FP8 cache's"),
        (dict(out=out.float()), TypeError, "out: dtype must be torch.bfloat16"),
        (dict(block_table=bt.long()), TypeError, "block_table: dtype must be torch.int32"),
    ]
    for kw, exc, needle in bad:
        with pytest.raises(exc, match=needle):
            call(**kw)
    with pytest.raises(ValueError, match="made with is_fp8_kvcache=True, but this call has is_fp8_kvcache=False"):
        etap.flash_mla_with_kvcache(q, k, bt, sl, 512, meta, None, causal=True, out=out, lse=lse)
    # The native module's own checks, past the Python layer's.
    stream = torch.cuda.current_stream().cuda_stream
    p8 = etap.plan(q, k8, bt, sl)
    pt = etap.plan(q, kt, bt, sl)
    p16 = etap.plan(q, k, bt, sl)
    addrs = (q.data_ptr(), k8.data_ptr(), bt.data_ptr(), sl.data_ptr(), out.data_ptr(), lse.data_ptr())
    for f, args, needle in (
        (p8._dec.decode_fp8, (p16._plan, "bf16") + addrs + (None, None, stream), "plan: made for a 16-bit cache"),
        (p8._dec.decode, (p8._plan, "bf16") + addrs + (None, stream), r"plan: made for an FP8 cache \(kv_format "
                                                                      r"\"fp8_656\"\): decode it with `decode_fp8`"),
        (p8._dec.decode_fp8, (p8._plan, "bf16") + addrs + (1.0, None, stream),
         "kv_scale: FlashMLA's 656-byte format carries its scales in the cache"),
        (p8._dec.decode_fp8, (pt._plan, "bf16") + addrs + (None, None, stream),
         "kv_scale: the per-tensor format needs a finite, positive scale, got None"),
        (p8._dec.decode_fp8, (pt._plan, "bf16") + addrs + (float("nan"), None, stream), "kv_scale: the per-tensor format"),
        (p8._dec.decode_fp8, (pt._plan, "bf16") + addrs + (1e-60, None, stream), "kv_scale: the per-tensor format"),
        (p8._dec.decode_fp8, (p8._plan, "bf16") + addrs + (None, -1.0, stream), "softmax_scale: -1"),
        (p8._dec.decode_fp8, (p8._plan, "bf16", addrs[0], addrs[1] + 8) + addrs[2:] + (None, None, stream),
         "k_cache at 0x[0-9a-f]+ must be 16-byte aligned"),
        (p8._dec.decode_fp8, (p8._plan, "f32") + addrs + (None, None, stream), "dtype"),
    ):
        with pytest.raises(ValueError, match=needle):
            f(*args)
    torch.cuda.synchronize()
    assert (out == 7.0).all() and (lse == 7.0).all(), "a rejected call wrote to out/lse"
    # The control: a valid call writes them.
    call()
    _check_each_request(torch, out, lse, q, k8, None, bt, sl, "after the rejected calls")

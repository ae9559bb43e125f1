"""GPU tests: FlashMLA's test matrix against a float64 torch reference (and against FlashMLA on
the very same tensors when it is importable), bad inputs on real tensors, devices and streams,
merge_states; issue 13's shapes (any h_q 1-128, s_q 1-8, cache pages of 16/32/64/128 rows) and
its packed query layout (etap.plan / etap.decode with cu_seqlens_q).
Skip (with the reason) without torch or a Hopper GPU; ETAP_REQUIRE_GPU=1 makes that a failure."""

import itertools
import math

import pytest

import etap
from etap.reference import (
    make_inputs,
    make_packed_inputs,
    max_violation,
    mla_decode_packed_reference,
    mla_decode_reference,
)
from packed_checks import check_each_packed_request


def _cases():
    cases = []
    for b, s_q, s_k, h_q, varlen, causal in itertools.product(
        [1, 2, 6, 64], [1, 2, 3, 4], [20, 140, 4096], [8, 16, 32, 64, 128], [False, True], [False, True]
    ):
        if not causal and s_q > 1:
            continue  # not supported by the kernels: test_causal_false_multi_token_raises
        if b == 64 and s_k == 4096 and (s_q not in (1, 4) or varlen):
            continue  # the largest cases, thinned: the reference's time, not the kernel's
        cases.append((b, s_q, s_k, h_q, varlen, causal))
    return cases


CASES = _cases()


def _flash_mla():
    try:
        import flash_mla
    except Exception:
        return None
    return flash_mla


def _run_flash_mla(fm, q, k, bt, sl, causal):
    try:
        meta, splits = fm.get_mla_metadata()
    except TypeError:
        meta, splits = fm.get_mla_metadata(sl, q.shape[1] * q.shape[2], 1)
    return fm.flash_mla_with_kvcache(q, k, bt, sl, 512, meta, splits, causal=causal)


@pytest.mark.parametrize("b, s_q, s_k, h_q, varlen, causal", CASES)
def test_matrix_against_float64_reference(torch_cuda, b, s_q, s_k, h_q, varlen, causal):
    torch = torch_cuda
    seed = hash((b, s_q, s_k, h_q, varlen, causal)) % 10000
    q, k, bt, sl = make_inputs(b, s_q, h_q, s_k, varlen=varlen, seed=seed)
    meta, splits = etap.get_mla_metadata(sl, s_q * h_q, 1)
    out, lse = etap.flash_mla_with_kvcache(q, k, bt, sl, 512, meta, splits, causal=causal)
    ref_out, ref_lse = mla_decode_reference(q, k, bt, sl, causal=causal)
    torch.cuda.synchronize()
    assert out.shape == (b, s_q, h_q, 512) and out.dtype == q.dtype
    assert lse.shape == (b, h_q, s_q) and lse.dtype == torch.float32
    v = max_violation(out, lse, ref_out, ref_lse)
    assert v <= 1.0, f"error {v:.3f} x tolerance"
    fm = _flash_mla()
    if fm is not None:
        try:
            fout, flse = _run_flash_mla(fm, q, k, bt, sl, causal)
        except Exception as e:  # noqa: BLE001 - a shape this FlashMLA build rejects: not etap's failure
            print(f"FlashMLA did not run this case: {type(e).__name__}: {e}")
            return
        # Both against each other, with the reference's tolerances doubled.
        assert max_violation(out, lse, fout.double(), flse.double(), 1.6e-3, 4.02 / 128, 2e-4, 2.6e-4) <= 1.0


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
@pytest.mark.parametrize("s_q, h_q", [(1, 16), (2, 64), (4, 128)])
def test_dtypes_zero_lengths_and_scale(torch_cuda, dtype_name, s_q, h_q):
    """FlashMLA's corner case (some requests of length 0: out 0 and lse +inf, or -inf on
    request), fp16 and bf16, a softmax_scale of the caller's."""
    torch = torch_cuda
    dtype = getattr(torch, dtype_name)
    q, k, bt, sl = make_inputs(32, s_q, h_q, 1000, varlen=True, dtype=dtype, zero_lens=True, seed=7)
    assert (sl == 0).any() and (sl > 0).any()
    for empty_lse in ("+inf", "-inf"):
        meta, _ = etap.get_mla_metadata()
        out, lse = etap.flash_mla_with_kvcache(q, k, bt, sl, 512, meta, None, softmax_scale=0.07, causal=True,
                                               empty_lse=empty_lse)
        ref_out, ref_lse = mla_decode_reference(q, k, bt, sl, softmax_scale=0.07, causal=True, empty_lse=empty_lse)
        assert max_violation(out, lse, ref_out, ref_lse) <= 1.0
        empty = sl == 0
        assert (out[empty] == 0).all()
        want = math.inf if empty_lse == "+inf" else -math.inf
        assert (lse[empty] == want).all()


def test_causal_false_multi_token_raises(torch_cuda):
    q, k, bt, sl = make_inputs(2, 2, 16, 100)
    with pytest.raises(NotImplementedError, match="causal=False with s_q > 1"):
        etap.flash_mla_with_kvcache(q, k, bt, sl, 512, etap.get_mla_metadata()[0], None, causal=False)


def test_one_metadata_many_layers_and_steps(torch_cuda):
    """One metadata per step, reused by every layer; a new step's metadata re-plans the shared
    plan; an older metadata used again re-plans for itself (no stale schedule)."""
    torch = torch_cuda
    q, k, bt, sl = make_inputs(8, 1, 16, 3000, varlen=True, seed=3)
    layers = [torch.randn_like(q, dtype=torch.float32).div_(10).to(q.dtype) for _ in range(4)]
    meta1, _ = etap.get_mla_metadata(sl, 16, 1)
    for ql in layers:
        out, lse = etap.flash_mla_with_kvcache(ql, k, bt, sl, 512, meta1, None)
        assert max_violation(out, lse, *mla_decode_reference(ql, k, bt, sl)) <= 1.0
    sl2 = (sl // 3).clamp_(min=1)
    meta2, _ = etap.get_mla_metadata(sl2, 16, 1)
    out, lse = etap.flash_mla_with_kvcache(q, k, bt, sl2, 512, meta2, None)
    assert max_violation(out, lse, *mla_decode_reference(q, k, bt, sl2)) <= 1.0
    out, lse = etap.flash_mla_with_kvcache(q, k, bt, sl, 512, meta1, None)  # step 1 again
    assert max_violation(out, lse, *mla_decode_reference(q, k, bt, sl)) <= 1.0


def test_native_plan_api(torch_cuda):
    torch = torch_cuda
    q, k, bt, sl = make_inputs(4, 2, 32, 2000, varlen=True, seed=5)
    p = etap.plan(q, k, bt, sl)
    out = torch.full((4, 2, 32, 512), float("nan"), dtype=q.dtype, device=q.device)
    lse = torch.full((4, 32, 2), float("nan"), device=q.device)
    etap.decode(p, q, k, bt, sl, out=out, lse=lse)
    assert max_violation(out, lse, *mla_decode_reference(q, k, bt, sl, empty_lse="-inf")) <= 1.0
    sl2 = torch.minimum(sl.flip(0), sl).contiguous()  # new lengths, within each request's valid rows
    p.replan(sl2)
    out2, lse2 = etap.decode(p, q, k, bt, sl2, empty_lse="+inf")
    assert max_violation(out2, lse2, *mla_decode_reference(q, k, bt, sl2)) <= 1.0
    assert p.layout in ("KvOnM", "HeadsOnM")


# --- bad inputs on real tensors: the exception, and nothing written -----------------------------


def test_bad_inputs_raise_and_write_nothing(torch_cuda):
    torch = torch_cuda
    q, k, bt, sl = make_inputs(2, 1, 16, 300, seed=11)
    out = torch.full((2, 1, 16, 512), 7.0, dtype=q.dtype, device=q.device)
    lse = torch.full((2, 16, 1), 7.0, device=q.device)
    meta = etap.get_mla_metadata(sl, 16, 1)[0]

    def call(**kw):
        args = dict(q=q, k_cache=k, block_table=bt, cache_seqlens=sl, head_dim_v=512, tile_scheduler_metadata=meta,
                    num_splits=None, out=out, lse=lse)
        args.update(kw)
        return etap.flash_mla_with_kvcache(**args)

    big = torch.zeros(q.numel() + 8, dtype=q.dtype, device=q.device)
    misaligned_q = big[1 : 1 + q.numel()].view(q.shape)
    bad = [
        (dict(q=q.float()), TypeError, "q: dtype"),
        (dict(q=q.cpu()), ValueError, "q: must be on a CUDA device"),
        (dict(q=q.transpose(1, 2)), ValueError, "q"),
        (dict(q=q[:, :, :8].contiguous()), ValueError, "num_q_tokens_per_head_k = 16, but q has s_q \\* h_q = 1 \\* 8"),
        (dict(q=q.repeat(1, 1, 1, 2)[..., ::2]), ValueError, "q: must be contiguous"),
        (dict(q=misaligned_q), ValueError, "q at 0x[0-9a-f]+ must be 16-byte aligned"),
        (dict(k_cache=k.half() if q.dtype == torch.bfloat16 else k.bfloat16()), TypeError, "k_cache: dtype"),
        (dict(k_cache=k[:, :8].contiguous()), ValueError, "k_cache: page_block_size = 8 rows is not supported"),
        (dict(k_cache=k[:16].view(4, 256, 1, 576)), ValueError, "k_cache: page_block_size = 256 rows is not supported"),
        (dict(k_cache=k[:, :32]), ValueError, "k_cache: must be contiguous"),  # a valid page size, strided
        (dict(k_cache=k.view(k.shape[0], 64, 576)), ValueError, "k_cache: expected 4 dims"),
        (dict(block_table=bt.long()), TypeError, "block_table: dtype must be torch.int32"),
        (dict(block_table=bt[:, ::2]), ValueError, "block_table: must be contiguous"),
        (dict(cache_seqlens=sl.long()), TypeError, "cache_seqlens: dtype must be torch.int32"),
        (dict(cache_seqlens=sl.cpu()), ValueError, "cache_seqlens: must be on a CUDA device"),
        (dict(head_dim_v=128), ValueError, "head_dim_v"),
        (dict(softmax_scale=float("nan")), ValueError, "softmax_scale"),
        (dict(out=out.float()), TypeError, "out: dtype"),
        (dict(lse=lse.view(2, 1, 16)), ValueError, "lse: expected shape"),
        (dict(out=q.view(-1)[: out.numel()].view(out.shape)), ValueError, "out: overlaps q"),
        (dict(tile_scheduler_metadata=etap.get_mla_metadata(sl[:1].contiguous(), 16, 1)[0]), ValueError,
         "made for a batch of 1"),
        (dict(tile_scheduler_metadata=etap.get_mla_metadata(sl, 32, 1)[0]), ValueError, "num_q_tokens_per_head_k"),
        (dict(tile_scheduler_metadata=torch.zeros(132, 8, dtype=torch.int32, device=q.device)), TypeError,
         "tile_scheduler_metadata"),
    ]
    for kw, exc, needle in bad:
        with pytest.raises(exc, match=needle):
            call(**kw)
    torch.cuda.synchronize()
    assert (out == 7.0).all() and (lse == 7.0).all(), "a rejected call wrote to out/lse"
    # Unsupported head / token counts.
    for s_q, h_q, needle in ((1, 129, "h_q = 129"), (9, 16, "s_q = 9"), (1, 256, "h_q = 256"), (1, 0, "h_q = 0"),
                             (0, 16, "s_q = 0")):
        qq = torch.zeros(2, s_q, h_q, 576, dtype=q.dtype, device=q.device)
        with pytest.raises(ValueError, match=needle):
            etap.flash_mla_with_kvcache(qq, k, bt, sl, 512, etap.get_mla_metadata()[0], None, causal=True)
    # A metadata planned for one shape, used with another.
    meta = etap.get_mla_metadata()[0]
    etap.flash_mla_with_kvcache(q, k, bt, sl, 512, meta, None)
    bt_wide = torch.cat([bt, bt], dim=1).contiguous()
    with pytest.raises(ValueError, match="planned for another shape"):
        etap.flash_mla_with_kvcache(q, k, bt_wide, sl, 512, meta, None)


# --- devices and streams ----------------------------------------------------------------------


def test_side_stream(torch_cuda):
    torch = torch_cuda
    q, k, bt, sl = make_inputs(4, 1, 64, 5000, seed=13)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out, lse = etap.flash_mla_with_kvcache(q, k, bt, sl, 512, etap.get_mla_metadata()[0], None)
    torch.cuda.current_stream().wait_stream(s)
    assert max_violation(out, lse, *mla_decode_reference(q, k, bt, sl)) <= 1.0


def test_second_device_leaves_torch_current_device(torch_cuda):
    torch = torch_cuda
    if torch.cuda.device_count() < 2:
        pytest.skip("one CUDA device: the cross-device test needs two")
    torch.cuda.set_device(0)
    q, k, bt, sl = make_inputs(3, 2, 16, 700, seed=17, device="cuda:1")
    out, lse = etap.flash_mla_with_kvcache(q, k, bt, sl, 512, etap.get_mla_metadata()[0], None, causal=True)
    assert torch.cuda.current_device() == 0
    assert out.device == q.device
    torch.cuda.synchronize(1)
    assert max_violation(out, lse, *mla_decode_reference(q, k, bt, sl)) <= 1.0
    # Inputs on two devices.
    with pytest.raises(ValueError, match="k_cache: on cuda:0, but q is on cuda:1"):
        etap.flash_mla_with_kvcache(q, k.to("cuda:0"), bt, sl, 512, etap.get_mla_metadata()[0], None, causal=True)
    # A native plan used on the other device's tensors.
    p = etap.plan(q, k, bt, sl)
    with pytest.raises(ValueError, match="plan: made for cuda:1"):
        etap.decode(p, q.to("cuda:0"), k.to("cuda:0"), bt.to("cuda:0"), sl.to("cuda:0"))


# --- merge_states ------------------------------------------------------------------------------


def _split_pages(bt, sl, parts):
    """Each request's KV split into `parts` page-aligned pieces: per part a block table and
    seqlens covering its rows only (some parts may be empty)."""
    import torch

    b, max_pages = bt.shape
    lens = [int(x) for x in sl.cpu()]
    bts, sls = [], []
    for r in range(parts):
        t = torch.zeros_like(bt)
        n = torch.zeros_like(sl)
        for i, length in enumerate(lens):
            pages = (length + 63) // 64
            per = (pages + parts - 1) // parts
            p0, p1 = min(r * per, pages), min((r + 1) * per, pages)
            t[i, : p1 - p0] = bt[i, p0:p1]
            n[i] = max(0, min(length, p1 * 64) - p0 * 64)
        bts.append(t)
        sls.append(n)
    return bts, sls


@pytest.mark.parametrize("parts", [2, 3])
def test_merge_states_equals_the_whole(torch_cuda, parts):
    q, k, bt, sl = make_inputs(6, 1, 16, 900, varlen=True, seed=19)
    sl[0] = 30  # one page: the other parts are empty for this request
    full_out, full_lse = etap.flash_mla_with_kvcache(q, k, bt, sl, 512, etap.get_mla_metadata()[0], None)
    outs, lses = [], []
    for pbt, psl in zip(*_split_pages(bt, sl, parts)):
        o, l = etap.flash_mla_with_kvcache(q, k, pbt, psl, 512, etap.get_mla_metadata()[0], None, empty_lse="-inf")
        outs.append(o)
        lses.append(l)
    out, lse = etap.merge_states(outs, lses, empty_lse="+inf")
    assert max_violation(out, lse, *mla_decode_reference(q, k, bt, sl)) <= 1.0
    assert max_violation(out, lse, full_out.double(), full_lse.double(), 1.6e-3, 4.02 / 128) <= 1.0


# --- issue 13: any h_q 1-128, s_q 1-8, cache pages of 16, 32, 64 or 128 rows -------------------
# Each case: make_inputs' NaN in every cache row past each request's length (and past-the-end
# block-table slots no page has), out and lse poisoned with NaN before the call (every element
# must be written), each request checked on its own against the float64 reference.

ODD_HEADS = [1, 3, 6, 12, 20, 22, 24, 48, 96, 127]
PAGE_SIZES = [16, 32, 64, 128]
DTYPES = ["bfloat16", "float16"]


def _boundary_lens(page_size, s_q):
    """Lengths around the page and tile (64-row) boundaries, 0, shorter than s_q, and one long
    enough that its KV is split over several CTAs."""
    p = page_size
    return [0, 1, max(s_q - 1, 0), p - 1, p, p + 1, 2 * p + 3, 63, 64, 65, 255, 256, 257, 4000]


def _decode_nan_poisoned(torch, q, k, bt, sl, causal=True, empty_lse="+inf", meta=None):
    """flash_mla_with_kvcache into out/lse filled with NaN (etap's out=/lse=)."""
    b, s_q, h_q, _ = q.shape
    out = torch.full((b, s_q, h_q, 512), float("nan"), dtype=q.dtype, device=q.device)
    lse = torch.full((b, h_q, s_q), float("nan"), device=q.device)
    if meta is None:
        meta = etap.get_mla_metadata(sl, s_q * h_q, 1)[0]
    o, l = etap.flash_mla_with_kvcache(q, k, bt, sl, 512, meta, None, causal=causal, out=out, lse=lse,
                                       empty_lse=empty_lse)
    assert o.data_ptr() == out.data_ptr() and l.data_ptr() == lse.data_ptr()
    return out, lse


def _check_each_request(torch, out, lse, q, k, bt, sl, what, causal=True, empty_lse="+inf"):
    """Every request on its own against the float64 reference (a failure names the request and
    its length); no NaN anywhere."""
    torch.cuda.synchronize()
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), f"{what}: NaN in out or lse"
    ref_out, ref_lse = mla_decode_reference(q, k, bt, sl, causal=causal, empty_lse=empty_lse)
    lens = sl.tolist()
    for i in range(q.shape[0]):
        v = max_violation(out[i : i + 1], lse[i : i + 1], ref_out[i : i + 1], ref_lse[i : i + 1])
        assert v <= 1.0, f"{what}: request {i} (seqlen {lens[i]}): error {v:.3f} x tolerance"


def _odd_head_cases():
    cases = []
    for i, (h_q, s_q) in enumerate(itertools.product(ODD_HEADS, [1, 2, 5])):
        cases.append((h_q, s_q, PAGE_SIZES[i % 4]))  # each (h_q, s_q) with one page size, cycling
    return cases


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("h_q, s_q, page_size", _odd_head_cases())
def test_odd_head_counts(torch_cuda, h_q, s_q, page_size, dtype_name):
    """h_q not a multiple of 8 (or of 64): the kernels' partial column blocks and, for s_q > 1,
    blocks holding two tokens' heads under the causal mask."""
    torch = torch_cuda
    dtype = getattr(torch, dtype_name)
    q, k, bt, sl = make_inputs(6, s_q, h_q, 900, varlen=True, dtype=dtype, seed=1000 + 10 * h_q + s_q,
                               page_size=page_size)
    what = f"h_q={h_q} s_q={s_q} page={page_size} {dtype_name}"
    for causal in (True, False) if s_q == 1 else (True,):
        out, lse = _decode_nan_poisoned(torch, q, k, bt, sl, causal=causal)
        assert out.shape == (6, s_q, h_q, 512) and lse.shape == (6, h_q, s_q)
        _check_each_request(torch, out, lse, q, k, bt, sl, f"{what} causal={causal}", causal=causal)


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("s_q", [3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("h_q", [1, 6, 16, 22, 64, 128])
def test_s_q_up_to_8(torch_cuda, s_q, h_q, dtype_name):
    """Multi-token decode with 3 to 8 query tokens per request (s_q 3 x h_q 6 among them), the
    causal mask at lengths shorter than s_q (tokens that see no row: out 0, lse +inf)."""
    torch = torch_cuda
    dtype = getattr(torch, dtype_name)
    lens = [0, 1, s_q - 1, s_q, s_q + 1, 64, 65, 700, 2500]
    q, k, bt, sl = make_inputs(len(lens), s_q, h_q, 0, dtype=dtype, seed=2000 + 10 * h_q + s_q, lens=lens)
    out, lse = _decode_nan_poisoned(torch, q, k, bt, sl)
    _check_each_request(torch, out, lse, q, k, bt, sl, f"s_q={s_q} h_q={h_q} {dtype_name}")
    # Request 1 (length 1): only the last token sees a row.
    assert torch.isposinf(lse[1, :, : s_q - 1]).all() and torch.isfinite(lse[1, :, s_q - 1]).all()
    assert (out[1, : s_q - 1] == 0).all()


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("s_q, h_q", [(1, 1), (1, 16), (2, 128), (3, 6), (4, 20), (8, 127)])
@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_page_sizes(torch_cuda, page_size, s_q, h_q, dtype_name):
    """Caches of 16, 32, 64 and 128-row pages (a 64-row tile gathered from 4 or 2 pages, or half
    of one), requests ending on and around the page and tile boundaries."""
    torch = torch_cuda
    dtype = getattr(torch, dtype_name)
    lens = _boundary_lens(page_size, s_q)
    q, k, bt, sl = make_inputs(len(lens), s_q, h_q, 0, dtype=dtype, seed=3000 + page_size + 10 * h_q + s_q,
                               page_size=page_size, lens=lens)
    assert tuple(k.shape[1:]) == (page_size, 1, 576)
    what = f"page={page_size} s_q={s_q} h_q={h_q} {dtype_name}"
    for empty_lse in ("+inf", "-inf"):
        out, lse = _decode_nan_poisoned(torch, q, k, bt, sl, empty_lse=empty_lse)
        _check_each_request(torch, out, lse, q, k, bt, sl, f"{what} empty_lse={empty_lse}", empty_lse=empty_lse)
        assert (out[0] == 0).all() and (lse[0] == float(empty_lse)).all()  # the empty request


@pytest.mark.parametrize("page_size", [16, 32, 128])
def test_native_plan_api_page_sizes(torch_cuda, page_size):
    """etap.plan / replan / decode on caches of other page sizes, into NaN-poisoned out/lse."""
    torch = torch_cuda
    b, s_q, h_q = 5, 5, 12
    q, k, bt, sl = make_inputs(b, s_q, h_q, 2000, varlen=True, seed=4000 + page_size, page_size=page_size)
    p = etap.plan(q, k, bt, sl)
    assert p.shape == (b, s_q, h_q, k.shape[0], bt.shape[1], page_size)
    assert f"page_size={page_size}" in repr(p)
    for lens in (sl, torch.minimum(sl.flip(0), sl).contiguous()):
        p.replan(lens)
        out = torch.full((b, s_q, h_q, 512), float("nan"), dtype=q.dtype, device=q.device)
        lse = torch.full((b, h_q, s_q), float("nan"), device=q.device)
        etap.decode(p, q, k, bt, lens, out=out, lse=lse)
        _check_each_request(torch, out, lse, q, k, bt, lens, f"native plan, page={page_size}", empty_lse="-inf")


def test_plan_not_reused_across_page_sizes(torch_cuda):
    """Two caches alike but for their page size (the same number of pages, the same block table):
    each call gets the plan of its own page size, and a metadata or native plan made for one is
    refused for the other."""
    torch = torch_cuda
    b, s_q, h_q = 4, 2, 20
    q, k64, bt, sl = make_inputs(b, s_q, h_q, 1024, seed=43)  # every row of the used pages valid
    k32 = k64[:, :32].contiguous()  # page j of k32: the first 32 rows of page j of k64
    sl32 = (sl // 2).contiguous()  # the rows k32's pages hold
    out64, lse64 = _decode_nan_poisoned(torch, q, k64, bt, sl)
    meta64 = etap.get_mla_metadata(sl, s_q * h_q, 1)[0]
    _decode_nan_poisoned(torch, q, k64, bt, sl, meta=meta64)
    out32, lse32 = _decode_nan_poisoned(torch, q, k32, bt, sl32)
    _check_each_request(torch, out64, lse64, q, k64, bt, sl, "page 64")
    _check_each_request(torch, out32, lse32, q, k32, bt, sl32, "page 32 after page 64")
    with pytest.raises(ValueError, match="planned for another shape"):
        etap.flash_mla_with_kvcache(q, k32, bt, sl32, 512, meta64, None, causal=True)
    p64 = etap.plan(q, k64, bt, sl)
    with pytest.raises(ValueError, match=r"plan: made for .*page_size"):
        etap.decode(p64, q, k32, bt, sl32)


# --- issue 13: the packed query layout (etap.plan / etap.decode with cu_seqlens_q) --------------
# Request r has counts[r] query tokens (0 to max_seqlen_q), rows cu_seqlens_q[r]..[r + 1] of q
# [total_q, h_q, 576]; out [total_q, h_q, 512], lse [total_q, h_q]. make_packed_inputs takes each
# request's tokens as the last counts[r] of a uniform batch's (make_inputs: NaN in every cache
# row past each request's length), so a token's causal bound is the uniform case's.


def test_packed_reference_is_the_uniform_one(torch_any):
    """The packed reference (float64, on the CPU): with every request at s_q tokens it is the
    uniform reference, lse transposed; with fewer, each request's rows are the uniform reference's
    last rows of that request; bad offsets raise naming cu_seqlens_q."""
    torch = torch_any
    lens = [0, 1, 1, 64, 300]
    s_q, h_q = 3, 6
    q, k, bt, sl = make_inputs(len(lens), s_q, h_q, 0, device="cpu", seed=51, page_size=16, lens=lens)
    cu = torch.arange(0, len(lens) * s_q + 1, s_q, dtype=torch.int32)
    for empty_lse in ("+inf", "-inf"):
        ro, rl = mla_decode_reference(q, k, bt, sl, empty_lse=empty_lse)
        po, pl = mla_decode_packed_reference(q.view(-1, h_q, 576), cu, k, bt, sl, s_q, empty_lse=empty_lse)
        assert po.shape == (len(lens) * s_q, h_q, 512) and pl.shape == (len(lens) * s_q, h_q)
        assert torch.equal(po.view(ro.shape), ro)
        assert torch.equal(pl.view(len(lens), s_q, h_q), rl.transpose(1, 2))
    counts = [3, 0, 2, 1, 3]
    qp, cu, k2, bt2, sl2 = make_packed_inputs(counts, h_q, max_seqlen_q=s_q, device="cpu", seed=51, page_size=16,
                                              lens=lens)
    assert torch.equal(k2.nan_to_num(7), k.nan_to_num(7)) and torch.equal(bt2, bt) and torch.equal(sl2, sl)
    assert cu.tolist() == [0, 3, 3, 5, 6, 9] and cu.dtype == torch.int32 and qp.shape == (9, h_q, 576)
    po, pl = mla_decode_packed_reference(qp, cu, k, bt, sl, s_q)
    ro, rl = mla_decode_reference(q, k, bt, sl)
    for r, n in enumerate(counts):
        a = int(cu[r])
        assert torch.equal(qp[a : a + n], q[r, s_q - n :])
        torch.testing.assert_close(po[a : a + n], ro[r, s_q - n :], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(pl[a : a + n], rl[r, :, s_q - n :].T, rtol=1e-12, atol=1e-12)
    assert torch.isposinf(pl[0:3]).all() and (po[0:3] == 0).all()  # request 0: no row
    # Request 2: 1 row, 2 tokens: the first sees no row, the second sees it.
    assert torch.isposinf(pl[3]).all() and (po[3] == 0).all() and torch.isfinite(pl[4]).all()
    for bad, needle in (([0, 3, 3, 5, 6, 8], "end at total_q = 9"), ([1, 3, 3, 5, 6, 9], "start at 0"),
                        ([0, 3, 2, 5, 6, 9], "request 1 has -1 tokens"), ([0, 4, 4, 5, 6, 9], "request 0 has 4 tokens"),
                        ([0, 3, 3, 5, 9], "5 offsets for a batch of 5")):
        with pytest.raises(ValueError, match=f"cu_seqlens_q: .*{needle}"):
            mla_decode_packed_reference(qp, torch.tensor(bad, dtype=torch.int32), k, bt, sl, s_q)


# (h_q, max_seqlen_q, page_size, tokens per request, seqlens): every count 0 to 8, odd head
# counts, pages of 16, 32, 64 and 128 rows, lengths 0, shorter than a request's tokens (its first
# tokens see no row), around the page and tile boundaries, and long enough to be split; both
# kernel layouts (s_q * h_q 12 and 15 columns: the ETAP kernel, KvOnM; from 17: HeadsOnM).
PACKED_CASES = [
    (6, 8, 16, [0, 1, 2, 3, 4, 5, 6, 7, 8, 8, 3], [900, 0, 5, 15, 16, 17, 64, 65, 4000, 7, 300]),
    (20, 8, 64, [8, 0, 7, 1, 6, 2, 5, 3, 4], [1, 700, 63, 64, 65, 2500, 0, 129, 4000]),
    (128, 8, 128, [3, 8, 0, 1, 5], [127, 128, 300, 2, 1000]),
    (6, 2, 32, [2, 0, 1, 2, 1, 1], [31, 32, 0, 1, 900, 33]),
    (3, 5, 64, [5, 4, 0, 2, 5], [3, 4000, 10, 64, 200]),
]


def _packed_nan_poisoned(torch, p, q, cu, k, bt, sl, max_seqlen_q, empty_lse):
    """etap.decode in the packed layout into out/lse filled with NaN."""
    total_q, h_q, _ = q.shape
    out = torch.full((total_q, h_q, 512), float("nan"), dtype=q.dtype, device=q.device)
    lse = torch.full((total_q, h_q), float("nan"), device=q.device)
    o, l = etap.decode(p, q, k, bt, sl, cu_seqlens_q=cu, max_seqlen_q=max_seqlen_q, out=out, lse=lse,
                       empty_lse=empty_lse)
    assert o.data_ptr() == out.data_ptr() and l.data_ptr() == lse.data_ptr()
    return out, lse


def _check_each_packed_request(torch, out, lse, q, cu, k, bt, sl, max_seqlen_q, what, empty_lse="-inf"):
    """:func:`packed_checks.check_each_packed_request` against the float64 packed reference."""
    torch.cuda.synchronize()
    ref = mla_decode_packed_reference(q, cu, k, bt, sl, max_seqlen_q, empty_lse=empty_lse)
    check_each_packed_request(torch, out, lse, cu, sl, ref, what, empty_lse)


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("h_q, max_seqlen_q, page_size, counts, lens", PACKED_CASES)
def test_packed_mixed_token_counts(torch_cuda, h_q, max_seqlen_q, page_size, counts, lens, dtype_name):
    """The packed layout with 0 to 8 tokens a request: each request against the reference."""
    torch = torch_cuda
    dtype = getattr(torch, dtype_name)
    q, cu, k, bt, sl = make_packed_inputs(counts, h_q, max_seqlen_q=max_seqlen_q, lens=lens, dtype=dtype,
                                          page_size=page_size, seed=5000 + 10 * h_q + page_size)
    b, total_q = len(counts), sum(counts)
    assert q.shape == (total_q, h_q, 576) and cu.tolist()[-1] == total_q
    p = etap.plan(q, k, bt, sl, cu_seqlens_q=cu, max_seqlen_q=max_seqlen_q)
    assert p.shape == (b, max_seqlen_q, h_q, k.shape[0], bt.shape[1], page_size) and p.total_q == total_q
    assert f"total_q={total_q}, max_seqlen_q={max_seqlen_q}," in repr(p), repr(p)
    assert p.layout in ("KvOnM", "HeadsOnM")
    what = f"packed h_q={h_q} max_seqlen_q={max_seqlen_q} page={page_size} {dtype_name} {p.layout}"
    for empty_lse in ("-inf", "+inf"):
        out, lse = _packed_nan_poisoned(torch, p, q, cu, k, bt, sl, max_seqlen_q, empty_lse)
        _check_each_packed_request(torch, out, lse, q, cu, k, bt, sl, max_seqlen_q, f"{what} empty_lse={empty_lse}",
                                   empty_lse)
    # New outputs, made by the call: the packed shapes; and a caller's softmax_scale.
    out, lse = etap.decode(p, q, k, bt, sl, 0.07, cu_seqlens_q=cu, max_seqlen_q=max_seqlen_q)
    assert out.shape == (total_q, h_q, 512) and out.dtype == dtype
    assert lse.shape == (total_q, h_q) and lse.dtype == torch.float32
    torch.cuda.synchronize()
    ref_out, ref_lse = mla_decode_packed_reference(q, cu, k, bt, sl, max_seqlen_q, softmax_scale=0.07,
                                                   empty_lse="-inf")
    assert max_violation(out, lse, ref_out, ref_lse) <= 1.0, f"{what} softmax_scale=0.07"


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("b, s_q, h_q, page_size", [(5, 1, 16, 64), (4, 3, 6, 16), (3, 8, 20, 128), (2, 4, 128, 32)])
def test_packed_full_equals_uniform(torch_cuda, b, s_q, h_q, page_size, dtype_name):
    """Every request at s_q tokens: the packed form of the very same q (a view) gives the uniform
    form's out bit for bit, and its lse transposed ([b * s_q, h_q] against [b, h_q, s_q])."""
    torch = torch_cuda
    dtype = getattr(torch, dtype_name)
    lens = [3000, 0, 2, 700, 64][:b]
    q, k, bt, sl = make_inputs(b, s_q, h_q, 0, dtype=dtype, seed=6000 + 10 * h_q + s_q, page_size=page_size,
                               lens=lens)
    pu = etap.plan(q, k, bt, sl)
    out_u, lse_u = etap.decode(pu, q, k, bt, sl)
    qp = q.view(b * s_q, h_q, 576)
    cu = torch.arange(0, b * s_q + 1, s_q, dtype=torch.int32, device=q.device)
    pp = etap.plan(qp, k, bt, sl, cu_seqlens_q=cu, max_seqlen_q=s_q)
    assert pp.layout == pu.layout and pp.total_q == b * s_q and pu.total_q is None
    out_p, lse_p = etap.decode(pp, qp, k, bt, sl, cu_seqlens_q=cu, max_seqlen_q=s_q)
    torch.cuda.synchronize()
    assert max_violation(out_u, lse_u, *mla_decode_reference(q, k, bt, sl, empty_lse="-inf")) <= 1.0
    assert torch.equal(out_p.view(b, s_q, h_q, 512), out_u), "packed out differs from the uniform out"
    assert torch.equal(lse_p.view(b, s_q, h_q), lse_u.transpose(1, 2)), "packed lse differs from the uniform lse"


def test_packed_bad_inputs_raise_and_write_nothing(torch_cuda):
    """The packed layout's errors on real tensors, in etap.decode and in the native module
    (the last check before the launch): the exception, and nothing written."""
    torch = torch_cuda
    counts = [2, 0, 1]
    q, cu, k, bt, sl = make_packed_inputs(counts, 6, max_seqlen_q=2, lens=[100, 5, 300], seed=61)
    p = etap.plan(q, k, bt, sl, cu_seqlens_q=cu, max_seqlen_q=2)
    out = torch.full((3, 6, 512), 7.0, dtype=q.dtype, device=q.device)
    lse = torch.full((3, 6), 7.0, device=q.device)

    def call(plan=p, **kw):
        args = dict(q=q, k_cache=k, block_table=bt, cache_seqlens=sl, cu_seqlens_q=cu, max_seqlen_q=2, out=out,
                    lse=lse)
        args.update(kw)
        return etap.decode(plan, args.pop("q"), args.pop("k_cache"), args.pop("block_table"),
                           args.pop("cache_seqlens"), **args)

    q4 = torch.zeros(3, 2, 6, 576, dtype=q.dtype, device=q.device)
    pu = etap.plan(q4, k, bt, sl)  # a uniform plan of the same (batch, s_q, h_q, ...)
    bad = [
        (dict(cu_seqlens_q=cu.long()), TypeError, "cu_seqlens_q: dtype must be torch.int32"),
        (dict(cu_seqlens_q=cu.cpu()), ValueError, "cu_seqlens_q: must be on a CUDA device"),
        (dict(cu_seqlens_q=cu[:3]), ValueError, r"block_table: expected shape \[batch = 2"),
        (dict(cu_seqlens_q=torch.zeros(8, dtype=torch.int32, device=q.device)[::2]), ValueError,
         "cu_seqlens_q: must be contiguous"),
        (dict(cu_seqlens_q=cu.view(4, 1)), ValueError, r"cu_seqlens_q: expected shape \[batch \+ 1\]"),
        (dict(q=q[:2].contiguous()), ValueError, r"plan: made for .*= \(3, 2, 6, .*, 3\), this call has .*, 2\)"),
        (dict(q=q.unsqueeze(0)), ValueError, r"q: expected 3 dims \[total_q, h_q, 576\]"),
        (dict(q=q.float()), TypeError, "q: dtype"),
        (dict(max_seqlen_q=3), ValueError, r"plan: made for .*= \(3, 2, 6, .*, 3\), this call has \(3, 3, 6"),
        (dict(max_seqlen_q=9), ValueError, "max_seqlen_q: 9"),
        (dict(max_seqlen_q=None), TypeError, "max_seqlen_q: needed with cu_seqlens_q"),
        (dict(out=out.view(3, 1, 6, 512)), ValueError, r"out: expected shape \[3, 6, 512\]"),
        (dict(lse=torch.full((6, 3), 7.0, device=q.device)), ValueError, r"lse: expected shape \[3, 6\]"),
        (dict(out=q.view(-1)[: out.numel()].view(out.shape)), ValueError, "out: overlaps q"),
        (dict(q=q4, cu_seqlens_q=None, max_seqlen_q=None, out=out.view(3, 1, 6, 512)), ValueError,
         "cu_seqlens_q: needed: the plan was made for the packed layout"),
        (dict(plan=pu), ValueError, "cu_seqlens_q: given, but the plan was made for the uniform layout"),
        (dict(causal=False), NotImplementedError, "causal=False with max_seqlen_q > 1"),
    ]
    for kw, exc, needle in bad:
        with pytest.raises(exc, match=needle):
            call(**kw)
    # The native module's own checks, past the Python layer's.
    stream = torch.cuda.current_stream().cuda_stream
    native = (p._plan, "bf16", q.data_ptr(), k.data_ptr(), bt.data_ptr(), sl.data_ptr(), out.data_ptr(),
              lse.data_ptr(), None, stream)
    for args, kw, needle in (
        (native, {}, r"cu_seqlens_q: needed: the plan is for the packed query layout \(total_q = 3\)"),
        ((pu._plan,) + native[1:], dict(cu_seqlens_q=cu.data_ptr()), "cu_seqlens_q: given, but the plan is for the "
                                                                        "uniform query layout"),
        (native, dict(cu_seqlens_q=cu.data_ptr() + 2), r"cu_seqlens_q at 0x[0-9a-f]+ must be 4-byte aligned"),
    ):
        with pytest.raises(ValueError, match=needle):
            p._dec.decode(*args, **kw)
    torch.cuda.synchronize()
    assert (out == 7.0).all() and (lse == 7.0).all(), "a rejected call wrote to out/lse"
    # The control: a valid call writes them.
    call()
    _check_each_packed_request(torch, out, lse, q, cu, k, bt, sl, 2, "after the rejected calls")

"""Host-side tests of the FP8 caches (issue 14), without torch or a GPU: every argument check of
the FP8 paths (flash_mla_with_kvcache(is_fp8_kvcache=True), etap.plan / etap.decode over an FP8
cache, get_mla_metadata(is_fp8_kvcache=True), the native module's shape check), each raising
the right exception naming the argument before anything reaches the device; valid calls reaching
the device with the right arguments; and etap's Rust quantizers (``etap._etap``, on bytes)
checked against the formats' definitions in plain Python."""

import bisect
import math
import random
import struct

import pytest

import etap
from etap import _checks, _etap, interface
from fake import BF16, F16, F32, FP8, I32, I64, U8, FakeTensor, decode_inputs, fp8_656_cache, fp8_inputs

STRIDE = 65 * 656  # FlashMLA's FP8 cache: bytes between pages


def test_constants():
    assert (_etap.FP8_656_TOKEN_BYTES, _etap.FP8_656_PAGE_STRIDE, _etap.FP8_TENSOR_TOKEN_BYTES) == (656, STRIDE, 576)
    assert etap.FP8_PAGE_SIZE == 64
    # No column limit of its own any more: an FP8 cache takes every s_q * h_q (CTAs of 32 past 16, heads on M past 32).
    assert not hasattr(etap, "FP8_MAX_COLS") and not hasattr(_checks, "FP8_MAX_COLS")
    for name in ("quantize_fp8_656", "dequantize_fp8_656", "per_tensor_scale", "quantize_e4m3_per_tensor",
                 "dequantize_e4m3_per_tensor"):
        assert callable(getattr(etap.quant, name)) and callable(getattr(_etap, name))
    from etap import reference

    assert callable(reference.mla_decode_fp8_reference) and callable(reference.dequantize_cache)


# --- the native shape check ----------------------------------------------------------------------


def test_validate_shape_fp8_accepts_every_column_count():
    """s_q 1 to 8 and h_q 1 to 128 as for a 16-bit cache. The layout it returns: over an FP8 cache
    KV on M up to 32 (token, head) columns (the FP8 kernel of 16 or 32 columns) and heads on M
    from 33 (the wide FP8 kernel); over a 16-bit cache heads on M from 17 columns."""
    for fmt in ("fp8_656", "fp8_per_tensor", None):  # None: a 16-bit cache
        for s_q in range(1, 9):
            for h_q in range(1, 129):
                layout = _etap.validate_shape(3, s_q, h_q, 10, 7, 64, kv_format=fmt)
                wide_from = 17 if fmt is None else 33
                want = "HeadsOnM" if s_q * h_q >= wide_from else "KvOnM"
                assert layout == want, (fmt, s_q, h_q, layout)


@pytest.mark.parametrize(
    "args, kw, needle",
    [
        ((2, 1, 16, 8, 4, 32), dict(kv_format="fp8_656"), r"^kv_format: FP8 caches take pages of 64 rows, not 32"),
        ((2, 1, 16, 8, 4, 128), dict(kv_format="fp8_per_tensor"), "^kv_format: FP8 caches take pages of 64 rows, not 128"),
        ((2, 2, 64, 8, 4, 16), dict(kv_format="fp8_656"), r"^kv_format: FP8 caches take pages of 64 rows, not 16"),
        # Columns: the 16-bit cache's limits (h_q 1 to 128, s_q 1 to 8), no other.
        ((2, 1, 129, 8, 4, 64), dict(kv_format="fp8_656"), r"h_q = 129 is not supported"),
        ((2, 9, 16, 8, 4, 64), dict(kv_format="fp8_per_tensor"), r"s_q = 9"),
        ((2, 1, 16, 8, 4, 64), dict(kv_format="fp8"), r'^kv_format: "fp8" is not a cache format \(None for 16-bit, '
                                                        r'"fp8_656" or "fp8_per_tensor"\)'),
        ((2, 1, 16, 8, 4, 64), dict(kv_format="bf16"), r'^kv_format: "bf16" is not a cache format'),
        # The packed layout's own limit holds over an FP8 cache too.
        ((2, 2, 8, 8, 4, 64), dict(kv_format="fp8_656", total_q=5), r"^total_q: 5 tokens for 2 requests of at most s_q = 2 each"),
        # The shape's own checks come first.
        ((0, 1, 16, 8, 4, 64), dict(kv_format="fp8_656"), "empty batch"),
        ((2, 1, 16, 0, 4, 64), dict(kv_format="fp8_656"), "num_pages"),
        # Rows count 65 a page in the 656-byte format: 33.1 M pages pass per-tensor, not there.
        ((2, 1, 16, 33_100_000, 4, 64), dict(kv_format="fp8_656"), r"^num_pages: 2151500065 rows exceed"),
    ],
)
def test_validate_shape_fp8_rejects(args, kw, needle):
    with pytest.raises(ValueError, match=needle):
        _etap.validate_shape(*args, **kw)


def test_validate_shape_fp8_packed():
    """The packed query layout over both FP8 formats: any total_q up to batch * s_q."""
    for fmt in ("fp8_656", "fp8_per_tensor"):
        for total_q in range(1, 7):
            _etap.validate_shape(3, 2, 16, 8, 4, 64, total_q=total_q, kv_format=fmt)
        with pytest.raises(ValueError, match="kv_format: FP8 caches take pages of 64 rows, not 16"):
            _etap.validate_shape(3, 2, 16, 8, 4, 16, total_q=3, kv_format=fmt)


def test_validate_shape_fp8_counts_65_rows_a_page():
    _etap.validate_shape(2, 1, 16, 33_100_000, 4, 64, kv_format="fp8_per_tensor")  # 64 rows a page
    _etap.validate_shape(2, 1, 16, 33_100_000, 4, 64)  # the 16-bit cache too
    _etap.validate_shape(2, 1, 16, 33_100_000, 4, 64, kv_format="fp8_656", kv_page_stride=64)
    for kw in (dict(kv_format="fp8_656"), dict(kv_format="fp8_per_tensor", kv_page_stride=65)):
        with pytest.raises(ValueError, match="num_pages"):
            _etap.validate_shape(2, 1, 16, 33_100_000, 4, 64, **kw)


@pytest.mark.parametrize("kw, needle", [
    (dict(kv_format="fp8_656", kv_page_stride=63), r"^kv_page_stride: 63 rows between pages of 64 rows would overlap"),
    (dict(kv_page_stride=64), r"^kv_page_stride: a 16-bit cache's pages are page_size rows apart; 64 is for an FP8 "),
])
def test_validate_shape_page_stride_rejects(kw, needle):
    with pytest.raises(ValueError, match=needle):
        _etap.validate_shape(2, 1, 16, 8, 4, 64, **kw)


# --- get_mla_metadata(is_fp8_kvcache=...) ----------------------------------------------------------


def test_metadata_records_is_fp8_kvcache():
    sl = FakeTensor((3,), I32)
    meta, splits = etap.get_mla_metadata(sl, 16, 1, None, True)
    assert (meta.batch, meta.cols, meta.fp8, splits) == (3, 16, True, None)
    assert "is_fp8_kvcache=True" in repr(meta)
    assert etap.get_mla_metadata(is_fp8_kvcache=True)[0].fp8 is True
    # Not said (False is FlashMLA's default): not recorded, so not checked.
    assert etap.get_mla_metadata(sl, 16, 1)[0].fp8 is None
    assert etap.get_mla_metadata()[0].fp8 is None
    # Any column count a 16-bit cache takes (past 16: CTAs of 32, column groups past 32), and no other.
    for cols in (1, 2, 8, 15, 16, 17, 18, 32, 64, 128, 256, 1024):
        assert etap.get_mla_metadata(sl, cols, 1, is_fp8_kvcache=True)[0].cols == cols
    for cols in (0, 131, 1025):
        with pytest.raises(ValueError, match=rf"num_q_tokens_per_head_k: {cols} "):
            etap.get_mla_metadata(sl, cols, 1, is_fp8_kvcache=True)
    for bad in (1, "yes", None):
        with pytest.raises(TypeError, match="is_fp8_kvcache: expected a bool"):
            etap.get_mla_metadata(sl, 16, 1, is_fp8_kvcache=bad)


# --- flash_mla_with_kvcache(is_fp8_kvcache=True): every bad input --------------------------------


def fp8_call(q=None, k_cache=None, block_table=None, cache_seqlens=None, head_dim_v=512, meta="new", num_splits=None,
             kv_format="fp8_656", **kw):
    dq, dk, db, ds = fp8_inputs(kv_format=kv_format)
    q = dq if q is None else q
    k_cache = dk if k_cache is None else k_cache
    block_table = db if block_table is None else block_table
    cache_seqlens = ds if cache_seqlens is None else cache_seqlens
    if meta == "new":
        meta = etap.EtapMetadata()
    kw.setdefault("is_fp8_kvcache", True)
    kw.setdefault("causal", True)
    # Outputs given (no torch here to make them).
    kw.setdefault("out", FakeTensor((2, 1, 16, 512)))
    kw.setdefault("lse", FakeTensor((2, 16, 1), F32))
    return etap.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v, meta, num_splits, **kw)


def pt(**kw):
    """A call with the per-tensor cache (and its scale unless kw says otherwise)."""
    kw.setdefault("kv_format", "fp8_per_tensor")
    kw.setdefault("kv_scale", 0.01)
    return kw


BAD_FP8 = [
    # q: bf16 or fp16, [b, s_q, h_q, 576], s_q 1 to 8, h_q 1 to 128 (any s_q * h_q)
    (dict(q=FakeTensor((2, 1, 16, 576), F32)), TypeError,
     r"q: dtype must be torch.bfloat16 or torch.float16, got torch.float32"),
    (pt(q=FakeTensor((2, 1, 16, 576), F32)), TypeError, "q: dtype must be torch.bfloat16 or torch.float16"),
    (dict(q=FakeTensor((2, 1, 129, 576))), ValueError, "q: h_q = 129 heads is not supported"),
    (dict(q=FakeTensor((2, 9, 1, 576))), ValueError, "q: s_q = 9 query tokens per request is not supported"),
    (dict(q=FakeTensor((2, 1, 16, 512))), ValueError, "q: head dim must be 576"),
    (dict(q=FakeTensor((2, 16, 576))), ValueError, "q: expected 4 dims"),
    (dict(q=FakeTensor((2, 1, 16, 576), BF16, ("cpu", None))), ValueError, "q: must be on a CUDA device"),
    (dict(q=FakeTensor((2, 1, 16, 576), strides=(9216 * 2, 9216, 576, 1))), ValueError, "q: must be contiguous"),
    (dict(q=FakeTensor((2, 2, 8, 576)), causal=False), NotImplementedError, "causal=False with s_q > 1"),
    (dict(q=[0.0]), TypeError, "q: expected a torch.Tensor"),
    # k_cache: its dtype, shape, page size, format
    (dict(k_cache=FakeTensor((8, 64, 1, 576), BF16)), TypeError,
     r"k_cache: dtype must be torch.float8_e4m3fn or torch.uint8 \(an FP8 cache\), got torch.bfloat16"),
    (dict(k_cache=FakeTensor((8, 64, 1, 656), I32)), TypeError, "k_cache: dtype must be torch.float8_e4m3fn"),
    (dict(k_cache=FakeTensor((8, 64, 656), FP8)), ValueError, r"k_cache: expected 4 dims \[num_blocks, 64, 1, 656 or 576\]"),
    (dict(k_cache=FakeTensor((8, 64, 1, 512), FP8)), ValueError,
     r"k_cache: an FP8 cache has 656 bytes a token \(FlashMLA's FP8 format: 512 e4m3, 4 float32 scales, 64 bf16\) "
     r"or 576 \(per-tensor e4m3\), got 512"),
    (dict(k_cache=FakeTensor((8, 64, 1, 1152), U8)), ValueError, "k_cache: an FP8 cache has 656 bytes a token .*got 1152"),
    (dict(k_cache=FakeTensor((8, 32, 1, 656), FP8, strides=(33 * 656, 656, 656, 1))), ValueError,
     r"k_cache: page_block_size = 32 rows is not supported with an FP8 cache \(pages of 64 rows only"),
    (pt(k_cache=FakeTensor((8, 16, 1, 576), FP8)), ValueError, "k_cache: page_block_size = 16 rows is not supported with"),
    (pt(k_cache=FakeTensor((8, 128, 1, 576), U8)), ValueError, "k_cache: page_block_size = 128 rows"),
    (dict(k_cache=FakeTensor((8, 65, 1, 656), FP8)), ValueError, "k_cache: page_block_size = 65 rows"),
    (dict(k_cache=FakeTensor((8, 64, 2, 656), FP8, strides=(STRIDE * 2, 656 * 2, 656, 1))), ValueError,
     "k_cache: num_heads_k must be 1"),
    (dict(k_cache=FakeTensor((0, 64, 1, 656), FP8, strides=(STRIDE, 656, 656, 1))), ValueError, "k_cache: has no pages"),
    (dict(k_cache=FakeTensor((8, 64, 1, 576), FP8, ("cuda", 1))), ValueError, "k_cache: on cuda:1, but q is on cuda:0"),
    (dict(k_cache=fp8_656_cache(device=("cpu", None))), ValueError, "k_cache: must be on a CUDA device"),
    # Tokens a token's bytes apart, pages a whole number of token rows apart (at least 64), all
    # allocated: FlashMLA's quantizer's layout (65 rows), a contiguous cache (64), other strides
    (dict(k_cache=FakeTensor((8, 64, 1, 656), FP8, strides=(STRIDE, 672, 672, 1))), ValueError,
     r"k_cache: an FP8 cache's tokens lie 656 bytes apart and its pages a whole number of token rows apart, at least "
     r"64 \(strides \(42640, 656, 656, 1\) as FlashMLA's quantizer returns it, or \(41984, 656, 656, 1\) "
     r"contiguous\), got \(42640, 672, 672, 1\)"),
    (dict(k_cache=FakeTensor((8, 64, 1, 656), FP8, strides=(63 * 656, 656, 656, 1))), ValueError,
     r"k_cache: an FP8 cache's tokens lie 656 bytes apart .*got \(41328, 656, 656, 1\)"),
    (dict(k_cache=FakeTensor((8, 64, 1, 656), FP8, strides=(STRIDE + 16, 656, 656, 1))), ValueError,
     r"k_cache: an FP8 cache's tokens lie 656 bytes apart .*got \(42656, 656, 656, 1\)"),
    (dict(k_cache=FakeTensor((8, 64, 1, 656), U8, strides=(1, 8 * 656, 8 * 656, 8))), ValueError,
     "k_cache: an FP8 cache's tokens lie 656 bytes apart"),
    (dict(k_cache=fp8_656_cache(storage_nbytes=8 * STRIDE - 656)), ValueError,
     r"k_cache: the allocation holds 340464 bytes from the cache's start, 341120 needed \(8 pages of 65 token slots "
     r"of 656 bytes\)"),
    (dict(k_cache=fp8_656_cache(storage_nbytes=7 * STRIDE + 64 * 656)), ValueError, "k_cache: the allocation holds"),
    (pt(k_cache=FakeTensor((8, 64, 1, 576), FP8, strides=(64 * 576, 1, 1, 64))), ValueError,
     r"k_cache: an FP8 cache's tokens lie 576 bytes apart .*\(strides \(36864, 576, 576, 1\) as etap's quantizer "
     r"returns it, or \(36864, 576, 576, 1\) contiguous\), got \(36864, 1, 1, 64\)"),
    (pt(k_cache=FakeTensor((8, 64, 1, 576), FP8, strides=(64 * 576 + 576, 576, 576, 1), storage_nbytes=8 * 64 * 576)),
     ValueError, r"k_cache: the allocation holds 294912 bytes .*299520 needed \(8 pages of 65 token slots of 576 bytes\)"),
    # kv_scale: for the per-tensor format only, a finite positive float32
    (dict(kv_scale=1.0), ValueError,
     r"kv_scale: given, but k_cache is FlashMLA's FP8 format \(656 bytes a token\), which carries its own scales: "
     r"pass kv_scale=None"),
    (pt(kv_scale=None), ValueError,
     r"kv_scale: needed: k_cache of 576 bytes a token is the per-tensor e4m3 format \(value = e4m3 \* kv_scale\)"),
    (pt(kv_scale=0.0), ValueError, "kv_scale: 0.0 must be finite and positive"),
    (pt(kv_scale=-0.5), ValueError, "kv_scale: -0.5 must be finite and positive"),
    (pt(kv_scale=math.nan), ValueError, "kv_scale: nan must be finite and positive"),
    (pt(kv_scale=math.inf), ValueError, "kv_scale: inf must be finite and positive"),
    (pt(kv_scale=1e39), ValueError, r"kv_scale: 1e\+39 must be finite and positive \(as a float32, inf\)"),
    (pt(kv_scale=1e-50), ValueError, r"kv_scale: 1e-50 must be finite and positive \(as a float32, 0.0\)"),
    (pt(kv_scale="0.01"), TypeError, r"kv_scale: expected a float \(the per-tensor FP8 cache's scale, a host value\) "
                                     r"or None, got str"),
    (pt(kv_scale=True), TypeError, "kv_scale: expected a float .*got bool"),
    (pt(kv_scale=FakeTensor((), F32)), TypeError, "kv_scale: expected a float .*got FakeTensor"),
    (dict(kv_scale=math.nan), ValueError, "kv_scale: nan must be finite"),  # checked before the format
    # the tables, the rest
    (dict(block_table=FakeTensor((2, 4), I64)), TypeError, "block_table: dtype must be torch.int32"),
    (pt(block_table=FakeTensor((3, 4), I32)), ValueError, r"block_table: expected shape \[batch = 2, max_pages\]"),
    (dict(block_table=FakeTensor((2, 0), I32)), ValueError, "block_table: max_pages must be at least 1"),
    (dict(cache_seqlens=FakeTensor((2,), I32, ("cuda", 1))), ValueError, "cache_seqlens: on cuda:1"),
    (pt(cache_seqlens=FakeTensor((2,), I64)), TypeError, "cache_seqlens: dtype must be torch.int32"),
    (dict(head_dim_v=576), ValueError, "head_dim_v: must be 512"),
    (dict(causal=1), TypeError, "causal: expected a bool"),
    (dict(softmax_scale=0.0), ValueError, "softmax_scale"),
    (dict(empty_lse="nan"), ValueError, "empty_lse"),
    (dict(is_fp8_kvcache=1), TypeError, "is_fp8_kvcache: expected a bool, got int"),
    (dict(indices=FakeTensor((2, 1, 64), I32)), NotImplementedError, "indices: etap implements FlashMLA's dense decode"),
    (dict(meta=FakeTensor((132, 8), I32)), TypeError, "tile_scheduler_metadata: expected the etap.EtapMetadata"),
    (dict(num_splits=FakeTensor((3,), I32)), TypeError, "num_splits: must be None"),
    # FP8 page counts past the kernels' 32-bit rows (65 a page)
    (dict(k_cache=fp8_656_cache(33_100_000, ptr=0x10000)), ValueError, r"num_pages: 2151500065 rows exceed"),
    # outputs
    (dict(out=FakeTensor((2, 1, 16, 512), F16)), TypeError, r"out: dtype must be torch.bfloat16 \(q's dtype\)"),
    (pt(out=FakeTensor((2, 16, 1, 512))), ValueError, r"out: expected shape \[2, 1, 16, 512\]"),
    (dict(lse=FakeTensor((2, 1, 16), F32)), ValueError, r"lse: expected shape \[2, 16, 1\]"),
    # alignment
    (dict(k_cache=fp8_656_cache(ptr=0x7F0000000008)), ValueError, "k_cache at 0x7f0000000008 must be 16-byte aligned"),
    (pt(k_cache=FakeTensor((8, 64, 1, 576), FP8, ptr=0x7F0000000004)), ValueError, "k_cache at 0x7f0000000004 must be"),
]


@pytest.mark.parametrize("kw, exc, needle", BAD_FP8, ids=[f"{i}-{b[2][:40]}" for i, b in enumerate(BAD_FP8)])
def test_fp8_bad_input_raises_naming_the_argument(kw, exc, needle, monkeypatch):
    reached = []
    monkeypatch.setattr(interface, "decoder", lambda device: reached.append(device))
    with pytest.raises(exc, match=needle):
        fp8_call(**kw)
    assert not reached, "the checks must fail before any device work"


def test_a_16_bit_call_refuses_fp8_arguments(monkeypatch):
    monkeypatch.setattr(interface, "decoder", lambda device: pytest.fail("reached the device"))
    q, k, bt, sl = decode_inputs()
    meta = etap.EtapMetadata()
    with pytest.raises(ValueError, match=r"kv_scale: given with is_fp8_kvcache=False \(a 16-bit cache has no scale\)"):
        etap.flash_mla_with_kvcache(q, k, bt, sl, 512, meta, None, kv_scale=1.0)
    for cache, dt in ((fp8_656_cache(), "torch.float8_e4m3fn"), (FakeTensor((8, 64, 1, 576), U8), "torch.uint8")):
        with pytest.raises(TypeError, match=rf"k_cache: dtype {dt} is an FP8 cache's: pass is_fp8_kvcache=True "
                                            r"\(and kv_scale= for a per-tensor e4m3 cache\)"):
            etap.flash_mla_with_kvcache(q, cache, bt, sl, 512, meta, None)


class FakeDecoder:
    """Records the plan and decode calls (16-bit and FP8) it gets."""

    def __init__(self):
        self.calls = []

    def plan(self, *args, **kw):
        self.calls.append(("plan",) + args[:6] + tuple(kw.items()))
        return object()

    def replan(self, plan, seqlens, stream):
        self.calls.append(("replan", seqlens))

    def decode(self, plan, dtype, *args, **kw):
        self.calls.append(("decode", dtype) + tuple(kw.items()))

    def decode_fp8(self, plan, dtype, q, k_cache, block_table, cache_seqlens, out, lse, kv_scale, softmax_scale,
                   stream, **kw):
        self.calls.append(("decode_fp8", dtype, k_cache, kv_scale, softmax_scale) + tuple(kw.items()))


@pytest.fixture
def fake_decoder(monkeypatch):
    dec = FakeDecoder()
    monkeypatch.setattr(interface, "decoder", lambda device: dec)
    monkeypatch.setattr(interface, "_stream_handle", lambda device: 0)
    monkeypatch.setattr(interface._etap, "stream_capture_id", lambda d, s: None)
    # Room for every shape of a test (evicting one synchronizes through torch).
    monkeypatch.setattr(interface, "_plans", interface._PlanCache(limit=1000))
    return dec


def test_metadata_is_fp8_kvcache_must_match_the_call(fake_decoder):
    q, k, bt, sl = fp8_inputs()
    out, lse = FakeTensor((2, 1, 16, 512)), FakeTensor((2, 16, 1), F32)
    meta = etap.get_mla_metadata(sl, 16, 1, is_fp8_kvcache=True)[0]
    q16, k16, bt16, sl16 = decode_inputs()
    with pytest.raises(ValueError, match="tile_scheduler_metadata: made with is_fp8_kvcache=True, but this call has "
                                         "is_fp8_kvcache=False"):
        etap.flash_mla_with_kvcache(q16, k16, bt16, sl16, 512, meta, None, out=out, lse=lse)
    meta = etap.get_mla_metadata(is_fp8_kvcache=False)[0]  # False is not recorded (FlashMLA's default)
    etap.flash_mla_with_kvcache(q, k, bt, sl, 512, meta, None, is_fp8_kvcache=True, out=out, lse=lse,
                                empty_lse="-inf")
    assert [c[0] for c in fake_decoder.calls] == ["plan", "decode_fp8"]


# Past 16 (token, head) columns (CTAs of 32, column groups past 32): DeepSeek MTP (s_q 2 x h16), h32 to h128 (DP
# attention), s_q 4 x h8, a partial last group (s_q 3 x h6: 18), the most there are (s_q 8 x h128).
WIDE_FP8 = [(2, 16), (1, 17), (1, 32), (1, 64), (1, 128), (4, 8), (3, 6), (2, 128), (8, 128)]


def test_valid_fp8_calls_reach_the_device_with_their_format(fake_decoder):
    """Every s_q * h_q <= 16 and the wide shapes past it, both formats, both cache dtypes, bf16 and
    fp16 q: a plan made with the format, then decode_fp8 with q's dtype, the cache's address and
    the scale (None for the 656-byte format)."""
    narrow = [(s, h) for s in range(1, 9) for h in range(1, 17) if s * h <= 16]
    for s_q, h_q, q_dtype in [(s, h, d) for s, h in narrow + WIDE_FP8 for d in (BF16, F16)]:
        dtype = "bf16" if q_dtype is BF16 else "f16"
        for fmt, kv_scale in (("fp8_656", None), ("fp8_per_tensor", 0.0123)):
            for cache_dtype in (FP8, U8):
                fake_decoder.calls.clear()
                q, k, bt, sl = fp8_inputs(b=3, s_q=s_q, h_q=h_q, kv_format=fmt, cache_dtype=cache_dtype,
                                          q_dtype=q_dtype)
                out, lse = FakeTensor((3, s_q, h_q, 512), q_dtype), FakeTensor((3, h_q, s_q), F32)
                meta = etap.get_mla_metadata(sl, s_q * h_q, 1, is_fp8_kvcache=True)[0]
                o, l = etap.flash_mla_with_kvcache(q, k, bt, sl, 512, meta, None, 0.25, True, True,
                                                   kv_scale=kv_scale, out=out, lse=lse, empty_lse="-inf")
                assert (o, l) == (out, lse)
                # The plan cache holds a plan per shape and format (not per q dtype): the first
                # call of a shape and format plans, every later one re-plans.
                first = q_dtype is BF16 and cache_dtype is FP8
                assert [c[0] for c in fake_decoder.calls] == ["plan" if first else "replan", "decode_fp8"]
                if first:
                    assert fake_decoder.calls[0] == ("plan", 3, s_q, h_q, 8, 4, 64, ("kv_format", fmt))
                assert fake_decoder.calls[-1] == ("decode_fp8", dtype, k.data_ptr(), kv_scale, 0.25)
    # An int scale is a float to the kernel.
    q, k, bt, sl = fp8_inputs(kv_format="fp8_per_tensor")
    etap.flash_mla_with_kvcache(q, k, bt, sl, 512, etap.get_mla_metadata()[0], None, causal=True, is_fp8_kvcache=True,
                                kv_scale=2, out=FakeTensor((2, 1, 16, 512)), lse=FakeTensor((2, 16, 1), F32),
                                empty_lse="-inf")
    assert fake_decoder.calls[-1][3] == 2.0 and isinstance(fake_decoder.calls[-1][3], float)


def test_one_plan_per_format(fake_decoder):
    """The same shape with a 16-bit cache, FlashMLA's FP8 cache and a per-tensor one: three
    plans, each made for its format and keyed by it; a metadata planned for one is refused for
    another."""
    q, k16, bt, sl = decode_inputs()
    _, k656, _, _ = fp8_inputs(kv_format="fp8_656")
    _, kpt, _, _ = fp8_inputs(kv_format="fp8_per_tensor")
    out, lse = FakeTensor((2, 1, 16, 512)), FakeTensor((2, 16, 1), F32)
    metas = {}
    for name, k, kw in (("bf16", k16, {}), ("fp8_656", k656, dict(is_fp8_kvcache=True)),
                        ("fp8_per_tensor", kpt, dict(is_fp8_kvcache=True, kv_scale=0.5))):
        metas[name] = etap.get_mla_metadata()[0]
        for _ in range(2):  # two layers: one plan, not re-planned
            etap.flash_mla_with_kvcache(q, k, bt, sl, 512, metas[name], None, out=out, lse=lse, empty_lse="-inf", **kw)
    assert [c for c in fake_decoder.calls if c[0] == "plan"] == [
        ("plan", 2, 1, 16, 8, 4, 64),
        ("plan", 2, 1, 16, 8, 4, 64, ("kv_format", "fp8_656")),
        ("plan", 2, 1, 16, 8, 4, 64, ("kv_format", "fp8_per_tensor")),
    ]
    assert [c[0] for c in fake_decoder.calls] == ["plan", "decode", "decode"] + ["plan", "decode_fp8", "decode_fp8"] * 2
    assert sorted(interface._plans.plans, key=len) == [(0, 2, 1, 16, 8, 4, 64), (0, 2, 1, 16, 8, 4, 64, "fp8_656"),
                                                       (0, 2, 1, 16, 8, 4, 64, "fp8_per_tensor")]
    with pytest.raises(ValueError, match=r"tile_scheduler_metadata: planned for another shape \(batch, s_q, h_q, "
                                         r"num_pages, max_pages, page_size = \(2, 1, 16, 8, 4, 64\)\); this call has "
                                         r"\(2, 1, 16, 8, 4, 64, 'fp8_656'\)"):
        etap.flash_mla_with_kvcache(q, k656, bt, sl, 512, metas["bf16"], None, is_fp8_kvcache=True, out=out, lse=lse)
    with pytest.raises(ValueError, match=r"planned for another shape \(batch, s_q, h_q, num_pages, max_pages, "
                                         r"page_size, kv_format = \(2, 1, 16, 8, 4, 64, 'fp8_656'\)\); this call has "
                                         r"\(2, 1, 16, 8, 4, 64, 'fp8_per_tensor'\)"):
        etap.flash_mla_with_kvcache(q, kpt, bt, sl, 512, metas["fp8_656"], None, is_fp8_kvcache=True, kv_scale=0.5,
                                    out=out, lse=lse)
    # A new step of the FP8 shape re-plans the FP8 plan, not another.
    fake_decoder.calls.clear()
    etap.flash_mla_with_kvcache(q, k656, bt, sl, 512, etap.get_mla_metadata()[0], None, is_fp8_kvcache=True, out=out,
                                lse=lse, empty_lse="-inf")
    assert [c[0] for c in fake_decoder.calls] == ["replan", "decode_fp8"]


def test_fp8_page_strides_reach_the_plan(fake_decoder):
    """An FP8 cache whose pages lie another whole number of token rows apart than its format's
    own layout (at least 64): a contiguous [num_blocks, 64, 1, 656] cache (vLLM's layout of
    FlashMLA's format, 64 rows), wider strides in both formats. The plan is made with the stride
    (kv_page_stride, rows) and keyed by it; the format's own layout passes none; the checks
    count the allocation by the stride."""
    out, lse = FakeTensor((2, 1, 16, 512)), FakeTensor((2, 16, 1), F32)
    q, k65, bt, sl = fp8_inputs(kv_format="fp8_656")
    cases = [
        ("fp8_656", None, k65, None),
        ("fp8_656", None, FakeTensor((8, 64, 1, 656), FP8), 64),
        ("fp8_656", None, FakeTensor((8, 64, 1, 656), U8, strides=(2 * STRIDE, 656, 656, 1),
                                     storage_nbytes=16 * STRIDE), 130),
        ("fp8_per_tensor", 0.5, FakeTensor((8, 64, 1, 576), FP8), None),
        ("fp8_per_tensor", 0.5, FakeTensor((8, 64, 1, 576), FP8, strides=(65 * 576, 576, 576, 1),
                                           storage_nbytes=8 * 65 * 576), 65),
    ]
    for fmt, scale, k, rows in cases:
        assert _checks.check_fp8_decode_args(q, k, bt, sl)[3:] == (fmt, rows)
        fake_decoder.calls.clear()
        etap.flash_mla_with_kvcache(q, k, bt, sl, 512, etap.get_mla_metadata()[0], None, is_fp8_kvcache=True,
                                    kv_scale=scale, out=out, lse=lse, empty_lse="-inf")
        want = (("kv_format", fmt),) + (() if rows is None else (("kv_page_stride", rows),))
        assert fake_decoder.calls[0] == ("plan", 2, 1, 16, 8, 4, 64) + want
        p = etap.plan(q, k, bt, sl)
        assert (p.kv_format, p.kv_page_stride) == (fmt, rows)
        assert fake_decoder.calls[-1] == ("plan", 2, 1, 16, 8, 4, 64) + want
    # One plan a (shape, format, stride).
    assert sorted(k[7:] for k in interface._plans.plans) == [
        ("fp8_656",), ("fp8_656", 64), ("fp8_656", 130), ("fp8_per_tensor",), ("fp8_per_tensor", 65)]
    # The allocation counts the pages by their stride.
    with pytest.raises(ValueError, match=r"k_cache: the allocation holds 335216 bytes from the cache's start, 335872 "
                                         r"needed \(8 pages of 64 token slots of 656 bytes\)"):
        etap.flash_mla_with_kvcache(q, FakeTensor((8, 64, 1, 656), FP8, storage_nbytes=8 * 64 * 656 - 656), bt, sl,
                                    512, etap.get_mla_metadata()[0], None, is_fp8_kvcache=True, out=out, lse=lse)
    # A plan of one stride refuses a cache of another.
    p = etap.plan(q, k65, bt, sl)
    fake_decoder.calls.clear()
    with pytest.raises(ValueError, match=r"k_cache: its pages lie 130 token rows apart, the plan was made for its "
                                         r"format's own"):
        etap.decode(p, q, cases[2][2], bt, sl, out=out, lse=lse)
    p64 = etap.plan(q, cases[1][2], bt, sl)
    with pytest.raises(ValueError, match=r"k_cache: its pages lie its format's own token rows apart, the plan was "
                                         r"made for 64"):
        etap.decode(p64, q, k65, bt, sl, out=out, lse=lse)
    assert [c[0] for c in fake_decoder.calls] == ["plan"]


def test_outputs_must_not_overlap_the_strided_cache(fake_decoder):
    """The 656-byte cache's extent is its pages' (65 slots apart), not 64 tokens a page: an out
    inside its last pages is caught."""
    q, k, bt, sl = fp8_inputs()
    lse = FakeTensor((2, 16, 1), F32)
    for at in (0, 3 * STRIDE + 64 * 656, 7 * STRIDE + 63 * 656):
        out = FakeTensor((2, 1, 16, 512), ptr=k.data_ptr() + at)
        with pytest.raises(ValueError, match="out: overlaps k_cache"):
            etap.flash_mla_with_kvcache(q, k, bt, sl, 512, etap.EtapMetadata(), None, is_fp8_kvcache=True, out=out,
                                        lse=lse)
    assert fake_decoder.calls == []


# --- etap.plan / etap.decode over FP8 caches ------------------------------------------------------


def test_native_plan_reads_the_format_from_the_cache(fake_decoder):
    out, lse = FakeTensor((2, 1, 16, 512)), FakeTensor((2, 16, 1), F32)
    plans = {}
    for fmt, scale in (("fp8_656", None), ("fp8_per_tensor", 0.03)):
        for cache_dtype in (FP8, U8):
            q, k, bt, sl = fp8_inputs(kv_format=fmt, cache_dtype=cache_dtype)
            fake_decoder.calls.clear()
            p = etap.plan(q, k, bt, sl)
            assert p.kv_format == fmt and p.shape == (2, 1, 16, 8, 4, 64) and p.total_q is None
            assert fake_decoder.calls == [("plan", 2, 1, 16, 8, 4, 64, ("kv_format", fmt))]
            assert etap.decode(p, q, k, bt, sl, 0.5, out=out, lse=lse, kv_scale=scale) == (out, lse)
            assert fake_decoder.calls[-1] == ("decode_fp8", "bf16", k.data_ptr(), scale, 0.5)
            plans[fmt] = (p, q, k, bt, sl)
    q16, k16, bt16, sl16 = decode_inputs()
    p16 = etap.plan(q16, k16, bt16, sl16)
    assert p16.kv_format is None
    fake_decoder.calls.clear()
    p656, q, k656, bt, sl = plans["fp8_656"]
    ppt, _, kpt, _, _ = plans["fp8_per_tensor"]
    for p, k, kw, exc, needle in (
        (p656, kpt, dict(kv_scale=1.0), ValueError,
         r"plan: made for FlashMLA's FP8 cache \(kv_format 'fp8_656', 656 bytes a token\), but k_cache is a per-tensor "
         r"e4m3 cache \(kv_format 'fp8_per_tensor', 576 bytes a token\): make a plan for this cache"),
        (ppt, k656, {}, ValueError, "plan: made for a per-tensor e4m3 cache .*, but k_cache is FlashMLA's FP8 cache"),
        (p16, k656, {}, ValueError, "plan: made for a 16-bit cache, but k_cache is FlashMLA's FP8 cache"),
        (p656, k16, {}, ValueError, "plan: made for FlashMLA's FP8 cache .*, but k_cache is a 16-bit cache"),
        (p656, k656, dict(kv_scale=1.0), ValueError, "kv_scale: given, but k_cache is FlashMLA's FP8 format"),
        (ppt, kpt, {}, ValueError, "kv_scale: needed: k_cache of 576 bytes a token"),
        (ppt, kpt, dict(kv_scale=-1.0), ValueError, "kv_scale: -1.0 must be finite and positive"),
        (ppt, kpt, dict(kv_scale="1"), TypeError, "kv_scale: expected a float"),
        (p16, k16, dict(kv_scale=1.0), ValueError, r"kv_scale: given for a 16-bit cache"),
        (p656, fp8_656_cache(storage_nbytes=100), {}, ValueError, "k_cache: the allocation holds 100 bytes"),
        (p656, FakeTensor((8, 64, 1, 656), FP8), {}, ValueError,
         r"k_cache: its pages lie 64 token rows apart, the plan was made for its format's own: make a plan for this "
         r"cache"),
        (p656, fp8_656_cache(9), {}, ValueError, r"plan: made for .*\(2, 1, 16, 8, 4, 64\), this call has "
                                                 r"\(2, 1, 16, 9, 4, 64\)"),
    ):
        qq = q16 if k is k16 else q
        with pytest.raises(exc, match=needle):
            etap.decode(p, qq, k, bt, sl, out=out, lse=lse, **kw)
    with pytest.raises(TypeError, match="q: dtype must be torch.bfloat16 or torch.float16"):
        etap.decode(p656, FakeTensor((2, 1, 16, 576), F32), k656, bt, sl, out=out, lse=lse)
    with pytest.raises(ValueError, match="cu_seqlens_q: given, but the plan was made for the uniform layout"):
        etap.decode(p656, FakeTensor((2, 16, 576)), k656, bt, sl, cu_seqlens_q=FakeTensor((3,), I32), max_seqlen_q=1)
    assert fake_decoder.calls == [], "a refused call must not reach the device"


def test_native_plan_fp8_errors(fake_decoder):
    q, k, bt, sl = fp8_inputs()
    with pytest.raises(TypeError, match="max_seqlen_q: given without cu_seqlens_q"):
        etap.plan(q, k, bt, sl, max_seqlen_q=1)
    # Past 16 columns is a plan (test_native_plan_and_decode_past_16_columns); past the shape's limits is not.
    with pytest.raises(ValueError, match="q: h_q = 129 heads is not supported"):
        etap.plan(FakeTensor((2, 1, 129, 576)), k, bt, sl)
    with pytest.raises(TypeError, match="q: dtype must be torch.bfloat16 or torch.float16"):
        etap.plan(FakeTensor((2, 1, 16, 576), F32), k, bt, sl)
    with pytest.raises(ValueError, match="k_cache: page_block_size = 32 rows is not supported with an FP8 cache"):
        etap.plan(q, FakeTensor((8, 32, 1, 576), U8), bt, sl)
    assert fake_decoder.calls == []


# --- etap's Rust quantizers (etap._etap), against the formats' definitions ----------------------


def e4m3_value(code):
    """The value of a float8_e4m3fn code (its definition: 1 sign, 4 exponent bits of bias 7, 3
    mantissa bits, subnormals, NaN = S.1111.111, no infinities)."""
    sign = -1.0 if code & 0x80 else 1.0
    e, m = (code >> 3) & 0xF, code & 7
    if e == 15 and m == 7:
        return math.nan
    if e == 0:
        return sign * m / 8 * 2.0**-6
    return sign * (1 + m / 8) * 2.0 ** (e - 7)


CODES = [c for c in range(256) if not math.isnan(e4m3_value(c))]
# The non-negative codes by value (0x00 = 0 to 0x7E = 448), for the nearest-value search.
_POS = sorted((e4m3_value(c), c) for c in range(0x7F))


def nearest_e4m3(x):
    """The e4m3 code nearest x, ties to the even code, by its sign and the nearest magnitude
    (zero keeps x's sign); NaN for NaN and above 464 in magnitude (where 480, no e4m3fn value,
    would be the nearest)."""
    neg = math.copysign(1.0, x) < 0
    a = abs(x)
    if math.isnan(x) or a > 464:
        return 0xFF if neg else 0x7F
    i = bisect.bisect_left(_POS, (a, -1))
    if i == len(_POS):
        code = _POS[-1][1]
    elif _POS[i][0] == a or i == 0:
        code = _POS[i][1]
    else:
        (lo, clo), (hi, chi) = _POS[i - 1], _POS[i]
        if a - lo != hi - a:
            code = clo if a - lo < hi - a else chi
        else:
            code = clo if clo % 2 == 0 else chi
    return code | (0x80 if neg else 0)


def f32(x):
    return struct.unpack("<f", struct.pack("<f", x))[0]


def f32_bytes(values):
    return struct.pack(f"<{len(values)}f", *values)


def test_rust_e4m3_cast_is_round_to_nearest_even():
    rng = random.Random(7)
    values = [0.0, -0.0, 1.0, 1.0625, 1.0626, 1.1875, 448.0, 460.0, -464.0, 464.0001, 470.0, 480.0, -1e9, 2.0**-10,
              2.0**-10 * 1.01, -(2.0**-9), 1.96, 2.0**-7 * 1.5, 15.5, 0.01]
    for c in CODES:  # every code, the midpoints to its neighbours, and just off them
        v = e4m3_value(c)
        values += [v, f32(v * (1 + 2.0**-20)), f32(v * (1 - 2.0**-20))]
    mids = sorted({e4m3_value(c) for c in CODES})
    values += [f32((a + b) / 2) for a, b in zip(mids, mids[1:])]
    values += [f32(rng.uniform(-500, 500)) for _ in range(2000)] + [f32(rng.uniform(-0.02, 0.02)) for _ in range(2000)]
    got = _etap.e4m3_from_f32(f32_bytes(values))
    assert len(got) == len(values)
    for x, b in zip(values, got):
        assert b == nearest_e4m3(x), f"{x!r}: got {b:#04x}, want {nearest_e4m3(x):#04x}"
    nan = _etap.e4m3_from_f32(f32_bytes([math.nan, math.inf, -math.inf]))
    assert [b & 0x7F for b in nan] == [0x7F] * 3
    with pytest.raises(ValueError, match="values: float32 bytes expected"):
        _etap.e4m3_from_f32(b"\x00" * 6)


def bf16_bits(x):
    """The bf16 bits of x (x must be a bf16 value)."""
    bits = struct.unpack("<I", struct.pack("<f", x))[0]
    assert bits & 0xFFFF == 0 or math.isnan(x), x
    return bits >> 16


def bf16_cache_bytes(values):
    return struct.pack(f"<{len(values)}H", *(bf16_bits(v) for v in values))


def random_bf16(rng, lo=-3.0, hi=3.0):
    bits = struct.unpack("<I", struct.pack("<f", rng.uniform(lo, hi)))[0]
    return struct.unpack("<f", struct.pack("<I", bits & 0xFFFF0000))[0]


def test_rust_656_quantizer_follows_the_format():
    """Two pages of FlashMLA's format from etap's quantizer: each token's scales are the power
    of two at or above max(amax / 448, 1e-4) (NaN ignored), each byte the e4m3 nearest value /
    scale, the RoPE part the bf16 bits, the 65th slot of each page zero; dequantized back within
    e4m3's rounding."""
    rng = random.Random(11)
    pages = 2
    cache = []
    for p in range(pages):
        for t in range(64):
            kind = (p * 64 + t) % 8
            row = [random_bf16(rng) for _ in range(576)]
            if kind == 1:
                row[:128] = [0.0] * 128  # a zero tile: scale 2^-13
            elif kind == 2:
                row[128:256] = [random_bf16(rng, -1e-6, 1e-6) for _ in range(128)]  # under the 1e-4 margin
            elif kind == 3:
                row[256] = 448.0 * 4  # amax / 448 a power of two: scale 4 exactly
                row[257:384] = [random_bf16(rng, -100, 100) for _ in range(127)]
            elif kind == 4:
                row[384] = 450.0  # just above 448: scale 2
                row[385:512] = [random_bf16(rng, -1, 1) for _ in range(127)]
            elif kind == 5:
                row[5] = math.nan  # a NaN value: ignored by amax, NaN itself
                row[300] = -math.nan
            elif kind == 6:
                row = [math.nan] * 576  # a poisoned token (past a request's length)
            elif kind == 7:
                row[:512] = [random_bf16(rng, -3e38, 3e38) for _ in range(512)]  # near bf16's largest
            cache.append(row)
    data = _etap.quantize_fp8_656(bf16_cache_bytes([v for row in cache for v in row]), pages)
    assert len(data) == pages * STRIDE
    for p in range(pages):
        assert data[p * STRIDE + 64 * 656 : (p + 1) * STRIDE] == bytes(656), "the 65th slot is not zero"
        for t in range(64):
            row = cache[p * 64 + t]
            tok = data[p * STRIDE + t * 656 : p * STRIDE + (t + 1) * 656]
            scales = struct.unpack("<4f", tok[512:528])
            for i in range(4):
                vals = row[128 * i : 128 * (i + 1)]
                amax = max((abs(v) for v in vals if not math.isnan(v)), default=0.0)
                v = max(f32(amax / 448), f32(1e-4))
                want = 2.0 ** math.ceil(math.log2(v))
                assert scales[i] == want, (p, t, i, amax, scales[i], want)
                for j, x in enumerate(vals):
                    b = tok[128 * i + j]
                    if math.isnan(x):
                        assert b & 0x7F == 0x7F
                    else:
                        assert b == nearest_e4m3(x / want), (p, t, i, j, x, want, b)
            assert struct.unpack("<64H", tok[528:656]) == tuple(bf16_bits(v) for v in row[512:]), (p, t)
    # Back to bf16: e4m3 x scale, exact in bf16; within e4m3's rounding of the input.
    back = _etap.dequantize_fp8_656(data, pages)
    assert len(back) == pages * 64 * 576 * 2
    got = [struct.unpack("<f", struct.pack("<I", h << 16))[0] for h in struct.unpack(f"<{pages * 64 * 576}H", back)]
    for r, row in enumerate(cache):
        tok = data[(r // 64) * STRIDE + (r % 64) * 656 :][:656]
        scales = struct.unpack("<4f", tok[512:528])
        for d, x in enumerate(row):
            y = got[r * 576 + d]
            if math.isnan(x):
                assert math.isnan(y)
            elif d >= 512:
                assert y == x  # RoPE: as stored
            else:
                s = scales[d // 128]
                assert y == e4m3_value(tok[d]) * s
                assert abs(y - x) <= max(abs(x) * 2.0**-4, 2.0**-10 * s), (r, d, x, y, s)
    for bad, needle in ((lambda: _etap.quantize_fp8_656(b"\x00" * 10, 1), "cache: expected 73728 bytes"),
                        (lambda: _etap.dequantize_fp8_656(b"\x00" * STRIDE, 2), "data: expected 85280 bytes")):
        with pytest.raises(ValueError, match=needle):
            bad()


def test_rust_per_tensor_quantizer_follows_the_format():
    rng = random.Random(13)
    values = [random_bf16(rng, -40, 40) for _ in range(3000)] + [math.nan, 0.0, -0.0, 37.5]
    raw = bf16_cache_bytes(values)
    scale = _etap.per_tensor_scale(raw)
    amax = max(abs(v) for v in values if not math.isnan(v))
    assert scale == f32(amax / 448) and scale != 2.0 ** round(math.log2(scale))  # not a power of two here
    data = _etap.quantize_e4m3_per_tensor(raw, scale)
    assert len(data) == len(values)
    back = struct.unpack(f"<{len(values)}H", _etap.dequantize_e4m3_per_tensor(data, scale))
    for x, b, h in zip(values, data, back):
        y = struct.unpack("<f", struct.pack("<I", h << 16))[0]
        if math.isnan(x):
            assert b & 0x7F == 0x7F and math.isnan(y)
            continue
        assert b == nearest_e4m3(f32(x / scale)), (x, b)
        assert y == struct.unpack("<f", struct.pack("<I", bf16_bits_rne(e4m3_value(b) * scale) << 16))[0]
        assert abs(y - x) <= abs(x) * (2.0**-4 + 2.0**-8) + 2.0**-10 * scale, (x, y)
    assert _etap.per_tensor_scale(bf16_cache_bytes([0.0, -0.0, math.nan])) == 1.0
    for bad in (0.0, -1.0, math.nan, math.inf, 1e39, 1e-50):
        with pytest.raises(ValueError, match="kv_scale: .* must be finite and positive"):
            _etap.quantize_e4m3_per_tensor(raw, bad)
        with pytest.raises(ValueError, match="kv_scale"):
            _etap.dequantize_e4m3_per_tensor(data, bad)
    with pytest.raises(ValueError, match="cache: expected 2 bytes"):
        _etap.quantize_e4m3_per_tensor(b"\x00\x01\x02", 1.0)


def bf16_bits_rne(x):
    """The bits of a float rounded to float32 and then to bf16, to nearest even."""
    bits = struct.unpack("<I", struct.pack("<f", f32(x)))[0]
    return (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16


def test_native_plan_and_decode_past_16_columns(fake_decoder):
    """etap.plan / etap.decode over an FP8 cache past 16 columns: checked as at 16, planned with
    the format (the native plan runs CTAs of 32, column groups past 32), decoded with decode_fp8."""
    for s_q, h_q in WIDE_FP8:
        for fmt, scale in (("fp8_656", None), ("fp8_per_tensor", 0.03)):
            q, k, bt, sl = fp8_inputs(b=3, s_q=s_q, h_q=h_q, kv_format=fmt)
            out, lse = FakeTensor((3, s_q, h_q, 512)), FakeTensor((3, h_q, s_q), F32)
            fake_decoder.calls.clear()
            p = etap.plan(q, k, bt, sl)
            assert p.kv_format == fmt and p.shape == (3, s_q, h_q, 8, 4, 64)
            assert fake_decoder.calls == [("plan", 3, s_q, h_q, 8, 4, 64, ("kv_format", fmt))]
            assert etap.decode(p, q, k, bt, sl, out=out, lse=lse, kv_scale=scale) == (out, lse)
            assert fake_decoder.calls[-1] == ("decode_fp8", "bf16", k.data_ptr(), scale, None)
            # The shape's own checks still hold: another s_q * h_q than the plan's is refused.
            q2 = FakeTensor((3, s_q, h_q + 1 if h_q < 128 else h_q - 1, 576))
            with pytest.raises(ValueError, match="plan: made for"):
                etap.decode(p, q2, k, bt, sl, kv_scale=scale, out=FakeTensor((3, s_q, q2.shape[2], 512)),
                            lse=FakeTensor((3, q2.shape[2], s_q), F32))


# --- the packed query layout over an FP8 cache (etap.plan / etap.decode with cu_seqlens_q) -----------
# b = 3 requests of at most 2 tokens, 5 tokens in all: q [5, h_q, 576], cu_seqlens_q int32[4].


def fp8_packed_args(kv_format="fp8_656", b=3, max_seqlen_q=2, total_q=5, h_q=6, cache_dtype=FP8, q_dtype=BF16):
    _, k, bt, sl = fp8_inputs(b=b, h_q=h_q, kv_format=kv_format, cache_dtype=cache_dtype)
    return dict(q=FakeTensor((total_q, h_q, 576), q_dtype), k_cache=k, block_table=bt, cache_seqlens=sl,
                cu_seqlens_q=FakeTensor((b + 1,), I32), max_seqlen_q=max_seqlen_q)


def test_fp8_packed_plan_and_decode_reach_the_device(fake_decoder):
    """Both formats and cache dtypes, bf16 and fp16 q, 1 to 128 heads (CTAs of 16, of 32 and column
    groups of 32), every total_q kind: the plan is made with total_q and the format, the decode
    goes to decode_fp8 with the offsets' address and the scale."""
    for h_q, max_seqlen_q, b in ((6, 2, 3), (16, 1, 2), (16, 2, 4), (64, 8, 2), (128, 3, 5), (1, 8, 1)):
        for total_q in sorted({1, b * max_seqlen_q // 2 or 1, b * max_seqlen_q}):
            for fmt, scale in (("fp8_656", None), ("fp8_per_tensor", 0.03)):
                for cache_dtype, q_dtype in ((FP8, BF16), (U8, F16)):
                    fake_decoder.calls.clear()
                    a = fp8_packed_args(fmt, b, max_seqlen_q, total_q, h_q, cache_dtype, q_dtype)
                    p = etap.plan(a["q"], a["k_cache"], a["block_table"], a["cache_seqlens"],
                                  cu_seqlens_q=a["cu_seqlens_q"], max_seqlen_q=max_seqlen_q)
                    assert p.shape == (b, max_seqlen_q, h_q, 8, 4, 64) and p.total_q == total_q
                    assert p.kv_format == fmt
                    assert fake_decoder.calls == [("plan", b, max_seqlen_q, h_q, 8, 4, 64, ("total_q", total_q),
                                                   ("kv_format", fmt))]
                    out, lse = FakeTensor((total_q, h_q, 512), q_dtype), FakeTensor((total_q, h_q), F32)
                    o, l = etap.decode(p, a["q"], a["k_cache"], a["block_table"], a["cache_seqlens"], 0.5,
                                       cu_seqlens_q=a["cu_seqlens_q"], max_seqlen_q=max_seqlen_q, out=out, lse=lse,
                                       kv_scale=scale)
                    assert (o, l) == (out, lse)
                    name = "bf16" if q_dtype is BF16 else "f16"
                    assert fake_decoder.calls[-1] == ("decode_fp8", name, a["k_cache"].data_ptr(), scale, 0.5,
                                                      ("cu_seqlens_q", a["cu_seqlens_q"].data_ptr()))


BAD_FP8_PACKED = [
    # The packed layout's own checks (shared with the 16-bit cache's).
    (dict(q=FakeTensor((3, 2, 6, 576))), ValueError, r"q: expected 3 dims \[total_q, h_q, 576\] with cu_seqlens_q"),
    (dict(q=FakeTensor((7, 6, 576))), ValueError, "q: total_q = 7 query tokens do not fit 3 requests"),
    (dict(q=FakeTensor((5, 6, 576), F32)), TypeError, "q: dtype must be torch.bfloat16 or torch.float16"),
    (dict(cu_seqlens_q=FakeTensor((4,), I64)), TypeError, "cu_seqlens_q: dtype must be torch.int32"),
    (dict(cu_seqlens_q=FakeTensor((5,), I32)), ValueError, r"block_table: expected shape \[batch = 4, max_pages\]"),
    (dict(max_seqlen_q=9), ValueError, "max_seqlen_q: 9 query tokens per request is not supported"),
    (dict(max_seqlen_q=None), TypeError, "max_seqlen_q: needed with cu_seqlens_q"),
    (dict(causal=False), NotImplementedError, "causal=False with max_seqlen_q > 1"),
    # The FP8 cache's own.
    (dict(k_cache=FakeTensor((8, 32, 1, 576), U8)), ValueError,
     "k_cache: page_block_size = 32 rows is not supported with an FP8 cache"),
    (dict(k_cache=FakeTensor((8, 64, 1, 600), U8)), ValueError, "k_cache: an FP8 cache has 656 bytes a token"),
    (dict(k_cache=FakeTensor((8, 64, 1, 656), FP8, strides=(STRIDE, 672, 672, 1))), ValueError,
     "k_cache: an FP8 cache's tokens lie 656 bytes apart"),
    (dict(k_cache=fp8_656_cache(device=("cuda", 1))), ValueError, "k_cache: on cuda:1, but q is on cuda:0"),
]


@pytest.mark.parametrize("kw, exc, needle", BAD_FP8_PACKED, ids=[f"{i}-{b[2][:30]}" for i, b in enumerate(BAD_FP8_PACKED)])
def test_fp8_packed_plan_bad_input_raises_naming_the_argument(kw, exc, needle, fake_decoder):
    args = fp8_packed_args()
    args.update(kw)
    causal = args.pop("causal", True)
    with pytest.raises(exc, match=needle):
        etap.plan(args.pop("q"), args.pop("k_cache"), args.pop("block_table"), args.pop("cache_seqlens"), causal,
                  **args)
    assert fake_decoder.calls == [], "the checks must fail before any device work"


def test_fp8_packed_decode_refuses_another_plan_or_scale(fake_decoder):
    """A packed FP8 plan serves its layout, format and total_q only; the scale belongs to the
    per-tensor format; each refusal before any device work."""
    a = fp8_packed_args("fp8_per_tensor")
    p = etap.plan(a["q"], a["k_cache"], a["block_table"], a["cache_seqlens"], cu_seqlens_q=a["cu_seqlens_q"],
                  max_seqlen_q=2)
    a656 = fp8_packed_args("fp8_656")
    p656 = etap.plan(a656["q"], a656["k_cache"], a656["block_table"], a656["cache_seqlens"],
                     cu_seqlens_q=a656["cu_seqlens_q"], max_seqlen_q=2)
    q_u, k_u, bt_u, sl_u = fp8_inputs(b=3, s_q=2, h_q=6, kv_format="fp8_per_tensor")
    p_uniform = etap.plan(q_u, k_u, bt_u, sl_u)
    _, k16, _, _ = decode_inputs(b=3, h_q=6)
    fake_decoder.calls.clear()
    out, lse = FakeTensor((5, 6, 512)), FakeTensor((5, 6), F32)
    packed = dict(cu_seqlens_q=a["cu_seqlens_q"], max_seqlen_q=2, out=out, lse=lse)
    for plan, k, kw, exc, needle in (
        (p, a["k_cache"], {}, ValueError, "kv_scale: needed: k_cache of 576 bytes a token"),
        (p, a["k_cache"], dict(kv_scale=float("inf")), ValueError, "kv_scale: inf must be finite and positive"),
        (p656, a656["k_cache"], dict(kv_scale=1.0), ValueError, "kv_scale: given, but k_cache is FlashMLA's FP8 format"),
        (p656, a["k_cache"], dict(kv_scale=1.0), ValueError,
         r"plan: made for FlashMLA's FP8 cache .*, but k_cache is a per-tensor e4m3 cache"),
        (p, k16, {}, ValueError, r"plan: made for a per-tensor e4m3 cache .*, but k_cache is a 16-bit cache"),
        (p_uniform, a["k_cache"], dict(kv_scale=1.0), ValueError,
         "cu_seqlens_q: given, but the plan was made for the uniform layout"),
        (p, a["k_cache"], dict(kv_scale=1.0, max_seqlen_q=3), ValueError,
         r"plan: made for \(batch, max_seqlen_q, h_q, num_pages, max_pages, page_size, total_q\) = "
         r"\(3, 2, 6, 8, 4, 64, 5\), this call has \(3, 3, 6, 8, 4, 64, 5\)"),
    ):
        q = FakeTensor((5, 6, 576)) if k is not k16 else FakeTensor((5, 6, 576), BF16)
        with pytest.raises(exc, match=needle):
            etap.decode(plan, q, k, a["block_table"], a["cache_seqlens"], **dict(packed, **kw))
    with pytest.raises(ValueError, match="cu_seqlens_q: needed: the plan was made for the packed layout"):
        etap.decode(p, q_u, k_u, bt_u, sl_u, kv_scale=1.0, out=FakeTensor((3, 2, 6, 512)),
                    lse=FakeTensor((3, 6, 2), F32))
    with pytest.raises(ValueError, match="out: overlaps cu_seqlens_q"):
        etap.decode(p, a["q"], a["k_cache"], a["block_table"], a["cache_seqlens"], kv_scale=1.0,
                    **dict(packed, out=FakeTensor((5, 6, 512), ptr=a["cu_seqlens_q"].data_ptr())))
    assert fake_decoder.calls == [], "a refused call must not reach the device"

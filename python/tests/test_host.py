"""Host-side tests: the package imports, and every argument check raises the right exception,
naming the argument, before anything reaches the GPU. No torch, no GPU: tensors are fakes with
the attributes the checks read (tests/fake.py)."""

import math

import pytest

import etap
from etap import _etap, interface
from fake import BF16, F16, F32, I32, I64, FakeTensor, decode_inputs


def test_import_and_constants():
    assert etap.D_QK == 576 and etap.D_V == 512
    assert etap.MAX_HEADS == 128 and etap.MAX_S_Q == 8
    assert etap.PAGE_SIZES == (16, 32, 64, 128) and etap.DEFAULT_PAGE_SIZE == 64
    assert (_etap.MAX_HEADS, _etap.MAX_S_Q, list(_etap.PAGE_SIZES)) == (128, 8, [16, 32, 64, 128])
    # The old limits' names are gone (a caller reading them would get the old, wrong limits).
    for old in ("SUPPORTED_HEADS", "PAGE_ROWS"):
        assert not hasattr(etap, old) and not hasattr(_etap, old), old
    assert isinstance(etap.__version__, str) and etap.__version__
    for name in ("get_mla_metadata", "flash_mla_with_kvcache", "merge_states", "plan", "decode"):
        assert callable(getattr(etap, name))
    from etap import reference

    for name in ("make_packed_inputs", "mla_decode_packed_reference"):
        assert callable(getattr(reference, name))


@pytest.mark.parametrize(
    "shape, needle",
    [
        ((0, 1, 16, 8, 4, 64), "empty batch"),
        ((2, 0, 16, 8, 4, 64), r"s_q = 0 is not supported \(supported: 1 to 8\)"),
        ((2, 9, 16, 8, 4, 64), r"s_q = 9 is not supported \(supported: 1 to 8\)"),
        ((2, 1, 0, 8, 4, 64), r"h_q = 0 is not supported \(supported: 1 to 128\)"),
        ((2, 1, 129, 8, 4, 64), r"h_q = 129 is not supported"),
        ((2, 1, 256, 8, 4, 64), "h_q = 256"),
        ((2, 1, 16, 8, 4, 8), r"page_size = 8 rows is not supported \(supported: \[16, 32, 64, 128\]\)"),
        ((2, 1, 16, 8, 4, 256), "page_size = 256 rows is not supported"),
        ((2, 1, 16, 8, 4, 48), "page_size = 48 rows is not supported"),
        ((2, 1, 16, 8, 4, 0), "page_size = 0 rows is not supported"),
        ((2, 1, 16, 0, 4, 64), "num_pages"),
        ((2, 1, 16, 8, 0, 64), "max_pages"),
        ((2, 1, 16, 2**26, 4, 64), "num_pages"),
        # The 32-bit row limits count rows, so they depend on the page size.
        ((2, 1, 16, 2**25, 4, 128), "num_pages"),
        ((2, 1, 16, 8, 2**24, 128), "max_pages"),
    ],
)
def test_validate_shape_rejects(shape, needle):
    with pytest.raises(ValueError, match=needle):
        _etap.validate_shape(*shape)


def test_validate_shape_accepts_every_supported_shape():
    for s_q in range(1, 9):
        for h_q in range(1, 129):
            for page_size in (16, 32, 64, 128):
                _etap.validate_shape(3, s_q, h_q, 10, 7, page_size)
    # The same counts of pages that are too many rows at 128 fit at 16 rows a page.
    _etap.validate_shape(2, 1, 16, 2**25, 4, 16)
    _etap.validate_shape(2, 1, 16, 8, 2**24, 64)


def test_validate_shape_needs_the_page_size():
    with pytest.raises(TypeError):
        _etap.validate_shape(2, 1, 16, 8, 4)


@pytest.mark.parametrize(
    "addrs, name, align",
    [
        ((8, 0, 0, 0, 0, 0), "q", 16),
        ((0, 0x108, 0, 0, 0, 0), "k_cache", 16),
        ((0, 0, 2, 0, 0, 0), "block_table", 4),
        ((0, 0, 0, 6, 0, 0), "cache_seqlens", 4),
        ((0, 0, 0, 0, 4, 0), "out", 8),
        ((0, 0, 0, 0, 0, 2), "lse", 4),
    ],
)
def test_misaligned_addresses_name_the_argument(addrs, name, align):
    with pytest.raises(ValueError, match=rf"^{name} at 0x[0-9a-f]+ must be {align}-byte aligned"):
        _etap.check_addresses(*addrs)
    _etap.check_addresses(0x100, 0x200, 0x304, 0x404, 0x508, 0x604)


# --- get_mla_metadata -------------------------------------------------------------------------


def test_metadata_new_and_old_forms():
    meta, splits = etap.get_mla_metadata()
    assert isinstance(meta, etap.EtapMetadata) and splits is None and meta.batch is None
    seqlens = FakeTensor((5,), I32, ("cuda", 1))
    meta, splits = etap.get_mla_metadata(seqlens, 2 * 16, 1)
    assert (meta.batch, meta.cols, meta.device) == (5, 32, 1) and splits is None
    meta, _ = etap.get_mla_metadata(cache_seqlens=seqlens, num_q_tokens_per_head_k=128 * 4, num_heads_k=1)
    assert meta.cols == 512
    meta, _ = etap.get_mla_metadata(seqlens, num_heads_per_head_k=64, num_heads_k=1)  # the older name
    assert meta.cols == 64
    meta, _ = etap.get_mla_metadata(seqlens, 16, 1, num_heads_q=16, is_fp8_kvcache=False, topk=None)
    assert meta.cols == 16


def test_metadata_takes_every_supported_s_q_times_h_q():
    seqlens = FakeTensor((3,), I32)
    cols = {s_q * h_q for s_q in range(1, 9) for h_q in range(1, 129)}
    for c in sorted(cols):
        meta, _ = etap.get_mla_metadata(seqlens, c, 1)
        assert meta.cols == c
        # An FP8 cache too (past 16 columns in CTAs of 32, column groups past 32).
        meta, _ = etap.get_mla_metadata(seqlens, c, 1, is_fp8_kvcache=True)
        assert (meta.cols, meta.fp8) == (c, True)
    for c in range(-2, 1100):
        assert interface._supported_cols(c) == (c in cols), c
    # For example s_q = 3 with 6 heads, 8 tokens with 127 heads, 1 token with 1 head.
    assert {18, 8 * 127, 1, 1024} <= cols and not {0, 131, 1023, 1025} & cols

@pytest.mark.parametrize(
    "args, exc, needle",
    [
        ((FakeTensor((4,), I32), 16, 2), ValueError, "num_heads_k"),
        ((FakeTensor((4,), I32), 0, 1), ValueError, "num_q_tokens_per_head_k: 0"),
        ((FakeTensor((4,), I32), -16, 1), ValueError, "num_q_tokens_per_head_k: -16"),
        ((FakeTensor((4,), I32), 131, 1), ValueError, r"num_q_tokens_per_head_k: 131 .* s_q 1 to 8 and h_q 1 to 128"),
        ((FakeTensor((4,), I32), 1023, 1), ValueError, "num_q_tokens_per_head_k: 1023"),
        ((FakeTensor((4,), I32), 1025, 1), ValueError, "num_q_tokens_per_head_k: 1025"),
        ((FakeTensor((4,), I32), 16, 1, 0), ValueError, "num_heads_q: 0"),
        ((FakeTensor((4,), I32), 16, 1, 129), ValueError, "num_heads_q: 129"),
        ((FakeTensor((4,), I32), 16.0, 1), TypeError, "num_q_tokens_per_head_k"),
        ((FakeTensor((4,), I64), 16, 1), TypeError, "cache_seqlens"),
        ((FakeTensor((4,), I32, ("cpu", None)), 16, 1), ValueError, "cache_seqlens"),
        ((FakeTensor((4, 1), I32), 16, 1), ValueError, "cache_seqlens"),
        ((FakeTensor((0,), I32), 16, 1), ValueError, "cache_seqlens"),
        (([1, 2], 16, 1), TypeError, "cache_seqlens"),
        ((FakeTensor((4,), I32), 16, None), TypeError, "get_mla_metadata"),
        # An FP8 cache takes the 16-bit cache's column counts, and refuses the same others.
        ((FakeTensor((4,), I32), 131, 1, None, True), ValueError, r"num_q_tokens_per_head_k: 131 .* s_q 1 to 8"),
        ((FakeTensor((4,), I32), 1025, 1, None, True), ValueError, "num_q_tokens_per_head_k: 1025"),
        ((FakeTensor((4,), I32), 16, 1, None, 1), TypeError, "is_fp8_kvcache: expected a bool, got int"),
        ((FakeTensor((4,), I32), 16, 1, None, False, 2048), NotImplementedError, "topk"),
    ],
)
def test_metadata_rejects(args, exc, needle):
    with pytest.raises(exc, match=needle):
        etap.get_mla_metadata(*args)


# --- flash_mla_with_kvcache: every bad input ----------------------------------------------------


def call(q=None, k_cache=None, block_table=None, cache_seqlens=None, head_dim_v=512, meta="new", num_splits=None, **kw):
    dq, dk, db, ds = decode_inputs()
    q = dq if q is None else q
    k_cache = dk if k_cache is None else k_cache
    block_table = db if block_table is None else block_table
    cache_seqlens = ds if cache_seqlens is None else cache_seqlens
    if meta == "new":
        meta = etap.EtapMetadata()
    return etap.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v, meta, num_splits, **kw)


def bad_strides(shape, dtype=BF16):
    t = FakeTensor(shape, dtype)
    s = list(t.stride())
    s[0] *= 2
    return FakeTensor(shape, dtype, strides=s)


BAD = [
    # q
    (dict(q=[1.0]), TypeError, "q: expected a torch.Tensor"),
    (dict(q=FakeTensor((2, 1, 16, 576), F32)), TypeError, "q: dtype"),
    (dict(q=FakeTensor((2, 1, 16, 576), BF16, ("cpu", None))), ValueError, "q: must be on a CUDA device"),
    (dict(q=FakeTensor((2, 16, 576))), ValueError, "q: expected 4 dims"),
    (dict(q=FakeTensor((2, 1, 16, 512))), ValueError, "q: head dim must be 576"),
    (dict(q=FakeTensor((2, 1, 0, 576))), ValueError, r"q: h_q = 0 heads is not supported \(1 to 128\)"),
    (dict(q=FakeTensor((2, 1, 129, 576))), ValueError, r"q: h_q = 129 heads is not supported \(1 to 128\)"),
    (dict(q=FakeTensor((2, 1, 256, 576))), ValueError, "q: h_q = 256"),
    (dict(q=FakeTensor((2, 9, 16, 576))), ValueError, r"q: s_q = 9 query tokens per request is not supported \(1 to 8"),
    (dict(q=FakeTensor((2, 0, 16, 576))), ValueError, "q: s_q = 0"),
    (dict(q=FakeTensor((0, 1, 16, 576))), ValueError, "q: empty batch"),
    (dict(q=bad_strides((2, 1, 16, 576))), ValueError, "q: must be contiguous"),
    (dict(q=FakeTensor((2, 1, 16, 576), strides=(9216, 9216, 1, 16))), ValueError, "q: must be contiguous"),
    # k_cache
    (dict(k_cache=FakeTensor((8, 64, 1, 576), F16)), TypeError, "k_cache: dtype must be torch.bfloat16"),
    (dict(k_cache=FakeTensor((8, 64, 1, 576), BF16, ("cuda", 1))), ValueError, "k_cache: on cuda:1"),
    (dict(k_cache=FakeTensor((8, 64, 1, 576), BF16, ("cpu", None))), ValueError, "k_cache: must be on a CUDA"),
    (dict(k_cache=FakeTensor((8, 64, 576))), ValueError, "k_cache: expected 4 dims"),
    (dict(k_cache=FakeTensor((8, 8, 1, 576))), ValueError,
     r"k_cache: page_block_size = 8 rows is not supported \(one of 16, 32, 64, 128"),
    (dict(k_cache=FakeTensor((8, 256, 1, 576))), ValueError, "k_cache: page_block_size = 256 rows"),
    (dict(k_cache=FakeTensor((8, 48, 1, 576))), ValueError, "k_cache: page_block_size = 48 rows"),
    (dict(k_cache=FakeTensor((8, 1, 1, 576))), ValueError, "k_cache: page_block_size = 1 rows"),
    (dict(k_cache=FakeTensor((8, 0, 1, 576))), ValueError, "k_cache: page_block_size = 0 rows"),
    (dict(k_cache=FakeTensor((8, 64, 2, 576))), ValueError, "k_cache: num_heads_k must be 1"),
    (dict(k_cache=FakeTensor((8, 64, 1, 512))), ValueError, "k_cache: head dim must be 576"),
    (dict(k_cache=FakeTensor((0, 64, 1, 576))), ValueError, "k_cache: has no pages"),
    (dict(k_cache=bad_strides((8, 64, 1, 576))), ValueError, "k_cache: must be contiguous"),
    (dict(k_cache=FakeTensor((2**26, 64, 1, 576), ptr=0x10000)), ValueError, "num_pages"),
    (dict(k_cache=FakeTensor((2**25, 128, 1, 576), ptr=0x10000)), ValueError, "num_pages"),
    # block_table
    (dict(block_table=FakeTensor((2, 4), I64)), TypeError, "block_table: dtype must be torch.int32"),
    (dict(block_table=FakeTensor((3, 4), I32)), ValueError, "block_table: expected shape"),
    (dict(block_table=FakeTensor((8,), I32)), ValueError, "block_table: expected shape"),
    (dict(block_table=FakeTensor((2, 0), I32)), ValueError, "block_table: max_pages"),
    (dict(block_table=FakeTensor((2, 4), I32, ("cuda", 3))), ValueError, "block_table: on cuda:3"),
    (dict(block_table=FakeTensor((2, 4), I32, strides=(8, 1))), ValueError, "block_table: must be contiguous"),
    # cache_seqlens
    (dict(cache_seqlens=FakeTensor((2,), I64)), TypeError, "cache_seqlens: dtype must be torch.int32"),
    (dict(cache_seqlens=FakeTensor((3,), I32)), ValueError, "cache_seqlens: expected shape"),
    (dict(cache_seqlens=FakeTensor((2,), I32, ("cpu", None))), ValueError, "cache_seqlens: must be on a CUDA"),
    (dict(cache_seqlens=FakeTensor((2,), I32, strides=(2,))), ValueError, "cache_seqlens: must be contiguous"),
    # the rest
    (dict(head_dim_v=128), ValueError, "head_dim_v: must be 512"),
    (dict(head_dim_v=512.0), TypeError, "head_dim_v"),
    (dict(meta=FakeTensor((132, 8), I32)), TypeError, "tile_scheduler_metadata: expected the etap.EtapMetadata"),
    (dict(num_splits=FakeTensor((3,), I32)), TypeError, "num_splits: must be None"),
    (dict(softmax_scale=0.0), ValueError, "softmax_scale"),
    (dict(softmax_scale=-1.0), ValueError, "softmax_scale"),
    (dict(softmax_scale=math.inf), ValueError, "softmax_scale"),
    (dict(softmax_scale=math.nan), ValueError, "softmax_scale"),
    (dict(softmax_scale="0.1"), TypeError, "softmax_scale"),
    (dict(causal=1), TypeError, "causal"),
    (dict(empty_lse="inf"), ValueError, "empty_lse"),
    # is_fp8_kvcache=True with a 16-bit cache (FP8 caches: test_fp8_host.py).
    (dict(is_fp8_kvcache=True), TypeError,
     "k_cache: dtype must be torch.float8_e4m3fn or torch.uint8 \\(an FP8 cache\\), got torch.bfloat16"),
    (dict(is_fp8_kvcache=None), TypeError, "is_fp8_kvcache: expected a bool, got NoneType"),
    (dict(indices=FakeTensor((2, 1, 64), I32)), NotImplementedError, "indices"),
    (dict(attn_sink=FakeTensor((16,), F32)), NotImplementedError, "attn_sink"),
    (dict(q=FakeTensor((2, 2, 16, 576)), causal=False), NotImplementedError, "causal=False with s_q > 1"),
]


@pytest.mark.parametrize("kw, exc, needle", BAD, ids=[f"{i}-{b[2][:30]}" for i, b in enumerate(BAD)])
def test_bad_input_raises_naming_the_argument(kw, exc, needle, monkeypatch):
    reached = []
    monkeypatch.setattr(interface, "decoder", lambda device: reached.append(device))
    with pytest.raises(exc, match=needle):
        call(**kw)
    assert not reached, "the checks must fail before any device work"


def test_metadata_for_another_batch_or_shape(monkeypatch):
    monkeypatch.setattr(interface, "decoder", lambda device: pytest.fail("reached the device"))
    meta, _ = etap.get_mla_metadata(FakeTensor((3,), I32), 16, 1)
    with pytest.raises(ValueError, match="tile_scheduler_metadata: made for a batch of 3, but q has a batch of 2"):
        call(meta=meta)
    meta, _ = etap.get_mla_metadata(FakeTensor((2,), I32), 32, 1)
    with pytest.raises(ValueError, match=r"num_q_tokens_per_head_k = 32, but q has s_q \* h_q = 1 \* 16"):
        call(meta=meta)
    meta, _ = etap.get_mla_metadata(FakeTensor((2,), I32, ("cuda", 1)), 16, 1)
    with pytest.raises(ValueError, match="made for cuda:1, but q is on cuda:0"):
        call(meta=meta)


class ReachedDevice(Exception):
    pass


def _valid_call_to_device(q, k, bt, sl, out, lse, **kw):
    """Call with fake tensors; the device stage (the decoder, torch's stream) is replaced by
    one that raises ReachedDevice, so nothing touches a GPU even where there is one."""

    def reached(device):
        raise ReachedDevice(device)

    saved = interface._stream_handle, interface.decoder
    interface._stream_handle = lambda device: 0
    interface.decoder = reached
    try:
        return etap.flash_mla_with_kvcache(q, k, bt, sl, 512, etap.get_mla_metadata()[0], None, out=out, lse=lse, **kw)
    finally:
        interface._stream_handle, interface.decoder = saved


def test_causal_false_is_accepted_for_one_token():
    # s_q = 1: causal=False is the same as causal=True.
    q, k, bt, sl = decode_inputs(s_q=1)
    with pytest.raises(ReachedDevice):
        _valid_call_to_device(q, k, bt, sl, FakeTensor((2, 1, 16, 512), BF16), FakeTensor((2, 16, 1), F32), causal=False)


def test_valid_call_passes_every_check_and_reaches_the_device():
    """A valid call is not rejected by the checks: it reaches the device stage."""
    for s_q in (1, 2, 3, 4, 5, 8):
        for h_q in (1, 3, 6, 8, 12, 20, 22, 24, 48, 96, 127, 128):
            for page_size in (16, 32, 64, 128):
                for dt in (BF16, F16):
                    q, k, bt, sl = decode_inputs(b=3, s_q=s_q, h_q=h_q, dtype=dt, page_size=page_size)
                    out = FakeTensor((3, s_q, h_q, 512), dt)
                    lse = FakeTensor((3, h_q, s_q), F32)
                    with pytest.raises(ReachedDevice):
                        _valid_call_to_device(q, k, bt, sl, out, lse, causal=True)


def test_large_caches_of_small_pages_pass():
    """The row limit is in rows: 2**25 pages of 16 rows pass where 2**25 of 128 do not."""
    q, _, bt, sl = decode_inputs()
    k = FakeTensor((2**25, 16, 1, 576), ptr=0x10000)
    with pytest.raises(ReachedDevice):
        _valid_call_to_device(q, k, bt, sl, FakeTensor((2, 1, 16, 512), BF16), FakeTensor((2, 16, 1), F32))


@pytest.mark.parametrize(
    "which, tensor, exc, needle",
    [
        ("out", FakeTensor((2, 1, 16, 512), F16), TypeError, "out: dtype must be torch.bfloat16"),
        ("out", FakeTensor((2, 16, 1, 512), BF16), ValueError, "out: expected shape"),
        ("out", FakeTensor((2, 1, 16, 512), BF16, ("cuda", 1)), ValueError, "out: on cuda:1"),
        ("out", bad_strides((2, 1, 16, 512)), ValueError, "out: must be contiguous"),
        ("out", FakeTensor((2, 1, 16, 512), BF16, ptr=0x7F0000000004), ValueError, "out at 0x7f0000000004 must be 8-byte"),
        ("lse", FakeTensor((2, 16, 1), BF16), TypeError, "lse: dtype must be torch.float32"),
        ("lse", FakeTensor((2, 1, 16), F32), ValueError, "lse: expected shape"),
    ],
)
def test_bad_outputs(which, tensor, exc, needle):
    q, k, bt, sl = decode_inputs()
    outs = {"out": FakeTensor((2, 1, 16, 512), BF16), "lse": FakeTensor((2, 16, 1), F32)}
    outs[which] = tensor
    with pytest.raises(exc, match=needle):
        _valid_call_to_device(q, k, bt, sl, outs["out"], outs["lse"])
    assert not issubclass(exc, ReachedDevice)


def test_out_overlapping_an_input_is_rejected():
    q, k, bt, sl = decode_inputs()
    out = FakeTensor((2, 1, 16, 512), BF16, ptr=q.data_ptr())  # q's memory
    lse = FakeTensor((2, 16, 1), F32)
    with pytest.raises(ValueError, match="out: overlaps q"):
        _valid_call_to_device(q, k, bt, sl, out, lse)
    out = FakeTensor((2, 1, 16, 512), BF16)
    lse = FakeTensor((2, 16, 1), F32, ptr=out.data_ptr() + 64)
    with pytest.raises(ValueError, match="lse: overlaps out"):
        _valid_call_to_device(q, k, bt, sl, out, lse)


def test_decoder_without_a_gpu_is_a_clear_error():
    """On a machine with a GPU this makes a decoder; without one it is a RuntimeError naming
    the cause, not a crash."""
    try:
        d = _etap.Decoder(0)
    except RuntimeError as e:
        msg = str(e).lower()
        assert "cuda" in msg or "device" in msg, msg
    else:
        assert d.device == 0 and d.num_sms > 0
    with pytest.raises((RuntimeError, OverflowError)):
        _etap.Decoder(1 << 20)


# --- the metadata's plan bookkeeping, with a fake decoder ---------------------------------------


class FakeDecoder:
    def __init__(self):
        self.calls = []
        self.capture = None

    def plan(self, *args, **kw):
        # batch, s_q, h_q, num_pages, max_pages, page_size, and total_q where given.
        self.calls.append(("plan",) + args[:6] + tuple(kw.items()))
        return object()

    def replan(self, plan, seqlens, stream):
        self.calls.append(("replan", seqlens))

    def decode(self, plan, dtype, *args, **kw):
        self.calls.append(("decode", dtype) + tuple(kw.items()))


def test_one_plan_per_shape_replanned_once_per_metadata(monkeypatch):
    dec = FakeDecoder()
    monkeypatch.setattr(interface, "decoder", lambda device: dec)
    monkeypatch.setattr(interface, "_stream_handle", lambda device: 0)
    monkeypatch.setattr(interface._etap, "stream_capture_id", lambda d, s: dec.capture)
    monkeypatch.setattr(interface, "_plans", interface._PlanCache())

    def step(meta, q, k, bt, sl, layers=3):
        for _ in range(layers):
            out = FakeTensor((2, 1, 16, 512), BF16)
            lse = FakeTensor((2, 16, 1), F32)
            etap.flash_mla_with_kvcache(q, k, bt, sl, 512, meta, None, out=out, lse=lse, empty_lse="-inf")

    q, k, bt, sl = decode_inputs()
    m1 = etap.get_mla_metadata(sl, 16, 1)[0]
    step(m1, q, k, bt, sl)
    assert [c[0] for c in dec.calls] == ["plan", "decode", "decode", "decode"]
    assert dec.calls[0][1:] == (2, 1, 16, 8, 4, 64)
    dec.calls.clear()
    m2 = etap.get_mla_metadata()[0]  # the next step: re-planned once, into the same plan
    step(m2, q, k, bt, sl)
    assert [c[0] for c in dec.calls] == ["replan", "decode", "decode", "decode"]
    dec.calls.clear()
    step(m1, q, k, bt, sl, layers=1)  # an older step's metadata again: re-planned for it
    assert [c[0] for c in dec.calls] == ["replan", "decode"]
    dec.calls.clear()
    # A graph capture: the first call of a metadata inside it re-plans (captured), even for a
    # metadata already planned eagerly; the plan is pinned.
    dec.capture = 77
    step(m1, q, k, bt, sl)
    assert [c[0] for c in dec.calls] == ["replan", "decode", "decode", "decode"]
    assert interface._plans.get((0, 2, 1, 16, 8, 4, 64)).pinned
    dec.capture = None
    dec.calls.clear()
    # Another shape (a wider block table): a new plan; the metadata of the first is refused.
    q2, k2, bt2, sl2 = decode_inputs(max_pages=6)
    step(etap.get_mla_metadata()[0], q2, k2, bt2, sl2, layers=1)
    assert [c[0] for c in dec.calls] == ["plan", "decode"]
    with pytest.raises(ValueError, match="planned for another shape"):
        step(m1, q2, k2, bt2, sl2, layers=1)


def test_a_plan_is_never_reused_for_another_page_size(monkeypatch):
    """Caches alike but for their page size: a plan each, keyed by the page size, made with it;
    a metadata planned for one page size is refused with a cache of another."""
    dec = FakeDecoder()
    monkeypatch.setattr(interface, "decoder", lambda device: dec)
    monkeypatch.setattr(interface, "_stream_handle", lambda device: 0)
    monkeypatch.setattr(interface._etap, "stream_capture_id", lambda d, s: None)
    monkeypatch.setattr(interface, "_plans", interface._PlanCache())

    def call(meta, page_size, s_q=3, h_q=6):
        q, k, bt, sl = decode_inputs(s_q=s_q, h_q=h_q, page_size=page_size)
        out = FakeTensor((2, s_q, h_q, 512), BF16)
        lse = FakeTensor((2, h_q, s_q), F32)
        etap.flash_mla_with_kvcache(q, k, bt, sl, 512, meta, None, causal=True, out=out, lse=lse, empty_lse="-inf")

    metas = {}
    for page_size in (16, 32, 64, 128):
        metas[page_size] = etap.get_mla_metadata(FakeTensor((2,), I32), 18, 1)[0]
        call(metas[page_size], page_size)
        call(metas[page_size], page_size)  # a second layer: the same plan, not re-planned
    assert [c for c in dec.calls if c[0] == "plan"] == [("plan", 2, 3, 6, 8, 4, p) for p in (16, 32, 64, 128)]
    assert [c[0] for c in dec.calls] == ["plan", "decode", "decode"] * 4
    assert sorted(interface._plans.plans) == [(0, 2, 3, 6, 8, 4, p) for p in (16, 32, 64, 128)]
    for planned, other in ((64, 32), (16, 128), (128, 64)):
        with pytest.raises(ValueError, match=rf"planned for another shape .*page_size = \(2, 3, 6, 8, 4, {planned}\)"):
            call(metas[planned], other)
    # A new step at page size 32 re-plans the page-32 plan, not another.
    dec.calls.clear()
    call(etap.get_mla_metadata()[0], 32)
    assert [c[0] for c in dec.calls] == ["replan", "decode"]


def test_native_plan_refuses_a_cache_of_another_page_size(monkeypatch):
    dec = FakeDecoder()
    monkeypatch.setattr(interface, "decoder", lambda device: dec)
    monkeypatch.setattr(interface, "_stream_handle", lambda device: 0)
    q, k, bt, sl = decode_inputs(s_q=8, h_q=127, page_size=32)
    p = etap.plan(q, k, bt, sl)
    assert p.shape == (2, 8, 127, 8, 4, 32) and dec.calls == [("plan", 2, 8, 127, 8, 4, 32)]
    out, lse = FakeTensor((2, 8, 127, 512), BF16), FakeTensor((2, 127, 8), F32)
    etap.decode(p, q, k, bt, sl, out=out, lse=lse)
    assert dec.calls[-1] == ("decode", "bf16")
    dec.calls.clear()
    for other in (16, 64, 128):
        k2 = FakeTensor((8, other, 1, 576))
        with pytest.raises(ValueError, match=rf"plan: made for .*page_size\) = \(2, 8, 127, 8, 4, 32\), this call has "
                                             rf"\(2, 8, 127, 8, 4, {other}\)"):
            etap.decode(p, q, k2, bt, sl, out=out, lse=lse)
    assert dec.calls == [], "a refused call must not reach the device"


def test_metadata_tokens_are_never_reused():
    seen = set()
    for _ in range(1000):
        m = etap.EtapMetadata()  # freed at once: id() would repeat, the token does not
        assert m.token not in seen
        seen.add(m.token)


def test_plan_cache_evicts_least_recent_unpinned_never_the_new_one(monkeypatch):
    import sys
    import types

    synced = []
    fake_torch = types.SimpleNamespace(cuda=types.SimpleNamespace(synchronize=lambda d: synced.append(d)))
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    cache = interface._PlanCache(limit=2)
    slots = {}
    for name in "abc":
        slots[name] = interface._Slot(object(), 0)
    slots["a"].pinned = True
    cache.put("a", slots["a"])
    cache.put("b", slots["b"])
    cache.get("a")
    cache.put("c", slots["c"])  # over the limit: b goes (a is pinned), after a sync
    assert list(cache.plans) == ["a", "c"] and synced == [0]
    slots["c"].pinned = True
    d = interface._Slot(object(), 0)
    cache.put("d", d)  # every other is pinned: d stays although over the limit
    assert "d" in cache.plans and cache.get("d") is d


# --- the packed query layout: etap.plan / etap.decode with cu_seqlens_q and max_seqlen_q -------
# b = 3 requests of at most 2 tokens, 5 tokens in all: q [5, 6, 576], cu_seqlens_q int32[4].


def packed_args(b=3, max_seqlen_q=2, total_q=5, h_q=6, num_pages=8, max_pages=4, dtype=BF16, page_size=64):
    _, k, bt, sl = decode_inputs(b=b, h_q=h_q, num_pages=num_pages, max_pages=max_pages, dtype=dtype,
                                 page_size=page_size)
    return dict(q=FakeTensor((total_q, h_q, 576), dtype), k_cache=k, block_table=bt, cache_seqlens=sl,
                cu_seqlens_q=FakeTensor((b + 1,), I32), max_seqlen_q=max_seqlen_q)


def packed_outputs(total_q=5, h_q=6, dtype=BF16):
    return FakeTensor((total_q, h_q, 512), dtype), FakeTensor((total_q, h_q), F32)


@pytest.fixture
def fake_decoder(monkeypatch):
    dec = FakeDecoder()
    monkeypatch.setattr(interface, "decoder", lambda device: dec)
    monkeypatch.setattr(interface, "_stream_handle", lambda device: 0)
    return dec


def test_validate_shape_packed():
    for total_q in range(1, 7):
        _etap.validate_shape(3, 2, 6, 8, 4, 64, total_q=total_q)
        _etap.validate_shape(3, 2, 6, 8, 4, 64, total_q)
    _etap.validate_shape(3, 2, 6, 8, 4, 64, None)  # the uniform layout
    with pytest.raises(ValueError, match="^total_q must be positive"):
        _etap.validate_shape(3, 2, 6, 8, 4, 64, total_q=0)
    with pytest.raises(ValueError, match=r"^total_q: 7 tokens for 3 requests of at most s_q = 2 each"):
        _etap.validate_shape(3, 2, 6, 8, 4, 64, total_q=7)
    # The shape's other checks still apply.
    with pytest.raises(ValueError, match="s_q = 9 is not supported"):
        _etap.validate_shape(3, 9, 6, 8, 4, 64, total_q=5)
    with pytest.raises(ValueError, match="page_size = 48"):
        _etap.validate_shape(3, 2, 6, 8, 4, 48, total_q=5)


def test_misaligned_cu_seqlens_q_is_named():
    good = (0x100, 0x200, 0x304, 0x404, 0x508, 0x604)
    _etap.check_addresses(*good)
    _etap.check_addresses(*good, cu_seqlens_q=0x704)
    for addr in (0x701, 0x702, 0x703):
        with pytest.raises(ValueError, match=rf"^cu_seqlens_q at {addr:#x} must be 4-byte aligned"):
            _etap.check_addresses(*good, cu_seqlens_q=addr)
    # The other addresses are checked first, as before.
    with pytest.raises(ValueError, match="^q at"):
        _etap.check_addresses(8, *good[1:], cu_seqlens_q=0x702)


BAD_PACKED = [
    # q: [total_q, h_q, 576]
    (dict(q=[1.0]), TypeError, "q: expected a torch.Tensor"),
    (dict(q=FakeTensor((5, 6, 576), F32)), TypeError, "q: dtype must be torch.bfloat16 or torch.float16"),
    (dict(q=FakeTensor((5, 6, 576), BF16, ("cpu", None))), ValueError, "q: must be on a CUDA device"),
    (dict(q=FakeTensor((3, 2, 6, 576))), ValueError, r"q: expected 3 dims \[total_q, h_q, 576\] with cu_seqlens_q"),
    (dict(q=FakeTensor((5, 6 * 576))), ValueError, "q: expected 3 dims"),
    (dict(q=FakeTensor((5, 6, 512))), ValueError, "q: head dim must be 576"),
    (dict(q=FakeTensor((0, 6, 576))), ValueError, r"q: no query tokens \(total_q = 0\)"),
    (dict(q=FakeTensor((5, 0, 576))), ValueError, r"q: h_q = 0 heads is not supported \(1 to 128\)"),
    (dict(q=FakeTensor((5, 129, 576))), ValueError, "q: h_q = 129 heads is not supported"),
    (dict(q=FakeTensor((7, 6, 576))), ValueError,
     r"q: total_q = 7 query tokens do not fit 3 requests \(cu_seqlens_q has 4 entries\) of at most max_seqlen_q = 2"),
    (dict(q=bad_strides((5, 6, 576))), ValueError, "q: must be contiguous"),
    (dict(q=FakeTensor((5, 6, 576), strides=(576, 5 * 576, 1))), ValueError, "q: must be contiguous"),
    # cu_seqlens_q: int32 [b + 1] on q's device, contiguous
    (dict(cu_seqlens_q=[0, 2, 2, 5]), TypeError, "cu_seqlens_q: expected a torch.Tensor"),
    (dict(cu_seqlens_q=FakeTensor((4,), I64)), TypeError, "cu_seqlens_q: dtype must be torch.int32, got torch.int64"),
    (dict(cu_seqlens_q=FakeTensor((4,), F32)), TypeError, "cu_seqlens_q: dtype must be torch.int32"),
    (dict(cu_seqlens_q=FakeTensor((4,), I32, ("cpu", None))), ValueError, "cu_seqlens_q: must be on a CUDA device"),
    (dict(cu_seqlens_q=FakeTensor((4,), I32, ("cuda", 1))), ValueError, "cu_seqlens_q: on cuda:1, but q is on cuda:0"),
    (dict(cu_seqlens_q=FakeTensor((4, 1), I32)), ValueError, r"cu_seqlens_q: expected shape \[batch \+ 1\]"),
    (dict(cu_seqlens_q=FakeTensor((1,), I32)), ValueError, r"cu_seqlens_q: expected shape \[batch \+ 1\] with batch >= 1"),
    (dict(cu_seqlens_q=FakeTensor((0,), I32)), ValueError, r"cu_seqlens_q: expected shape \[batch \+ 1\]"),
    (dict(cu_seqlens_q=FakeTensor((4,), I32, strides=(2,))), ValueError, "cu_seqlens_q: must be contiguous"),
    # cu_seqlens_q's length is the batch: the tables must have it.
    (dict(cu_seqlens_q=FakeTensor((5,), I32)), ValueError, r"block_table: expected shape \[batch = 4, max_pages\]"),
    (dict(cu_seqlens_q=FakeTensor((3,), I32)), ValueError, r"q: total_q = 5 query tokens do not fit 2 requests"),
    (dict(cache_seqlens=FakeTensor((4,), I32)), ValueError, r"cache_seqlens: expected shape \[batch = 3\]"),
    (dict(block_table=FakeTensor((2, 4), I32)), ValueError, r"block_table: expected shape \[batch = 3"),
    # max_seqlen_q
    (dict(max_seqlen_q=None), TypeError, "max_seqlen_q: needed with cu_seqlens_q"),
    (dict(max_seqlen_q=0), ValueError, r"max_seqlen_q: 0 query tokens per request is not supported \(1 to 8\)"),
    (dict(max_seqlen_q=9), ValueError, r"max_seqlen_q: 9 query tokens per request is not supported \(1 to 8\)"),
    (dict(max_seqlen_q=-1), ValueError, "max_seqlen_q: -1"),
    (dict(max_seqlen_q=2.0), TypeError, "max_seqlen_q: expected an int, got float"),
    (dict(max_seqlen_q=True), TypeError, "max_seqlen_q: expected an int, got bool"),
    # the cache and the rest
    (dict(k_cache=FakeTensor((8, 64, 1, 576), F16)), TypeError, "k_cache: dtype must be torch.bfloat16"),
    (dict(k_cache=FakeTensor((8, 48, 1, 576))), ValueError, "k_cache: page_block_size = 48 rows is not supported"),
    (dict(k_cache=FakeTensor((8, 64, 1, 576), BF16, ("cuda", 2))), ValueError, "k_cache: on cuda:2"),
    (dict(k_cache=FakeTensor((2**26, 64, 1, 576), ptr=0x10000)), ValueError, "num_pages"),
    (dict(block_table=FakeTensor((3, 4), I64)), TypeError, "block_table: dtype must be torch.int32"),
    (dict(cache_seqlens=FakeTensor((3,), I32, ("cpu", None))), ValueError, "cache_seqlens: must be on a CUDA"),
    (dict(causal=False), NotImplementedError, "causal=False with max_seqlen_q > 1"),
    (dict(causal=1), TypeError, "causal"),
]


@pytest.mark.parametrize("kw, exc, needle", BAD_PACKED, ids=[f"{i}-{b[2][:30]}" for i, b in enumerate(BAD_PACKED)])
def test_packed_plan_bad_input_raises_naming_the_argument(kw, exc, needle, fake_decoder):
    args = packed_args()
    args.update(kw)
    causal = args.pop("causal", True)
    with pytest.raises(exc, match=needle):
        etap.plan(args.pop("q"), args.pop("k_cache"), args.pop("block_table"), args.pop("cache_seqlens"), causal,
                  **args)
    assert fake_decoder.calls == [], "the checks must fail before any device work"


BAD_PACKED_DECODE = BAD_PACKED + [
    (dict(out=FakeTensor((3, 2, 6, 512))), ValueError, r"out: expected shape \[5, 6, 512\], got \[3, 2, 6, 512\]"),
    (dict(out=FakeTensor((5, 6, 512), F16)), TypeError, "out: dtype must be torch.bfloat16"),
    (dict(out=FakeTensor((5, 6, 512), BF16, ("cuda", 1))), ValueError, "out: on cuda:1"),
    (dict(out=bad_strides((5, 6, 512))), ValueError, "out: must be contiguous"),
    (dict(lse=FakeTensor((6, 5), F32)), ValueError, r"lse: expected shape \[5, 6\], got \[6, 5\]"),
    (dict(lse=FakeTensor((3, 6, 2), F32)), ValueError, r"lse: expected shape \[5, 6\]"),
    (dict(lse=FakeTensor((5, 6), BF16)), TypeError, "lse: dtype must be torch.float32"),
    (dict(out=FakeTensor((5, 6, 512), BF16, ptr=0x7F0000000004)), ValueError, "out at 0x7f0000000004 must be 8-byte"),
    (dict(cu_seqlens_q=FakeTensor((4,), I32, ptr=0x7F0000000002)), ValueError,
     "cu_seqlens_q at 0x7f0000000002 must be 4-byte aligned"),
    (dict(softmax_scale=0.0), ValueError, "softmax_scale"),
    (dict(softmax_scale="1"), TypeError, "softmax_scale"),
    (dict(empty_lse="nan"), ValueError, "empty_lse"),
]


@pytest.mark.parametrize("kw, exc, needle", BAD_PACKED_DECODE,
                         ids=[f"{i}-{b[2][:30]}" for i, b in enumerate(BAD_PACKED_DECODE)])
def test_packed_decode_bad_input_raises_naming_the_argument(kw, exc, needle, fake_decoder):
    good = packed_args()
    p = etap.plan(good["q"], good["k_cache"], good["block_table"], good["cache_seqlens"],
                  cu_seqlens_q=good["cu_seqlens_q"], max_seqlen_q=2)
    assert fake_decoder.calls == [("plan", 3, 2, 6, 8, 4, 64, ("total_q", 5))]
    fake_decoder.calls.clear()
    out, lse = packed_outputs()
    args = dict(good, out=out, lse=lse)
    args.update(kw)
    with pytest.raises(exc, match=needle):
        etap.decode(p, args.pop("q"), args.pop("k_cache"), args.pop("block_table"), args.pop("cache_seqlens"), **args)
    assert fake_decoder.calls == [], "the checks must fail before any device work"


def test_packed_outputs_must_not_overlap_the_offsets(fake_decoder):
    a = packed_args()
    p = etap.plan(a["q"], a["k_cache"], a["block_table"], a["cache_seqlens"], cu_seqlens_q=a["cu_seqlens_q"],
                  max_seqlen_q=2)
    out, lse = packed_outputs()
    for name, kw in (("out", dict(out=FakeTensor((5, 6, 512), ptr=a["cu_seqlens_q"].data_ptr()), lse=lse)),
                     ("lse", dict(out=out, lse=FakeTensor((5, 6), F32, ptr=a["cu_seqlens_q"].data_ptr())))):
        with pytest.raises(ValueError, match=f"{name}: overlaps cu_seqlens_q"):
            etap.decode(p, a["q"], a["k_cache"], a["block_table"], a["cache_seqlens"], cu_seqlens_q=a["cu_seqlens_q"],
                        max_seqlen_q=2, **kw)
    assert [c[0] for c in fake_decoder.calls] == ["plan"]


def test_max_seqlen_q_without_cu_seqlens_q(fake_decoder):
    q, k, bt, sl = decode_inputs()
    with pytest.raises(TypeError, match="max_seqlen_q: given without cu_seqlens_q"):
        etap.plan(q, k, bt, sl, max_seqlen_q=1)
    p = etap.plan(q, k, bt, sl)
    with pytest.raises(TypeError, match="max_seqlen_q: given without cu_seqlens_q"):
        etap.decode(p, q, k, bt, sl, max_seqlen_q=1)
    assert [c[0] for c in fake_decoder.calls] == ["plan"]


def test_packed_plan_and_decode_reach_the_device(fake_decoder, monkeypatch):
    """Valid packed calls pass every check: the plan is made with total_q, the decode gets the
    offsets' address, and new outputs have the packed shapes (made by torch: a fake one here)."""
    import sys
    import types

    made = []

    def empty(shape, dtype=None, device=None):
        made.append((tuple(shape), str(dtype)))
        return FakeTensor(shape, {"torch.float32": F32}.get(str(dtype), dtype))

    fake_torch = types.SimpleNamespace(empty=empty, float32="torch.float32")
    for b, max_seqlen_q, h_q, page_size, dt in ((3, 2, 6, 64, BF16), (1, 1, 1, 16, F16), (5, 8, 128, 128, BF16),
                                                (4, 3, 20, 32, F16), (2, 5, 127, 16, BF16)):
        for total_q in sorted({1, b * max_seqlen_q // 2 or 1, b * max_seqlen_q}):
            fake_decoder.calls.clear()
            a = packed_args(b=b, max_seqlen_q=max_seqlen_q, total_q=total_q, h_q=h_q, dtype=dt, page_size=page_size)
            p = etap.plan(a["q"], a["k_cache"], a["block_table"], a["cache_seqlens"],
                          cu_seqlens_q=a["cu_seqlens_q"], max_seqlen_q=max_seqlen_q)
            assert p.shape == (b, max_seqlen_q, h_q, 8, 4, page_size) and p.total_q == total_q
            assert fake_decoder.calls == [("plan", b, max_seqlen_q, h_q, 8, 4, page_size, ("total_q", total_q))]
            out, lse = packed_outputs(total_q, h_q, dt)
            o, l = etap.decode(p, a["q"], a["k_cache"], a["block_table"], a["cache_seqlens"],
                               cu_seqlens_q=a["cu_seqlens_q"], max_seqlen_q=max_seqlen_q, out=out, lse=lse)
            assert (o, l) == (out, lse)
            name = "bf16" if dt is BF16 else "f16"
            assert fake_decoder.calls[-1] == ("decode", name, ("cu_seqlens_q", a["cu_seqlens_q"].data_ptr()))
            # Outputs made by the call: the packed shapes.
            made.clear()
            with monkeypatch.context() as m:
                m.setitem(sys.modules, "torch", fake_torch)
                # empty_lse="-inf" leaves lse alone (a fake tensor has no nan_to_num_).
                etap.decode(p, a["q"], a["k_cache"], a["block_table"], a["cache_seqlens"],
                            cu_seqlens_q=a["cu_seqlens_q"], max_seqlen_q=max_seqlen_q)
            assert made == [((total_q, h_q, 512), str(dt)), ((total_q, h_q), "torch.float32")]
    # causal=False is the same as causal=True at one token a request.
    a = packed_args(max_seqlen_q=1, total_q=2)
    etap.plan(a["q"], a["k_cache"], a["block_table"], a["cache_seqlens"], False, cu_seqlens_q=a["cu_seqlens_q"],
              max_seqlen_q=1)


def test_a_plan_serves_one_layout_and_one_total_q(fake_decoder):
    """A packed plan is never used for the uniform layout, another total_q or another
    max_seqlen_q, and a uniform plan never for the packed layout (even where the sizes agree:
    b * s_q tokens in both)."""
    a = packed_args(total_q=6)  # b 3 x 2 tokens: the uniform batch's size
    packed = etap.plan(a["q"], a["k_cache"], a["block_table"], a["cache_seqlens"], cu_seqlens_q=a["cu_seqlens_q"],
                       max_seqlen_q=2)
    q4, k, bt, sl = decode_inputs(b=3, s_q=2, h_q=6)
    uniform = etap.plan(q4, k, bt, sl)
    assert uniform.total_q is None and packed.total_q == 6 and uniform.shape == packed.shape
    fake_decoder.calls.clear()
    out4, lse4 = FakeTensor((3, 2, 6, 512)), FakeTensor((3, 6, 2), F32)
    out, lse = packed_outputs(total_q=6)
    with pytest.raises(ValueError, match=r"cu_seqlens_q: needed: the plan was made for the packed layout, \(batch, "
                                         r"max_seqlen_q, h_q, num_pages, max_pages, page_size, total_q\) = "
                                         r"\(3, 2, 6, 8, 4, 64, 6\)"):
        etap.decode(packed, q4, k, bt, sl, out=out4, lse=lse4)
    with pytest.raises(ValueError, match=r"cu_seqlens_q: given, but the plan was made for the uniform layout, "
                                         r"\(batch, s_q, h_q, num_pages, max_pages, page_size\) = \(3, 2, 6, 8, 4, 64\)"):
        etap.decode(uniform, a["q"], k, bt, sl, cu_seqlens_q=a["cu_seqlens_q"], max_seqlen_q=2, out=out, lse=lse)
    # Another total_q, another max_seqlen_q, another batch.
    for q, cu, m, got in (
        (FakeTensor((5, 6, 576)), a["cu_seqlens_q"], 2, "(3, 2, 6, 8, 4, 64, 5)"),
        (a["q"], a["cu_seqlens_q"], 3, "(3, 3, 6, 8, 4, 64, 6)"),
    ):
        o, l = packed_outputs(total_q=q.shape[0])
        with pytest.raises(ValueError, match=r"plan: made for \(batch, max_seqlen_q, h_q, num_pages, max_pages, "
                                             r"page_size, total_q\) = \(3, 2, 6, 8, 4, 64, 6\), this call has "
                                             + got.replace("(", r"\(").replace(")", r"\)")):
            etap.decode(packed, q, k, bt, sl, cu_seqlens_q=cu, max_seqlen_q=m, out=o, lse=l)
    b4 = packed_args(b=4, total_q=6)
    with pytest.raises(ValueError, match=r"plan: made for .* = \(3, 2, 6, 8, 4, 64, 6\), this call has "
                                         r"\(4, 2, 6, 8, 4, 64, 6\)"):
        etap.decode(packed, b4["q"], b4["k_cache"], b4["block_table"], b4["cache_seqlens"],
                    cu_seqlens_q=b4["cu_seqlens_q"], max_seqlen_q=2, out=out, lse=lse)
    assert fake_decoder.calls == [], "a refused call must not reach the device"
    # The control: each plan with its own layout.
    etap.decode(packed, a["q"], k, bt, sl, cu_seqlens_q=a["cu_seqlens_q"], max_seqlen_q=2, out=out, lse=lse)
    etap.decode(uniform, q4, k, bt, sl, out=out4, lse=lse4)
    assert [c[:2] for c in fake_decoder.calls] == [("decode", "bf16")] * 2
    assert fake_decoder.calls[0][2:] == (("cu_seqlens_q", a["cu_seqlens_q"].data_ptr()),)
    assert fake_decoder.calls[1][2:] == ()


def test_flash_mla_interface_stays_uniform(fake_decoder):
    """FlashMLA's call has no packed form: a packed q is refused as a q of the wrong rank."""
    a = packed_args()
    with pytest.raises(ValueError, match=r"q: expected 4 dims \[batch, s_q, h_q, 576\]"):
        etap.flash_mla_with_kvcache(a["q"], a["k_cache"], a["block_table"], a["cache_seqlens"], 512,
                                    etap.get_mla_metadata()[0], None)
    with pytest.raises(TypeError, match="cu_seqlens_q"):
        etap.flash_mla_with_kvcache(a["q"], a["k_cache"], a["block_table"], a["cache_seqlens"], 512,
                                    etap.get_mla_metadata()[0], None, cu_seqlens_q=a["cu_seqlens_q"])
    assert fake_decoder.calls == []

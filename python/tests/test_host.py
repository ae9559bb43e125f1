"""Host-side tests: the package imports, and every argument check raises the right exception,
naming the argument, before anything reaches the GPU. No torch, no GPU: tensors are fakes with
the attributes the checks read (tests/fake.py)."""

import math

import pytest

import etap
from etap import _etap, interface
from fake import BF16, F16, F32, I32, I64, FakeTensor, decode_inputs


def test_import_and_constants():
    assert etap.D_QK == 576 and etap.D_V == 512 and etap.PAGE_ROWS == 64 and etap.MAX_S_Q == 4
    assert etap.SUPPORTED_HEADS == (8, 16, 32, 64, 128)
    assert isinstance(etap.__version__, str) and etap.__version__
    for name in ("get_mla_metadata", "flash_mla_with_kvcache", "merge_states", "plan", "decode"):
        assert callable(getattr(etap, name))


@pytest.mark.parametrize(
    "shape, needle",
    [
        ((0, 1, 16, 8, 4), "empty batch"),
        ((2, 0, 16, 8, 4), "s_q = 0"),
        ((2, 5, 16, 8, 4), "s_q = 5"),
        ((2, 1, 12, 8, 4), "h_q = 12"),
        ((2, 1, 256, 8, 4), "h_q = 256"),
        ((2, 1, 16, 0, 4), "num_pages"),
        ((2, 1, 16, 8, 0), "max_pages"),
        ((2, 1, 16, 2**26, 4), "num_pages"),
    ],
)
def test_validate_shape_rejects(shape, needle):
    with pytest.raises(ValueError, match=needle):
        _etap.validate_shape(*shape)


def test_validate_shape_accepts_every_supported_shape():
    for s_q in range(1, 5):
        for h_q in (8, 16, 32, 64, 128):
            _etap.validate_shape(3, s_q, h_q, 10, 7)


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


@pytest.mark.parametrize(
    "args, exc, needle",
    [
        ((FakeTensor((4,), I32), 16, 2), ValueError, "num_heads_k"),
        ((FakeTensor((4,), I32), 12, 1), ValueError, "num_q_tokens_per_head_k"),
        ((FakeTensor((4,), I32), 1024, 1), ValueError, "num_q_tokens_per_head_k"),
        ((FakeTensor((4,), I32), 16.0, 1), TypeError, "num_q_tokens_per_head_k"),
        ((FakeTensor((4,), I64), 16, 1), TypeError, "cache_seqlens"),
        ((FakeTensor((4,), I32, ("cpu", None)), 16, 1), ValueError, "cache_seqlens"),
        ((FakeTensor((4, 1), I32), 16, 1), ValueError, "cache_seqlens"),
        ((FakeTensor((0,), I32), 16, 1), ValueError, "cache_seqlens"),
        (([1, 2], 16, 1), TypeError, "cache_seqlens"),
        ((FakeTensor((4,), I32), 16, None), TypeError, "get_mla_metadata"),
        ((FakeTensor((4,), I32), 16, 1, None, True), NotImplementedError, "is_fp8_kvcache"),
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
    (dict(q=FakeTensor((2, 1, 12, 576))), ValueError, "q: h_q = 12"),
    (dict(q=FakeTensor((2, 1, 1, 576))), ValueError, "q: h_q = 1"),
    (dict(q=FakeTensor((2, 5, 16, 576))), ValueError, "q: s_q = 5"),
    (dict(q=FakeTensor((0, 1, 16, 576))), ValueError, "q: empty batch"),
    (dict(q=bad_strides((2, 1, 16, 576))), ValueError, "q: must be contiguous"),
    (dict(q=FakeTensor((2, 1, 16, 576), strides=(9216, 9216, 1, 16))), ValueError, "q: must be contiguous"),
    # k_cache
    (dict(k_cache=FakeTensor((8, 64, 1, 576), F16)), TypeError, "k_cache: dtype must be torch.bfloat16"),
    (dict(k_cache=FakeTensor((8, 64, 1, 576), BF16, ("cuda", 1))), ValueError, "k_cache: on cuda:1"),
    (dict(k_cache=FakeTensor((8, 64, 1, 576), BF16, ("cpu", None))), ValueError, "k_cache: must be on a CUDA"),
    (dict(k_cache=FakeTensor((8, 64, 576))), ValueError, "k_cache: expected 4 dims"),
    (dict(k_cache=FakeTensor((8, 32, 1, 576))), ValueError, "k_cache: page_block_size must be 64"),
    (dict(k_cache=FakeTensor((8, 64, 2, 576))), ValueError, "k_cache: num_heads_k must be 1"),
    (dict(k_cache=FakeTensor((8, 64, 1, 512))), ValueError, "k_cache: head dim must be 576"),
    (dict(k_cache=FakeTensor((0, 64, 1, 576))), ValueError, "k_cache: has no pages"),
    (dict(k_cache=bad_strides((8, 64, 1, 576))), ValueError, "k_cache: must be contiguous"),
    (dict(k_cache=FakeTensor((2**26, 64, 1, 576), ptr=0x10000)), ValueError, "num_pages"),
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
    (dict(is_fp8_kvcache=True), NotImplementedError, "is_fp8_kvcache"),
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
    for s_q in (1, 2, 4):
        for h_q in (8, 128):
            for dt in (BF16, F16):
                q, k, bt, sl = decode_inputs(b=3, s_q=s_q, h_q=h_q, dtype=dt)
                out = FakeTensor((3, s_q, h_q, 512), dt)
                lse = FakeTensor((3, h_q, s_q), F32)
                with pytest.raises(ReachedDevice):
                    _valid_call_to_device(q, k, bt, sl, out, lse, causal=True)


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

    def plan(self, *args):
        self.calls.append(("plan",) + args[:5])
        return object()

    def replan(self, plan, seqlens, stream):
        self.calls.append(("replan", seqlens))

    def decode(self, plan, dtype, *args):
        self.calls.append(("decode", dtype))


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
    assert dec.calls[0][1:] == (2, 1, 16, 8, 4)
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
    assert interface._plans.get((0, 2, 1, 16, 8, 4)).pinned
    dec.capture = None
    dec.calls.clear()
    # Another shape (a wider block table): a new plan; the metadata of the first is refused.
    q2, k2, bt2, sl2 = decode_inputs(max_pages=6)
    step(etap.get_mla_metadata()[0], q2, k2, bt2, sl2, layers=1)
    assert [c[0] for c in dec.calls] == ["plan", "decode"]
    with pytest.raises(ValueError, match="planned for another shape"):
        step(m1, q2, k2, bt2, sl2, layers=1)


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

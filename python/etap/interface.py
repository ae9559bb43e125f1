"""FlashMLA's interface on etap's kernels, and etap's own plan-based call.

Design (README, "Python"): FlashMLA's ``get_mla_metadata`` returns metadata made from the
seqlens alone, but etap's plan also needs the batch's shape (s_q, h_q, the block table's width,
the cache's pages and their page size). So, as FlashMLA itself does since its
``FlashMLASchedMeta``, the metadata is an object that plans on the first
``flash_mla_with_kvcache`` call it is given, and every later call with it (the other layers of
the step) reuses that plan. The plan's device buffers are kept per (device, shape), the shape
including the cache's page size (a plan is never used for a cache of another page size), and
re-planned in place (one small kernel, no allocation), so:

- eager: one schedule launch per step (per metadata object), the plan's memory reused;
- CUDA graphs: inside a capture, the first call with a metadata object re-plans (captured), so
  every replay schedules for the seqlens then in the captured ``cache_seqlens`` tensor. A shape
  must have been run once before the capture (a warm-up, as every engine does), because making
  a new plan allocates device memory, which a capture forbids; the error says so.

The packed query layout (each request its own number of query tokens, through device offsets
``cu_seqlens_q``) is on etap's own call only (:func:`plan` / :func:`decode`); FlashMLA's call
keeps its uniform layout.

FP8 caches (issue 14; q and out bf16 or fp16, pages of 64 rows, any ``s_q * h_q`` (past 32 heads
on M, 64 columns a CTA), the uniform query layout and, on etap's own call, the packed one):
FlashMLA's "FP8 with scale" format (656 bytes a token: 512 float8_e4m3fn, 4 float32
scales, one per 128 values, 64 bf16 RoPE values; ``k_cache [num_blocks, 64, 1, 656]`` as
FlashMLA's quantizer lays it out, pages 65 token slots apart) with
``flash_mla_with_kvcache(..., is_fp8_kvcache=True)``, and per-tensor e4m3 (``k_cache
[num_blocks, 64, 1, 576]`` float8_e4m3fn or uint8, value = e4m3 * ``kv_scale``) with
``is_fp8_kvcache=True, kv_scale=s``. etap's own :func:`plan` / :func:`decode` take either cache
the same way (the format read from the cache: an 8-bit dtype, 656 or 576 bytes a token; the
per-tensor scale given to :func:`decode` as ``kv_scale``). :mod:`etap.quant` makes both. The
FP8 kernels compute in float16: q, the 656 format's RoPE part and its dequantized values must
be below 65520 in magnitude, or the output is not finite; a 656 block scale below 2**-24 reads
as zero.
"""

import itertools
import threading
from collections import OrderedDict

from . import _checks, _etap

__all__ = [
    "EtapMetadata",
    "get_mla_metadata",
    "flash_mla_with_kvcache",
    "decoder",
    "Plan",
    "plan",
    "decode",
]

_lock = threading.Lock()
_decoders = {}


def decoder(device_index):
    """The ``etap._etap.Decoder`` of a CUDA device (made once per process and device)."""
    with _lock:
        d = _decoders.get(device_index)
        if d is None:
            d = _etap.Decoder(device_index)
            _decoders[device_index] = d
        return d


def _stream_handle(device_index):
    import torch

    return torch.cuda.current_stream(device_index).cuda_stream


class _PlanCache:
    """Plans by (device, b, s_q, h_q, num_pages, max_pages, page_size[, kv_format]) (the FP8
    format of the cache where it has one), least recently used first. A plan that a graph
    capture used is pinned (the graph's replays write into it) and never evicted."""

    def __init__(self, limit=32):
        self.limit = limit
        self.plans = OrderedDict()  # key -> _Slot

    def get(self, key):
        slot = self.plans.get(key)
        if slot is not None:
            self.plans.move_to_end(key)
        return slot

    def put(self, key, slot):
        self.plans[key] = slot
        self.plans.move_to_end(key)
        while len(self.plans) > self.limit:
            # Never the plan just added (this call uses it), nor one a graph captured.
            victim = next((k for k, s in self.plans.items() if not s.pinned and k != key), None)
            if victim is None:
                break
            old = self.plans.pop(victim)
            # Work already enqueued may still use the plan's buffers: wait for its stream.
            import torch

            torch.cuda.synchronize(old.device)
            del old


class _Slot:
    __slots__ = ("plan", "device", "owner", "pinned")

    def __init__(self, plan, device):
        self.plan = plan
        self.device = device
        self.owner = None  # the EtapMetadata (by token) the plan was last scheduled for
        self.pinned = False


_plans = _PlanCache()
# Metadata identities: a counter, not id(), which Python reuses once an object is freed (a new
# step's metadata could then pass for the old one and decode with its stale schedule).
_tokens = itertools.count(1)


class EtapMetadata:
    """The scheduling metadata of one decode step (FlashMLA's ``tile_scheduler_metadata``).

    Made by :func:`get_mla_metadata`; planned by the first :func:`flash_mla_with_kvcache` call
    it is passed to and reused by the calls after it, which must have the same shapes and the
    same ``cache_seqlens`` values (FlashMLA's rule). Make a new one for each step.
    """

    __slots__ = ("batch", "cols", "device", "fp8", "key", "capture", "token", "__weakref__")

    def __init__(self, batch=None, cols=None, device=None, fp8=None):
        self.token = next(_tokens)
        self.batch = batch
        self.cols = cols
        self.device = device
        self.fp8 = fp8  # get_mla_metadata's is_fp8_kvcache where given (None: not said)
        self.key = None  # the plan key of the first call
        self.capture = None  # the graph capture (id) the plan was last scheduled in, None: eager

    def __repr__(self):
        fp8 = "" if self.fp8 is None else f", is_fp8_kvcache={self.fp8}"
        return (f"etap.EtapMetadata(batch={self.batch}, cols={self.cols}, device={self.device}{fp8}, "
                f"planned={self.key is not None})")


def get_mla_metadata(
    cache_seqlens=None,
    num_q_tokens_per_head_k=None,
    num_heads_k=None,
    num_heads_q=None,
    is_fp8_kvcache=False,
    topk=None,
    *,
    num_heads_per_head_k=None,
):
    """FlashMLA's ``get_mla_metadata``: returns ``(tile_scheduler_metadata, num_splits)``.

    Both of FlashMLA's forms are accepted: the older
    ``get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k)`` (checked now, and
    against the decode call: the batch and ``s_q * h_q``) and the newer ``get_mla_metadata()``.
    ``tile_scheduler_metadata`` is an :class:`EtapMetadata` (it plans lazily, on the tensors of
    the first decode call); ``num_splits`` is ``None`` (kept for the call's signature).
    ``is_fp8_kvcache=True`` (an FP8 cache, any ``num_q_tokens_per_head_k`` a 16-bit one takes) is
    recorded, and the decode calls with this metadata must say the same (FlashMLA's rule).
    Launches nothing and does not synchronize.
    """
    # FlashMLA's other versions: the count's older name, and the fp8 / sparse options.
    if num_heads_per_head_k is not None:
        if num_q_tokens_per_head_k is not None:
            raise TypeError("get_mla_metadata: num_heads_per_head_k is num_q_tokens_per_head_k's old name: give one")
        num_q_tokens_per_head_k = num_heads_per_head_k
    if not isinstance(is_fp8_kvcache, bool):
        raise TypeError(f"is_fp8_kvcache: expected a bool, got {type(is_fp8_kvcache).__name__}")
    if topk is not None:
        raise NotImplementedError("topk: etap implements FlashMLA's dense decode only (no sparse attention)")
    if num_heads_q is not None and (isinstance(num_heads_q, bool) or not isinstance(num_heads_q, int)):
        raise TypeError(f"num_heads_q: expected an int, got {type(num_heads_q).__name__}")
    if num_heads_q is not None and not 1 <= num_heads_q <= _checks.MAX_HEADS:
        raise ValueError(f"num_heads_q: {num_heads_q} heads is not supported (1 to {_checks.MAX_HEADS})")
    given = [a is not None for a in (cache_seqlens, num_q_tokens_per_head_k, num_heads_k)]
    # Recorded only when said: FlashMLA's newest get_mla_metadata() takes no arguments.
    fp8 = True if is_fp8_kvcache else None
    if not any(given):
        return EtapMetadata(fp8=fp8), None
    if not all(given):
        raise TypeError("get_mla_metadata: give all of cache_seqlens, num_q_tokens_per_head_k and num_heads_k, or none")
    _checks.require_tensor("cache_seqlens", cache_seqlens)
    _checks.require_dtype("cache_seqlens", cache_seqlens, _checks._I32)
    device = _checks.require_cuda("cache_seqlens", cache_seqlens)
    shape = _checks.shape_of(cache_seqlens)
    if len(shape) != 1 or shape[0] < 1:
        raise ValueError(f"cache_seqlens: expected shape [batch] with batch >= 1, got {list(shape)}")
    for name, v in (("num_q_tokens_per_head_k", num_q_tokens_per_head_k), ("num_heads_k", num_heads_k)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    if num_heads_k != 1:
        raise ValueError(f"num_heads_k: must be 1 (MLA's one latent KV head), got {num_heads_k}")
    if not _supported_cols(num_q_tokens_per_head_k):
        raise ValueError(
            f"num_q_tokens_per_head_k: {num_q_tokens_per_head_k} (= s_q * h_q / num_heads_k) is not supported: "
            f"it must be s_q * h_q with s_q 1 to {_checks.MAX_S_Q} and h_q 1 to {_checks.MAX_HEADS}"
        )
    return EtapMetadata(shape[0], num_q_tokens_per_head_k, device, fp8), None


def _supported_cols(cols):
    """Whether s_q * h_q = cols for some supported s_q (1..MAX_S_Q) and h_q (1..MAX_HEADS)."""
    return any(cols % s == 0 and 1 <= cols // s <= _checks.MAX_HEADS for s in range(1, _checks.MAX_S_Q + 1))


def _check_metadata(meta, num_splits, device, shape, fp8=False):
    if not isinstance(meta, EtapMetadata):
        raise TypeError(
            f"tile_scheduler_metadata: expected the etap.EtapMetadata that etap.get_mla_metadata returns, "
            f"got {type(meta).__name__} (FlashMLA's metadata tensors do not carry etap's plan)"
        )
    if num_splits is not None:
        raise TypeError("num_splits: must be None, as etap.get_mla_metadata returns it")
    b, s_q, h_q = shape[0], shape[1], shape[2]
    if meta.batch is not None and meta.batch != b:
        raise ValueError(f"tile_scheduler_metadata: made for a batch of {meta.batch}, but q has a batch of {b}")
    if meta.cols is not None and meta.cols != s_q * h_q:
        raise ValueError(
            f"tile_scheduler_metadata: made for num_q_tokens_per_head_k = {meta.cols}, but q has "
            f"s_q * h_q = {s_q} * {h_q} = {s_q * h_q}"
        )
    if meta.device is not None and meta.device != device:
        raise ValueError(f"tile_scheduler_metadata: made for cuda:{meta.device}, but q is on cuda:{device}")
    if meta.fp8 is not None and meta.fp8 != fp8:
        raise ValueError(
            f"tile_scheduler_metadata: made with is_fp8_kvcache={meta.fp8}, but this call has is_fp8_kvcache={fp8}"
        )


def _plan_key(device, shape, kv_format=None, kv_page_stride=None):
    """A plan's key: the device, the shape, and the cache's format where it is FP8, with its
    page stride where that is not the format's own."""
    fp8 = () if kv_format is None else (kv_format,) + (() if kv_page_stride is None else (kv_page_stride,))
    return (device,) + tuple(shape) + fp8


def _describe_key(key):
    """A plan key as the errors show it: "(batch, ..., page_size[, kv_format[, kv_page_stride]] = (...))"."""
    names = ("batch", "s_q", "h_q", "num_pages", "max_pages", "page_size", "kv_format", "kv_page_stride")
    return f"({', '.join(names[: len(key) - 1])} = {key[1:]})"


def _fp8_kw(kv_format, kv_page_stride):
    """The native plan's keywords for a cache's format and page stride (none for a 16-bit cache)."""
    return {k: v for k, v in (("kv_format", kv_format), ("kv_page_stride", kv_page_stride)) if v is not None}


def _scheduled_plan(meta_id, device, shape, cache_seqlens, stream, meta=None, kv_format=None, kv_page_stride=None):
    """The plan for this call, scheduled for `meta` (re-planned if another step used it since,
    or if this is a new graph capture). `kv_format`: an FP8 cache's ("fp8_656" or
    "fp8_per_tensor"), None for a 16-bit one, and `kv_page_stride` its token rows between pages
    where not the format's own; a plan serves one format and stride."""
    dec = decoder(device)
    capture = _etap.stream_capture_id(dec, stream)
    # Not keyed by stream: torch.cuda.graph captures on a stream of its own, after warm-up
    # calls on another; calls must be ordered (one stream, or synchronized) across steps.
    key = _plan_key(device, shape, kv_format, kv_page_stride)
    if meta is not None and meta.key is not None and meta.key != key:
        raise ValueError(
            f"tile_scheduler_metadata: planned for another shape {_describe_key(meta.key)}; this call has "
            f"{key[1:]}: make one metadata per step and shape"
        )
    with _lock:
        slot = _plans.get(key)
        if slot is None:
            # Makes the plan and schedules it (raises if the stream is capturing).
            made = dec.plan(*shape, cache_seqlens.data_ptr(), stream, **_fp8_kw(kv_format, kv_page_stride))
            slot = _Slot(made, device)
            _plans.put(key, slot)
        elif meta_id is None or slot.owner != meta_id or (meta is not None and meta.capture != capture):
            dec.replan(slot.plan, cache_seqlens.data_ptr(), stream)
        if capture is not None:
            slot.pinned = True
        slot.owner = meta_id
        if meta is not None:
            meta.key = key
            meta.capture = capture
        return dec, slot.plan


def _empty_lse(lse, empty_lse):
    # The kernel writes -inf for a (token, head) that saw no row; FlashMLA returns +inf.
    if empty_lse == "+inf":
        lse.nan_to_num_(nan=float("nan"), posinf=float("inf"), neginf=float("inf"))
    elif empty_lse != "-inf":
        raise ValueError(f"empty_lse: must be '+inf' (FlashMLA's) or '-inf', got {empty_lse!r}")


def flash_mla_with_kvcache(
    q,
    k_cache,
    block_table,
    cache_seqlens,
    head_dim_v,
    tile_scheduler_metadata,
    num_splits=None,
    softmax_scale=None,
    causal=False,
    is_fp8_kvcache=False,
    indices=None,
    attn_sink=None,
    extra_k_cache=None,
    extra_indices_in_kvcache=None,
    topk_length=None,
    extra_topk_length=None,
    *,
    empty_lse="+inf",
    out=None,
    lse=None,
    kv_scale=None,
):
    """FlashMLA's ``flash_mla_with_kvcache`` on etap: returns ``(out, lse)``.

    q ``[b, s_q, h_q, 576]`` bf16/fp16, s_q 1 to 8, h_q 1 to 128; k_cache
    ``[num_blocks, page_block_size, 1, 576]`` (q's dtype), page_block_size 16, 32, 64 or 128;
    block_table ``int32[b, max_blocks]`` (entries are blocks of page_block_size rows);
    cache_seqlens ``int32[b]``; head_dim_v 512.
    out ``[b, s_q, h_q, 512]`` (q's dtype), lse ``float32[b, h_q, s_q]``, natural log. Runs on
    q's device and torch's current stream, without host synchronization; capturable in a CUDA
    graph. ``causal=True`` is FlashMLA's mask (token t sees rows < seqlen - s_q + t + 1);
    ``causal=False`` is supported for s_q = 1 only (where the two agree). A (token, head) that
    sees no row gets out = 0 and lse = +inf as FlashMLA returns it, or -inf with
    ``empty_lse="-inf"`` (what merging partial states needs). ``out``/``lse`` may be given
    (etap's extension) to write into the caller's tensors.

    FP8 caches (``is_fp8_kvcache=True``; q and out bf16 or fp16, s_q and h_q as above, pages of
    64 rows; 17-32 (token, head) columns a request run etap's FP8 kernel of 32 columns, more its
    wide FP8 kernel, 64 columns a CTA, each CTA converting the cache's pages itself):

    - FlashMLA's "FP8 with scale" format: k_cache ``[num_blocks, 64, 1, 656]`` float8_e4m3fn (or
      uint8) as FlashMLA's quantizer returns it (``tests/quant.py``'s ``quantize_k_cache``, or
      :func:`etap.quant.quantize_fp8_656`): per token 512 e4m3, 4 float32 scales (one per 128
      values), 64 bf16 RoPE values; pages 65 token slots apart (strides ``(42640, 656, 656,
      1)``), or any other whole number of token rows of at least 64 (a contiguous cache, as vLLM
      allocates this format: 64), every page's slots allocated. FlashMLA itself reads this
      format in its sparse decode only; etap decodes it densely, through the block table.
    - per-tensor e4m3 (etap's extension): k_cache ``[num_blocks, 64, 1, 576]`` float8_e4m3fn (or
      uint8), contiguous (or its pages another whole number of token rows apart, at least 64),
      value = e4m3 * ``kv_scale`` (keyword-only: a Python float, finite and
      positive as a float32, passed to the kernel by value, so a CUDA graph replays the scale it
      captured); :func:`etap.quant.quantize_e4m3_per_tensor` makes one.
    """
    if not isinstance(is_fp8_kvcache, bool):
        raise TypeError(f"is_fp8_kvcache: expected a bool, got {type(is_fp8_kvcache).__name__}")
    for name, v in (
        ("indices", indices),
        ("attn_sink", attn_sink),
        ("extra_k_cache", extra_k_cache),
        ("extra_indices_in_kvcache", extra_indices_in_kvcache),
        ("topk_length", topk_length),
        ("extra_topk_length", extra_topk_length),
    ):
        if v is not None:
            raise NotImplementedError(f"{name}: etap implements FlashMLA's dense decode only (no sparse attention)")
    scale = _checks.check_scale(softmax_scale)
    kv_scale = _checks.check_kv_scale(kv_scale)
    if empty_lse not in ("+inf", "-inf"):
        raise ValueError(f"empty_lse: must be '+inf' (FlashMLA's) or '-inf', got {empty_lse!r}")
    if is_fp8_kvcache:
        device, dtype, shape, kv_format, kv_page_stride = _checks.check_fp8_decode_args(
            q, k_cache, block_table, cache_seqlens, head_dim_v, causal)
        _checks.check_fp8_kv_scale(kv_format, kv_scale)
    else:
        if kv_scale is not None:
            raise ValueError("kv_scale: given with is_fp8_kvcache=False (a 16-bit cache has no scale)")
        if _checks.is_fp8_cache(k_cache):
            raise TypeError(
                f"k_cache: dtype {_checks.dtype_name(k_cache)} is an FP8 cache's: pass is_fp8_kvcache=True "
                "(and kv_scale= for a per-tensor e4m3 cache)"
            )
        device, dtype, shape = _checks.check_decode_args(q, k_cache, block_table, cache_seqlens, head_dim_v, causal)
        kv_format = kv_page_stride = None
    _check_metadata(tile_scheduler_metadata, num_splits, device, shape, is_fp8_kvcache)
    out, lse = _outputs(q, shape, out, lse, (("q", q), ("k_cache", k_cache), ("block_table", block_table), ("cache_seqlens", cache_seqlens)))
    _checks.check_addresses(q, k_cache, block_table, cache_seqlens, out, lse)
    stream = _stream_handle(device)
    meta = tile_scheduler_metadata
    dec, p = _scheduled_plan(meta.token, device, shape, cache_seqlens, stream, meta, kv_format, kv_page_stride)
    if kv_format is None:
        dec.decode(p, dtype, q.data_ptr(), k_cache.data_ptr(), block_table.data_ptr(), cache_seqlens.data_ptr(),
                   out.data_ptr(), lse.data_ptr(), scale, stream)
    else:
        dec.decode_fp8(p, dtype, q.data_ptr(), k_cache.data_ptr(), block_table.data_ptr(), cache_seqlens.data_ptr(),
                       out.data_ptr(), lse.data_ptr(), kv_scale, scale, stream)
    _empty_lse(lse, empty_lse)
    return out, lse


def _outputs(q, shape, out, lse, inputs, total_q=None):
    out_shape, lse_shape = _checks.output_shapes(shape, total_q)
    if out is None:
        import torch

        out = torch.empty(out_shape, dtype=q.dtype, device=q.device)
    if lse is None:
        import torch

        lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
    _checks.check_outputs(out, lse, q, shape, inputs, total_q)
    return out, lse


def _layout_args(cu_seqlens_q, max_seqlen_q):
    """Whether a call is in the packed query layout: cu_seqlens_q and max_seqlen_q come together."""
    if cu_seqlens_q is None:
        if max_seqlen_q is not None:
            raise TypeError("max_seqlen_q: given without cu_seqlens_q (it is the packed layout's, with cu_seqlens_q)")
        return False
    if max_seqlen_q is None:
        raise TypeError("max_seqlen_q: needed with cu_seqlens_q (the most query tokens a request has, 1 to 8)")
    return True


def _check_args(q, k_cache, block_table, cache_seqlens, causal, cu_seqlens_q, max_seqlen_q):
    """(device, dtype, shape, total_q, kv_format, kv_page_stride) of a native call: total_q None in
    the uniform layout; kv_format None for a 16-bit cache, "fp8_656" or "fp8_per_tensor" for an
    FP8 one (a cache of 8-bit dtype, read by its bytes a token), kv_page_stride its token rows
    between pages where not the format's own (else None)."""
    packed = _layout_args(cu_seqlens_q, max_seqlen_q)
    if _checks.is_fp8_cache(k_cache):
        if packed:
            return _checks.check_fp8_packed_decode_args(q, cu_seqlens_q, max_seqlen_q, k_cache, block_table,
                                                        cache_seqlens, causal)
        device, dtype, shape, kv_format, kv_page_stride = _checks.check_fp8_decode_args(
            q, k_cache, block_table, cache_seqlens, _checks.D_V, causal)
        return device, dtype, shape, None, kv_format, kv_page_stride
    if packed:
        return _checks.check_packed_decode_args(q, cu_seqlens_q, max_seqlen_q, k_cache, block_table, cache_seqlens,
                                                causal) + (None, None)
    device, dtype, shape = _checks.check_decode_args(q, k_cache, block_table, cache_seqlens, _checks.D_V, causal)
    return device, dtype, shape, None, None, None


class Plan:
    """etap's own call: an explicit plan for one shape on one device and stream.

    ``plan = etap.plan(q, k_cache, block_table, cache_seqlens)`` schedules for the seqlens now
    in ``cache_seqlens``; ``plan.replan(cache_seqlens)`` re-schedules in place for a new step
    (no allocation: capturable); ``etap.decode(plan, q, k_cache, block_table, cache_seqlens)``
    decodes, as often as there are layers. Unlike the metadata of
    :func:`flash_mla_with_kvcache`, a Plan owns its buffers (no sharing between steps).
    ``shape`` is ``(batch, s_q, h_q, num_pages, max_pages, page_size)``; :func:`decode` refuses
    tensors of another shape, a cache of another page size included.

    The packed query layout (FlashAttention's varlen names): ``etap.plan(q, k_cache,
    block_table, cache_seqlens, cu_seqlens_q=cu, max_seqlen_q=n)`` with q ``[total_q, h_q,
    576]`` and ``cu`` ``int32[b + 1]``; ``shape``'s s_q is then ``max_seqlen_q`` and
    ``total_q`` is q's row count (None for a plan of the uniform layout). A plan serves one
    layout and one ``total_q``: :func:`decode` refuses the other layout and another total_q.

    An FP8 cache (issue 14; a k_cache of dtype float8_e4m3fn or uint8: FlashMLA's ``[num_blocks,
    64, 1, 656]`` or per-tensor e4m3 ``[num_blocks, 64, 1, 576]``, see
    :func:`flash_mla_with_kvcache`; q bf16 or fp16, either query layout) makes
    a plan for its format: ``kv_format`` is ``"fp8_656"`` or ``"fp8_per_tensor"`` (None for a 16-bit
    cache), ``kv_page_stride`` its token rows between pages where not the format's own (e.g. 64
    for a contiguous cache of FlashMLA's format; None otherwise), and :func:`decode` refuses a
    cache of another format or page stride.
    """

    def __init__(self, q, k_cache, block_table, cache_seqlens, causal=True, *, cu_seqlens_q=None, max_seqlen_q=None):
        device, dtype, shape, total_q, kv_format, kv_page_stride = _check_args(
            q, k_cache, block_table, cache_seqlens, causal, cu_seqlens_q, max_seqlen_q)
        self.device = device
        self.shape = shape
        self.total_q = total_q
        self.kv_format = kv_format
        self.kv_page_stride = kv_page_stride
        self.stream = _stream_handle(device)
        self._dec = decoder(device)
        kw = {} if total_q is None else {"total_q": total_q}
        self._plan = self._dec.plan(*shape, cache_seqlens.data_ptr(), self.stream, **kw,
                                    **_fp8_kw(kv_format, kv_page_stride))

    def replan(self, cache_seqlens):
        """Schedule for the seqlens now in `cache_seqlens` (same batch), on the current stream."""
        _checks.require_tensor("cache_seqlens", cache_seqlens)
        _checks.require_same_device("cache_seqlens", cache_seqlens, self.device, ref="the plan")
        _checks.require_dtype("cache_seqlens", cache_seqlens, _checks._I32)
        if _checks.shape_of(cache_seqlens) != (self.shape[0],):
            raise ValueError(f"cache_seqlens: expected shape [batch = {self.shape[0]}], got {list(_checks.shape_of(cache_seqlens))}")
        _checks.require_contiguous("cache_seqlens", cache_seqlens)
        stream = _stream_handle(self.device)
        self._dec.replan(self._plan, cache_seqlens.data_ptr(), stream)

    @property
    def layout(self):
        return self._plan.layout

    def __repr__(self):
        return repr(self._plan)


def plan(q, k_cache, block_table, cache_seqlens, causal=True, *, cu_seqlens_q=None, max_seqlen_q=None):
    """Make a :class:`Plan` for these tensors' shape, scheduled for ``cache_seqlens``.

    With ``cu_seqlens_q`` (``int32[b + 1]``) and ``max_seqlen_q`` (1 to 8), a plan for the
    packed query layout: q ``[total_q, h_q, 576]``, request r's tokens being rows
    ``cu_seqlens_q[r]..cu_seqlens_q[r + 1]``, at most ``max_seqlen_q`` of them (see
    :func:`decode`). The plan depends on the offsets' count (the batch) and on total_q, not on
    their values. An FP8 cache makes a plan for its format (:class:`Plan`)."""
    return Plan(q, k_cache, block_table, cache_seqlens, causal, cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q)


def _format_name(kv_format):
    return {
        None: "a 16-bit cache",
        "fp8_656": "FlashMLA's FP8 cache (kv_format 'fp8_656', 656 bytes a token)",
        "fp8_per_tensor": "a per-tensor e4m3 cache (kv_format 'fp8_per_tensor', 576 bytes a token)",
    }[kv_format]


def _layout_name(plan):
    if plan.total_q is None:
        return f"the uniform layout, (batch, s_q, h_q, num_pages, max_pages, page_size) = {tuple(plan.shape)}"
    return (f"the packed layout, (batch, max_seqlen_q, h_q, num_pages, max_pages, page_size, total_q) = "
            f"{tuple(plan.shape) + (plan.total_q,)}")


def decode(plan, q, k_cache, block_table, cache_seqlens, softmax_scale=None, causal=True, *, out=None, lse=None,
           empty_lse="-inf", cu_seqlens_q=None, max_seqlen_q=None, kv_scale=None):
    """Decode with an explicit :class:`Plan` (made or last re-planned for these seqlens).
    Returns ``(out, lse)``; writes into ``out``/``lse`` when given. lse of a (token, head) that
    saw no row is -inf by default here (``empty_lse="+inf"`` for FlashMLA's).

    The packed query layout (a plan made with ``cu_seqlens_q``; FlashAttention's varlen
    names): ``cu_seqlens_q`` ``int32[b + 1]`` on q's device, starting at 0, non-decreasing,
    ending at total_q, no request more than ``max_seqlen_q`` (1 to 8, the plan's) tokens; q
    ``[total_q, h_q, 576]``. Token i of a request of n tokens sees the cache rows
    ``< seqlen - n + i + 1`` (FlashMLA's causal mask, per request); a request of 0 tokens is
    skipped. Returns out ``[total_q, h_q, 512]`` (q's dtype) and lse ``float32[total_q, h_q]``
    (token-major, unlike the uniform layout's ``[b, h_q, s_q]``). The offsets' values are read
    on the device only, as the seqlens and the block table are (no host synchronization, so the
    call is capturable): offsets that break these rules are clamped there, so no request reads
    or writes outside q, out and lse, but the result is then unspecified. Everything else is
    checked before the launch.

    An FP8 cache (a plan made for its format: see :class:`Plan`): q bf16 or fp16 (``[b, s_q,
    h_q, 576]``, or packed as above), out of q's dtype; ``kv_scale`` (a Python float, finite
    and positive as a float32) is the per-tensor e4m3 cache's scale (value = e4m3 * kv_scale)
    and must be None for FlashMLA's 656-byte format, whose scales are in the cache. The scale is passed by value: a CUDA graph
    replays the scale it captured.
    """
    if not isinstance(plan, Plan):
        raise TypeError(f"plan: expected an etap.Plan, got {type(plan).__name__}")
    if (plan.total_q is None) != (cu_seqlens_q is None):
        if cu_seqlens_q is None:
            raise ValueError(
                f"cu_seqlens_q: needed: the plan was made for {_layout_name(plan)}; pass "
                "cu_seqlens_q and max_seqlen_q, or make a plan for the uniform layout"
            )
        raise ValueError(
            f"cu_seqlens_q: given, but the plan was made for {_layout_name(plan)}; make a plan "
            "with cu_seqlens_q and max_seqlen_q for the packed layout"
        )
    scale = _checks.check_scale(softmax_scale)
    kv_scale = _checks.check_kv_scale(kv_scale)
    if empty_lse not in ("+inf", "-inf"):
        raise ValueError(f"empty_lse: must be '+inf' or '-inf', got {empty_lse!r}")
    device, dtype, shape, total_q, kv_format, kv_page_stride = _check_args(
        q, k_cache, block_table, cache_seqlens, causal, cu_seqlens_q, max_seqlen_q)
    if device != plan.device:
        raise ValueError(f"plan: made for cuda:{plan.device}, but q is on cuda:{device}")
    if kv_format != plan.kv_format:
        raise ValueError(
            f"plan: made for {_format_name(plan.kv_format)}, but k_cache is {_format_name(kv_format)}: make a plan "
            "for this cache"
        )
    if kv_page_stride != plan.kv_page_stride:
        def rows(stride):
            return "its format's own" if stride is None else str(stride)

        raise ValueError(
            f"k_cache: its pages lie {rows(kv_page_stride)} token rows apart, the plan was made for "
            f"{rows(plan.kv_page_stride)}: make a plan for this cache"
        )
    if kv_format is None:
        if kv_scale is not None:
            raise ValueError("kv_scale: given for a 16-bit cache (only a per-tensor e4m3 cache has a scale)")
    else:
        _checks.check_fp8_kv_scale(kv_format, kv_scale)
    if tuple(shape) != tuple(plan.shape) or total_q != plan.total_q:
        if total_q is None:
            names, made, got = "batch, s_q, h_q, num_pages, max_pages, page_size", tuple(plan.shape), tuple(shape)
        else:
            names = "batch, max_seqlen_q, h_q, num_pages, max_pages, page_size, total_q"
            made, got = tuple(plan.shape) + (plan.total_q,), tuple(shape) + (total_q,)
        raise ValueError(f"plan: made for ({names}) = {made}, this call has {got}")
    inputs = [("q", q), ("k_cache", k_cache), ("block_table", block_table), ("cache_seqlens", cache_seqlens)]
    if cu_seqlens_q is not None:
        inputs.append(("cu_seqlens_q", cu_seqlens_q))
    out, lse = _outputs(q, shape, out, lse, tuple(inputs), total_q)
    _checks.check_addresses(q, k_cache, block_table, cache_seqlens, out, lse, cu_seqlens_q)
    stream = _stream_handle(device)
    ptrs = (q.data_ptr(), k_cache.data_ptr(), block_table.data_ptr(), cache_seqlens.data_ptr(), out.data_ptr(),
            lse.data_ptr())
    kw = {} if cu_seqlens_q is None else {"cu_seqlens_q": cu_seqlens_q.data_ptr()}
    if kv_format is None:
        plan._dec.decode(plan._plan, dtype, *ptrs, scale, stream, **kw)
    else:
        plan._dec.decode_fp8(plan._plan, dtype, *ptrs, kv_scale, scale, stream, **kw)
    _empty_lse(lse, empty_lse)
    return out, lse

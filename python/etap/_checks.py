"""Argument checks of the decode calls, before anything is launched.

Torch-free on purpose: a tensor is read only through its attributes (``dtype``, ``device``,
``shape``, ``stride()``, ``data_ptr()``; for FlashMLA's FP8 cache also ``untyped_storage()``,
where the tensor has it, for the size of its allocation), so these checks run (and are tested)
on a machine without torch or a GPU. Each failure raises ``TypeError`` (wrong type or dtype), ``ValueError``
(wrong shape, stride, device, size, value) or ``NotImplementedError`` (a valid FlashMLA call
that etap's kernels do not support), and names the argument at fault.
"""

import math
import struct

from . import _etap

D_QK = _etap.D_QK  # 576: q and cache rows (512 latent + 64 RoPE)
D_V = _etap.D_V  # 512: V = the first 512 columns of the cache rows; out
MAX_HEADS = _etap.MAX_HEADS  # 128: h_q is 1 to MAX_HEADS
MAX_S_Q = _etap.MAX_S_Q  # 8: s_q (query tokens per request) is 1 to MAX_S_Q
PAGE_SIZES = tuple(_etap.PAGE_SIZES)  # (16, 32, 64, 128): rows per cache page (page_block_size)
DEFAULT_PAGE_SIZE = _etap.DEFAULT_PAGE_SIZE  # 64: FlashMLA's page size

# FP8 caches (issue 14): read by the ETAP kernel of 16 or 32 columns, a request of more columns by
# the wide (heads-on-M) FP8 kernel, with bf16 or fp16 q and out.
FP8_656_TOKEN_BYTES = _etap.FP8_656_TOKEN_BYTES  # 656: FlashMLA's "FP8 with scale" (512 e4m3, 4 f32, 64 bf16)
FP8_656_PAGE_STRIDE = _etap.FP8_656_PAGE_STRIDE  # 42640 bytes: pages of 64 tokens laid out 65 apart
FP8_TENSOR_TOKEN_BYTES = _etap.FP8_TENSOR_TOKEN_BYTES  # 576: per-tensor e4m3, one float32 scale
FP8_PAGE_SIZE = 64  # an FP8 cache's page_block_size

# dtype names as torch prints them (str(torch.bfloat16) == "torch.bfloat16").
_HALF = {"torch.bfloat16": "bf16", "torch.float16": "f16"}
_I32 = "torch.int32"
_F32 = "torch.float32"
_BF16 = "torch.bfloat16"
# An FP8 cache's dtypes: FlashMLA's quantizer returns float8_e4m3fn; engines often keep bytes.
_FP8 = ("torch.float8_e4m3fn", "torch.uint8")


def dtype_name(t):
    return str(t.dtype)


def _is_tensor(t):
    return all(hasattr(t, a) for a in ("dtype", "device", "shape", "stride", "data_ptr"))


def require_tensor(name, t):
    if not _is_tensor(t):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")


def shape_of(t):
    return tuple(int(d) for d in t.shape)


def is_contiguous(t):
    """Row-major contiguity from shape and strides (strides of size-1 dims do not matter)."""
    expected = 1
    for size, stride in reversed(list(zip(shape_of(t), t.stride()))):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def device_of(t):
    """(type, index) of a tensor's device: ("cuda", 0)."""
    dev = t.device
    return (dev.type, dev.index)


def require_cuda(name, t):
    kind, index = device_of(t)
    if kind != "cuda":
        raise ValueError(f"{name}: must be on a CUDA device, is on {kind}")
    if index is None:
        raise ValueError(f"{name}: a CUDA tensor without a device index")
    return index


def require_same_device(name, t, device_index, ref="q"):
    index = require_cuda(name, t)
    if index != device_index:
        raise ValueError(f"{name}: on cuda:{index}, but {ref} is on cuda:{device_index}")


def require_dtype(name, t, want, why=""):
    got = dtype_name(t)
    if got != want:
        raise TypeError(f"{name}: dtype must be {want}{why}, got {got}")


def require_contiguous(name, t):
    if not is_contiguous(t):
        raise ValueError(
            f"{name}: must be contiguous (row-major; shape {shape_of(t)}, strides {tuple(t.stride())}); "
            f"call .contiguous() first"
        )


def is_fp8_cache(t):
    """Whether a cache tensor holds an FP8 cache (its dtype is float8_e4m3fn or uint8)."""
    return _is_tensor(t) and dtype_name(t) in _FP8


def _as_f32(x):
    """A Python float rounded to float32 (as the kernels take it): inf past float32's range."""
    try:
        return struct.unpack("<f", struct.pack("<f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def check_kv_scale(kv_scale):
    """The per-tensor FP8 cache's scale: None, or a Python number that is finite and positive
    as a float32 (it is passed to the kernel by value, as a float32). A tensor is refused: its
    value would have to be copied to the host (a synchronization, and not capturable)."""
    if kv_scale is None:
        return None
    if isinstance(kv_scale, bool) or not isinstance(kv_scale, (int, float)):
        raise TypeError(
            f"kv_scale: expected a float (the per-tensor FP8 cache's scale, a host value) or None, "
            f"got {type(kv_scale).__name__}"
        )
    s = float(kv_scale)
    f = _as_f32(s)
    if not (math.isfinite(f) and f > 0.0):
        raise ValueError(f"kv_scale: {kv_scale} must be finite and positive (as a float32, {f})")
    return s


def check_scale(softmax_scale):
    if softmax_scale is None:
        return None
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale: expected a float or None, got {type(softmax_scale).__name__}")
    s = float(softmax_scale)
    if not (math.isfinite(s) and s > 0.0):
        raise ValueError(f"softmax_scale: {softmax_scale} must be finite and positive")
    return s


def _check_common(q, k_cache, block_table, cache_seqlens, head_dim_v, causal):
    for name, t in (("q", q), ("k_cache", k_cache), ("block_table", block_table), ("cache_seqlens", cache_seqlens)):
        require_tensor(name, t)
    if isinstance(head_dim_v, bool) or not isinstance(head_dim_v, int):
        raise TypeError(f"head_dim_v: expected an int, got {type(head_dim_v).__name__}")
    if head_dim_v != D_V:
        raise ValueError(f"head_dim_v: must be {D_V} (MLA's V head dim), got {head_dim_v}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")


def check_decode_args(q, k_cache, block_table, cache_seqlens, head_dim_v=D_V, causal=True):
    """Check a decode call's inputs; return (device index, dtype name, shape), shape being
    (b, s_q, h_q, num_pages, max_pages, page_size): page_size is k_cache's page_block_size."""
    _check_common(q, k_cache, block_table, cache_seqlens, head_dim_v, causal)
    # q: [b, s_q, h_q, 576], bf16 or fp16.
    qd = dtype_name(q)
    if qd not in _HALF:
        raise TypeError(f"q: dtype must be torch.bfloat16 or torch.float16, got {qd}")
    device, b, s_q, h_q = _check_q_shape(q, causal)
    num_pages, max_pages, page_size = _check_cache_and_tables(device, qd, b, k_cache, block_table, cache_seqlens)
    shape = (b, s_q, h_q, num_pages, max_pages, page_size)
    _etap.validate_shape(*shape)  # ValueError for sizes past the kernels' 32-bit coordinates
    return device, _HALF[qd], shape


def _check_q_shape(q, causal):
    """q (dtype checked): on a CUDA device, [b, s_q, h_q, 576], contiguous; returns (device, b,
    s_q, h_q)."""
    device = require_cuda("q", q)
    qs = shape_of(q)
    if len(qs) != 4:
        raise ValueError(f"q: expected 4 dims [batch, s_q, h_q, {D_QK}], got shape {qs}")
    b, s_q, h_q, d = qs
    if d != D_QK:
        raise ValueError(f"q: head dim must be {D_QK} (512 latent + 64 RoPE), got {d}")
    if b < 1:
        raise ValueError("q: empty batch (batch must be at least 1)")
    if not 1 <= s_q <= MAX_S_Q:
        raise ValueError(f"q: s_q = {s_q} query tokens per request is not supported (1 to {MAX_S_Q})")
    if not 1 <= h_q <= MAX_HEADS:
        raise ValueError(f"q: h_q = {h_q} heads is not supported (1 to {MAX_HEADS})")
    require_contiguous("q", q)
    if s_q > 1 and not causal:
        raise NotImplementedError(
            "causal=False with s_q > 1 is not supported by etap's kernels (every query token would see "
            "the whole sequence); pass causal=True (FlashMLA's mask), or s_q = 1, where both are the same"
        )
    return device, b, s_q, h_q


def check_fp8_decode_args(q, k_cache, block_table, cache_seqlens, head_dim_v=D_V, causal=True):
    """Check a decode call's inputs over an FP8 cache (issue 14); return (device index, dtype name,
    shape, kv_format, kv_page_stride), dtype and shape as :func:`check_decode_args`'s, kv_format
    ``"fp8_656"`` or ``"fp8_per_tensor"`` (from k_cache's last dim: 656 or 576 bytes a token) and
    kv_page_stride the token rows between pages where not the format's own (else None).

    q ``[b, s_q, h_q, 576]`` bf16 or fp16 (any s_q and h_q, as for a 16-bit cache); k_cache float8_e4m3fn or uint8,
    ``[num_blocks, 64, 1, 656]`` laid out as FlashMLA's quantizer makes it (pages 65 token slots
    apart: strides ``(42640, 656, 656, 1)``, the allocation holding all ``num_blocks * 65``
    slots) or ``[num_blocks, 64, 1, 576]`` contiguous (per-tensor e4m3); or either with its
    pages another whole number of token rows apart, at least 64 (stride(0) a multiple of the
    token's bytes: a contiguous ``[num_blocks, 64, 1, 656]`` cache, as vLLM allocates FlashMLA's
    format, has them 64 apart), the allocation holding ``num_blocks`` such strides."""
    _check_common(q, k_cache, block_table, cache_seqlens, head_dim_v, causal)
    qd = dtype_name(q)
    if qd not in _HALF:
        raise TypeError(f"q: dtype must be torch.bfloat16 or torch.float16, got {qd}")
    device, b, s_q, h_q = _check_q_shape(q, causal)
    num_pages, fmt, page_stride = _check_fp8_cache(device, k_cache)
    max_pages = _check_tables(device, b, block_table, cache_seqlens)
    shape = (b, s_q, h_q, num_pages, max_pages, FP8_PAGE_SIZE)
    # ValueError for sizes past the kernels' coordinates
    _etap.validate_shape(*shape, kv_format=fmt, kv_page_stride=page_stride)
    return device, _HALF[qd], shape, fmt, page_stride


def check_fp8_packed_decode_args(q, cu_seqlens_q, max_seqlen_q, k_cache, block_table, cache_seqlens, causal=True):
    """:func:`check_packed_decode_args` over an FP8 cache (the cache as :func:`check_fp8_decode_args`
    takes it): returns (device index, dtype name, shape, total_q, kv_format, kv_page_stride)."""
    device, qd, b, s_q, h_q, total_q = _check_packed_q(q, cu_seqlens_q, max_seqlen_q, k_cache, block_table,
                                                       cache_seqlens, causal)
    num_pages, fmt, page_stride = _check_fp8_cache(device, k_cache)
    max_pages = _check_tables(device, b, block_table, cache_seqlens)
    shape = (b, s_q, h_q, num_pages, max_pages, FP8_PAGE_SIZE)
    # ValueError past the kernels' limits
    _etap.validate_shape(*shape, total_q=total_q, kv_format=fmt, kv_page_stride=page_stride)
    return device, _HALF[qd], shape, total_q, fmt, page_stride


def _strides_match(t, want):
    """t's strides are `want` on every dim of size > 1 (a size-1 dim's stride does not matter)."""
    return all(size == 1 or stride == w for size, stride, w in zip(shape_of(t), t.stride(), want))


def _check_fp8_cache(device, k_cache):
    """An FP8 cache on cuda:`device`; returns (num_pages, kv_format, kv_page_stride): the token
    rows between pages where they are not the format's own layout's (65 for FlashMLA's
    quantizer's, 64 for per-tensor e4m3), else None."""
    require_same_device("k_cache", k_cache, device)
    kd = dtype_name(k_cache)
    if kd not in _FP8:
        raise TypeError(f"k_cache: dtype must be torch.float8_e4m3fn or torch.uint8 (an FP8 cache), got {kd}")
    ks = shape_of(k_cache)
    if len(ks) != 4:
        raise ValueError(
            f"k_cache: expected 4 dims [num_blocks, 64, 1, {FP8_656_TOKEN_BYTES} or {FP8_TENSOR_TOKEN_BYTES}] "
            f"(an FP8 cache), got shape {ks}"
        )
    num_pages, page_size, h_k, token = ks
    if token == FP8_656_TOKEN_BYTES:
        fmt = "fp8_656"
    elif token == FP8_TENSOR_TOKEN_BYTES:
        fmt = "fp8_per_tensor"
    else:
        raise ValueError(
            f"k_cache: an FP8 cache has {FP8_656_TOKEN_BYTES} bytes a token (FlashMLA's FP8 format: 512 e4m3, "
            f"4 float32 scales, 64 bf16) or {FP8_TENSOR_TOKEN_BYTES} (per-tensor e4m3), got {token}"
        )
    if page_size != FP8_PAGE_SIZE:
        raise ValueError(
            f"k_cache: page_block_size = {page_size} rows is not supported with an FP8 cache "
            f"(pages of {FP8_PAGE_SIZE} rows only; shape {ks})"
        )
    if h_k != 1:
        raise ValueError(f"k_cache: num_heads_k must be 1 (MLA's one latent KV head), got {h_k}")
    if num_pages < 1:
        raise ValueError("k_cache: has no pages")
    # Tokens `token` bytes apart in a page; pages a whole number of token rows apart, at least a
    # page's 64: FlashMLA's quantizer's 656-byte layout has 65 (it allocates a slot more a page
    # and returns the first 64), a contiguous cache 64.
    own = FP8_656_PAGE_STRIDE // token if fmt == "fp8_656" else FP8_PAGE_SIZE
    # One page: its stride(0) still says how far apart the allocation lays pages, if it is one.
    page = k_cache.stride()[0]
    if num_pages == 1 and (page % token or page // token < FP8_PAGE_SIZE):
        page = FP8_PAGE_SIZE * token
    if not _strides_match(k_cache, (page, token, token, 1)) or page % token or page // token < FP8_PAGE_SIZE:
        raise ValueError(
            f"k_cache: an FP8 cache's tokens lie {token} bytes apart and its pages a whole number of token rows "
            f"apart, at least {FP8_PAGE_SIZE} (strides ({own * token}, {token}, {token}, 1) as "
            f"{'FlashMLA' if fmt == 'fp8_656' else 'etap'}'s quantizer returns it, or ({FP8_PAGE_SIZE * token}, "
            f"{token}, {token}, 1) contiguous), got {tuple(k_cache.stride())}"
        )
    rows = page // token
    # The kernels' view of the cache covers num_pages strides (etap's contract: the slots after
    # the last page's 64 tokens must be allocated too, though no row of them is read).
    storage = getattr(k_cache, "untyped_storage", None)
    if storage is not None:
        st = storage()
        end = int(st.data_ptr()) + int(st.nbytes())
        need = num_pages * page
        if k_cache.data_ptr() + need > end:
            raise ValueError(
                f"k_cache: the allocation holds {end - k_cache.data_ptr()} bytes from the cache's start, "
                f"{need} needed ({num_pages} pages of {rows} token slots of {token} bytes)"
            )
    return num_pages, fmt, (None if rows == own else rows)


def check_fp8_kv_scale(kv_format, kv_scale):
    """The scale a cache of `kv_format` takes (kv_scale already checked by check_kv_scale):
    None for FlashMLA's 656-byte format, a float for the per-tensor one."""
    if kv_format == "fp8_656" and kv_scale is not None:
        raise ValueError(
            "kv_scale: given, but k_cache is FlashMLA's FP8 format (656 bytes a token), which carries its own "
            "scales: pass kv_scale=None"
        )
    if kv_format == "fp8_per_tensor" and kv_scale is None:
        raise ValueError(
            f"kv_scale: needed: k_cache of {FP8_TENSOR_TOKEN_BYTES} bytes a token is the per-tensor e4m3 format "
            "(value = e4m3 * kv_scale)"
        )
    return kv_scale


def _check_cache_and_tables(device, qd, b, k_cache, block_table, cache_seqlens):
    """k_cache, block_table and cache_seqlens of a batch of `b` on cuda:`device`, the cache of
    dtype `qd`; returns (num_pages, max_pages, page_size)."""
    # k_cache: [num_pages, page_block_size, 1, 576], q's dtype; the page size is its dim 1.
    require_same_device("k_cache", k_cache, device)
    require_dtype("k_cache", k_cache, qd, " (the same as q)")
    ks = shape_of(k_cache)
    if len(ks) != 4:
        raise ValueError(f"k_cache: expected 4 dims [num_blocks, page_block_size, 1, {D_QK}], got shape {ks}")
    num_pages, page_size, h_k, dk = ks
    if page_size not in PAGE_SIZES:
        raise ValueError(
            f"k_cache: page_block_size = {page_size} rows is not supported "
            f"(one of {', '.join(map(str, PAGE_SIZES))}; shape {ks})"
        )
    if h_k != 1:
        raise ValueError(f"k_cache: num_heads_k must be 1 (MLA's one latent KV head), got {h_k}")
    if dk != D_QK:
        raise ValueError(f"k_cache: head dim must be {D_QK}, got {dk}")
    if num_pages < 1:
        raise ValueError("k_cache: has no pages")
    require_contiguous("k_cache", k_cache)
    return num_pages, _check_tables(device, b, block_table, cache_seqlens), page_size


def _check_tables(device, b, block_table, cache_seqlens):
    """block_table and cache_seqlens of a batch of `b` on cuda:`device`; returns max_pages."""
    # block_table: [b, max_pages] int32.
    require_same_device("block_table", block_table, device)
    require_dtype("block_table", block_table, _I32)
    bs = shape_of(block_table)
    if len(bs) != 2 or bs[0] != b:
        raise ValueError(f"block_table: expected shape [batch = {b}, max_pages], got {bs}")
    if bs[1] < 1:
        raise ValueError("block_table: max_pages must be at least 1")
    require_contiguous("block_table", block_table)

    # cache_seqlens: [b] int32.
    require_same_device("cache_seqlens", cache_seqlens, device)
    require_dtype("cache_seqlens", cache_seqlens, _I32)
    ss = shape_of(cache_seqlens)
    if ss != (b,):
        raise ValueError(f"cache_seqlens: expected shape [batch = {b}], got {ss}")
    require_contiguous("cache_seqlens", cache_seqlens)
    return bs[1]


def check_max_seqlen_q(max_seqlen_q):
    if isinstance(max_seqlen_q, bool) or not isinstance(max_seqlen_q, int):
        raise TypeError(f"max_seqlen_q: expected an int, got {type(max_seqlen_q).__name__}")
    if not 1 <= max_seqlen_q <= MAX_S_Q:
        raise ValueError(f"max_seqlen_q: {max_seqlen_q} query tokens per request is not supported (1 to {MAX_S_Q})")
    return max_seqlen_q


def check_packed_decode_args(q, cu_seqlens_q, max_seqlen_q, k_cache, block_table, cache_seqlens, causal=True):
    """Check a decode call's inputs in the packed query layout (FlashAttention's varlen names):
    q ``[total_q, h_q, 576]``, cu_seqlens_q ``int32[b + 1]`` (request r's tokens are rows
    ``cu_seqlens_q[r]..cu_seqlens_q[r + 1]`` of q), at most ``max_seqlen_q`` tokens a request.
    Returns (device index, dtype name, shape, total_q), shape being (b, max_seqlen_q, h_q,
    num_pages, max_pages, page_size). The offsets' values are device data, not read here."""
    device, qd, b, s_q, h_q, total_q = _check_packed_q(q, cu_seqlens_q, max_seqlen_q, k_cache, block_table,
                                                       cache_seqlens, causal)
    num_pages, max_pages, page_size = _check_cache_and_tables(device, qd, b, k_cache, block_table, cache_seqlens)
    shape = (b, s_q, h_q, num_pages, max_pages, page_size)
    _etap.validate_shape(*shape, total_q=total_q)  # ValueError for sizes past the kernels' limits
    return device, _HALF[qd], shape, total_q


def _check_packed_q(q, cu_seqlens_q, max_seqlen_q, k_cache, block_table, cache_seqlens, causal):
    """The packed layout's q, cu_seqlens_q, max_seqlen_q and causal (every argument a tensor
    first); returns (device, q's dtype name, b, max_seqlen_q, h_q, total_q)."""
    for name, t in (("q", q), ("cu_seqlens_q", cu_seqlens_q), ("k_cache", k_cache), ("block_table", block_table),
                    ("cache_seqlens", cache_seqlens)):
        require_tensor(name, t)
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    s_q = check_max_seqlen_q(max_seqlen_q)

    # q: [total_q, h_q, 576], bf16 or fp16.
    qd = dtype_name(q)
    if qd not in _HALF:
        raise TypeError(f"q: dtype must be torch.bfloat16 or torch.float16, got {qd}")
    device = require_cuda("q", q)
    qs = shape_of(q)
    if len(qs) != 3:
        raise ValueError(
            f"q: expected 3 dims [total_q, h_q, {D_QK}] with cu_seqlens_q (the packed layout), got shape {qs}"
        )
    total_q, h_q, d = qs
    if d != D_QK:
        raise ValueError(f"q: head dim must be {D_QK} (512 latent + 64 RoPE), got {d}")
    if total_q < 1:
        raise ValueError("q: no query tokens (total_q = 0)")
    if not 1 <= h_q <= MAX_HEADS:
        raise ValueError(f"q: h_q = {h_q} heads is not supported (1 to {MAX_HEADS})")
    require_contiguous("q", q)

    # cu_seqlens_q: [b + 1] int32 on q's device; the batch is its length less one.
    require_same_device("cu_seqlens_q", cu_seqlens_q, device)
    require_dtype("cu_seqlens_q", cu_seqlens_q, _I32)
    cs = shape_of(cu_seqlens_q)
    if len(cs) != 1 or cs[0] < 2:
        raise ValueError(f"cu_seqlens_q: expected shape [batch + 1] with batch >= 1, got {list(cs)}")
    require_contiguous("cu_seqlens_q", cu_seqlens_q)
    b = cs[0] - 1
    if total_q > b * s_q:
        raise ValueError(
            f"q: total_q = {total_q} query tokens do not fit {b} requests (cu_seqlens_q has {b + 1} entries) "
            f"of at most max_seqlen_q = {s_q} tokens"
        )
    if s_q > 1 and not causal:
        raise NotImplementedError(
            "causal=False with max_seqlen_q > 1 is not supported by etap's kernels (every query token would see "
            "the whole sequence); pass causal=True, or max_seqlen_q = 1, where both are the same"
        )
    return device, qd, b, s_q, h_q, total_q


def _span(t):
    """[start, end) bytes a tensor of non-negative strides covers (a contiguous one: its
    elements; FlashMLA's FP8 cache: from its first page's start to its last page's 64th token)."""
    shape = shape_of(t)
    start = t.data_ptr()
    if any(d == 0 for d in shape):
        return start, start
    last = sum((d - 1) * s for d, s in zip(shape, t.stride()))
    return start, start + (last + 1) * int(t.element_size())


def output_shapes(shape, total_q=None):
    """(out, lse) shapes: [b, s_q, h_q, 512] and [b, h_q, s_q], or in the packed query layout
    (total_q given) [total_q, h_q, 512] and [total_q, h_q]."""
    b, s_q, h_q = shape[:3]
    if total_q is None:
        return (b, s_q, h_q, D_V), (b, h_q, s_q)
    return (total_q, h_q, D_V), (total_q, h_q)


def check_outputs(out, lse, q, shape, inputs, total_q=None):
    """Check caller-given out [b, s_q, h_q, 512] (q's dtype) and lse [b, h_q, s_q] float32 (in
    the packed query layout, total_q given: out [total_q, h_q, 512], lse [total_q, h_q])."""
    out_shape, lse_shape = output_shapes(shape, total_q)
    device = device_of(q)[1]
    for name, t, want_shape, want_dtype in (
        ("out", out, out_shape, dtype_name(q)),
        ("lse", lse, lse_shape, _F32),
    ):
        require_tensor(name, t)
        require_same_device(name, t, device)
        require_dtype(name, t, want_dtype, " (q's dtype)" if name == "out" else "")
        if shape_of(t) != want_shape:
            raise ValueError(f"{name}: expected shape {list(want_shape)}, got {list(shape_of(t))}")
        require_contiguous(name, t)
    spans = {name: _span(t) for name, t in inputs}
    for name, t in (("out", out), ("lse", lse)):
        a0, a1 = _span(t)
        for other, (b0, b1) in spans.items():
            if a0 < b1 and b0 < a1:
                raise ValueError(f"{name}: overlaps {other} in memory")
    o0, o1 = _span(out)
    l0, l1 = _span(lse)
    if o0 < l1 and l0 < o1:
        raise ValueError("lse: overlaps out in memory")


def check_addresses(q, k_cache, block_table, cache_seqlens, out, lse, cu_seqlens_q=None):
    addrs = [q.data_ptr(), k_cache.data_ptr(), block_table.data_ptr(), cache_seqlens.data_ptr(), out.data_ptr(),
             lse.data_ptr()]
    if cu_seqlens_q is None:
        _etap.check_addresses(*addrs)
    else:
        _etap.check_addresses(*addrs, cu_seqlens_q=cu_seqlens_q.data_ptr())

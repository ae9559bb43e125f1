"""FP8 KV caches (issue 14) in torch: quantizers and dequantizers of the two formats etap reads.

- **FlashMLA's "FP8 with scale"** (656 bytes a token): the 512 latent values as
  ``float8_e4m3fn``, then 4 float32 scales (one per 128 values: the power of two at or above
  ``amax / 448``, at least ``2^ceil(log2(1e-4))``), then the 64 RoPE values in bf16, unquantized.
  Pages of ``page_block_size`` tokens are laid out ``page_block_size + 1`` token slots apart, as
  FlashMLA's quantizer (its ``tests/quant.py``, ``quantize_k_cache`` with the V32 layout)
  allocates them: the cache is ``[num_blocks, page_block_size, 1, 656]`` with strides
  ``((page_block_size + 1) * 656, 656, 656, 1)``. etap decodes pages of 64 tokens.
- **Per-tensor e4m3** (vLLM's fp8 MLA cache): ``[num_blocks, page_block_size, 1, 576]``
  ``float8_e4m3fn``, one float32 scale for the whole cache; value = e4m3 * scale.

The quantizers are etap's own (``etap::fp8`` in Rust, the library's reference and the kernel's
tests) bit for bit, on any device and torch version, for every finite input: each f32 quotient
is a true division (never a multiplication by a reciprocal), each scale an exact power of two,
the conversion to e4m3 round to nearest even (PyTorch's cast) within +-464 and NaN (keeping the
value's sign) beyond it and for NaN. (PyTorch's own cast made those NaN too before it saturated
to +-448; the 656 format's scales keep every value within 448, so only a per-tensor scale below
``amax / 448`` reaches them.) On a tile without NaN, :func:`quantize_fp8_656` is byte for byte
FlashMLA's quantizer; on a tile holding a NaN, FlashMLA's scale is NaN (and every value of the
tile NaN), etap's is the scale of the tile's other values (and only the NaN stays NaN): the
dequantized NaN rows of a cache (past each request's length, as test caches poison them) are NaN
in both. A cache holding +-inf gets an infinite scale (NaN and zeros: no use). Dequantized value
= e4m3 * scale in float32, rounded once to bf16 (exact for the 656 format's powers of two), as
the kernel does.

``etap._etap`` has the Rust quantizers themselves on bytes (``quantize_fp8_656``,
``quantize_e4m3_per_tensor``, ...), for cross-checks without torch.
"""

import math
import struct

from . import _checks

__all__ = [
    "E4M3_MAX",
    "FP8_656_TILE",
    "quantize_fp8_656",
    "dequantize_fp8_656",
    "per_tensor_scale",
    "quantize_e4m3_per_tensor",
    "dequantize_e4m3_per_tensor",
    "dequantize_e4m3_per_tensor_f64",
]

E4M3_MAX = 448.0  # float8_e4m3fn's largest finite value
FP8_656_TILE = 128  # values per scale of the 656-byte format
_NOPE = _checks.D_V  # 512 quantized latent values
_ROPE = _checks.D_QK - _checks.D_V  # 64 bf16 RoPE values
_TILES = _NOPE // FP8_656_TILE  # 4 scales a token
_TOKEN = _checks.FP8_656_TOKEN_BYTES  # 656
_MIN_SCALE_INV = 1e-4  # amax / 448 is raised to this before rounding up (FlashMLA's margin)


def _torch():
    import torch

    return torch


def _require_bf16_cache(name, k_cache, torch):
    if not isinstance(k_cache, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(k_cache).__name__}")
    if k_cache.dtype != torch.bfloat16:
        raise TypeError(f"{name}: dtype must be torch.bfloat16 (the cache to quantize), got {k_cache.dtype}")


def _fp8_bytes(name, k_cache, torch):
    """An FP8 cache's bytes (uint8, the same shape and strides)."""
    if not isinstance(k_cache, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(k_cache).__name__}")
    if k_cache.dtype == torch.uint8:
        return k_cache
    if str(k_cache.dtype) == "torch.float8_e4m3fn":
        return k_cache.view(torch.uint8)
    raise TypeError(f"{name}: dtype must be torch.float8_e4m3fn or torch.uint8 (an FP8 cache), got {k_cache.dtype}")


def _f32(x):
    """A Python float rounded to float32 (its value, as a Python float)."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


_E4M3_LIMIT = 464.0  # the midpoint from 448 to 480 (which e4m3fn lacks): above it, NaN


def _e4m3_bytes(y, negative, torch):
    """The e4m3 bytes of float32 `y` (uint8, y's shape): round to nearest even (PyTorch's cast)
    within +-464, NaN (0x7F, with 0x80 where `negative`) above 464 in magnitude and for NaN, as
    etap's conversion, whatever the torch version's cast does out of range (NaN before, +-448
    since it saturates). `negative`: the sign bits of the quantized values (the quotients'
    signs, but kept for NaN inputs on every device)."""
    cast = y.to(torch.float8_e4m3fn).view(torch.uint8)
    nan = torch.where(negative, torch.tensor(0xFF, dtype=torch.uint8, device=y.device),
                      torch.tensor(0x7F, dtype=torch.uint8, device=y.device))
    return torch.where(torch.isnan(y) | (y.abs() > _E4M3_LIMIT), nan, cast)


def _pow2_at_or_above(v, torch):
    """The power of two at or above each positive float32 of `v` (+inf for +inf), exactly: the
    bits rounded up to a zero mantissa. For the quotients amax / 448 of bf16 amaxes (never
    within a few ulps above a power of two) this is ``2^ceil(log2(v))`` as etap's and FlashMLA's
    quantizers compute it with log2."""
    bits = v.contiguous().view(torch.int32)
    return ((bits + 0x7FFFFF) & -0x800000).view(torch.float32)


def quantize_fp8_656(k_cache):
    """Quantize a bf16 cache ``[num_blocks, page_block_size, 1, 576]`` to FlashMLA's 656-byte
    format: returns ``[num_blocks, page_block_size, 1, 656]`` float8_e4m3fn, a view of a
    zero-filled ``[num_blocks, page_block_size + 1, 656]`` allocation (pages 65 token slots
    apart for etap's pages of 64), on k_cache's device, as FlashMLA's quantizer returns it.
    Per token: ``e4m3(x / scale)`` for the 512 latent values (float32 division), the 4 scales
    (float32 powers of two: at or above ``max(amax / 448, 1e-4)``, NaN ignored in amax), the 64
    RoPE values' bf16 bits."""
    torch = _torch()
    _require_bf16_cache("k_cache", k_cache, torch)
    if k_cache.dim() != 4 or k_cache.shape[2] != 1 or k_cache.shape[3] != _checks.D_QK:
        raise ValueError(
            f"k_cache: expected [num_blocks, page_block_size, 1, {_checks.D_QK}], got {list(k_cache.shape)}"
        )
    nb, bs = int(k_cache.shape[0]), int(k_cache.shape[1])
    x = k_cache.reshape(nb, bs, _checks.D_QK)
    nope = x[..., :_NOPE].float().reshape(nb, bs, _TILES, FP8_656_TILE)
    mag = nope.abs()
    amax = torch.where(torch.isnan(mag), torch.zeros_like(mag), mag).amax(dim=-1)  # [nb, bs, 4]
    # A true division (a divisor tensor on the device: never a multiplication by 1/448).
    v = amax / torch.full((), E4M3_MAX, dtype=torch.float32, device=amax.device)
    scale = _pow2_at_or_above(torch.clamp_min(v, _f32(_MIN_SCALE_INV)), torch)
    q = _e4m3_bytes(nope / scale.unsqueeze(-1), torch.signbit(nope), torch).reshape(nb, bs, _NOPE)
    out = torch.zeros((nb, bs + 1, _TOKEN), dtype=torch.uint8, device=k_cache.device)
    tokens = out[:, :bs]
    tokens[..., :_NOPE] = q
    tokens[..., _NOPE : _NOPE + 4 * _TILES] = scale.contiguous().view(torch.uint8).reshape(nb, bs, 4 * _TILES)
    tokens[..., _NOPE + 4 * _TILES :] = x[..., _NOPE:].contiguous().view(torch.uint8)
    return tokens.view(torch.float8_e4m3fn).unsqueeze(2)


def dequantize_fp8_656(k_cache):
    """The bf16 cache ``[num_blocks, page_block_size, 1, 576]`` a 656-byte-format cache
    (``[num_blocks, page_block_size, 1, 656]`` float8_e4m3fn or uint8, any strides) stands for:
    e4m3 * scale (float32, then bf16: exact) for the latent part, the RoPE part as stored."""
    torch = _torch()
    raw = _fp8_bytes("k_cache", k_cache, torch)
    if raw.dim() != 4 or raw.shape[2] != 1 or raw.shape[3] != _TOKEN:
        raise ValueError(f"k_cache: expected [num_blocks, page_block_size, 1, {_TOKEN}], got {list(raw.shape)}")
    nb, bs = int(raw.shape[0]), int(raw.shape[1])
    tok = raw.reshape(nb, bs, _TOKEN)
    nope = tok[..., :_NOPE].contiguous().view(torch.float8_e4m3fn).float().reshape(nb, bs, _TILES, FP8_656_TILE)
    scale = tok[..., _NOPE : _NOPE + 4 * _TILES].contiguous().view(torch.float32)  # [nb, bs, 4]
    rope = tok[..., _NOPE + 4 * _TILES :].contiguous().view(torch.bfloat16)  # [nb, bs, 64]
    out = torch.empty((nb, bs, _checks.D_QK), dtype=torch.bfloat16, device=raw.device)
    out[..., :_NOPE] = (nope * scale.unsqueeze(-1)).reshape(nb, bs, _NOPE)
    out[..., _NOPE:] = rope
    return out.unsqueeze(2)


def per_tensor_scale(k_cache):
    """The per-tensor scale that maps a bf16 cache's largest magnitude (NaN ignored) to e4m3's
    largest: ``amax / 448`` in float32 (1.0 for an all-zero cache), as a Python float. Reads the
    cache's maximum back to the host (a synchronization)."""
    torch = _torch()
    _require_bf16_cache("k_cache", k_cache, torch)
    mag = k_cache.float().abs()
    amax = float(torch.where(torch.isnan(mag), torch.zeros_like(mag), mag).max()) if k_cache.numel() else 0.0
    if amax == 0.0:
        return 1.0
    # float32 division: the float64 quotient of two float32s, rounded once to float32, is the
    # float32 quotient (53 >= 2 * 24 + 2 bits).
    return _f32(amax / E4M3_MAX)


def _check_scale(scale):
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a float, got {type(scale).__name__}")
    try:
        s = _f32(float(scale))
    except OverflowError:
        s = math.inf
    if not (math.isfinite(s) and s > 0.0):
        raise ValueError(f"scale: {scale} must be finite and positive (as a float32)")
    return s


def quantize_e4m3_per_tensor(k_cache, scale):
    """Quantize a bf16 cache (any shape; FlashMLA-style ``[num_blocks, 64, 1, 576]`` for etap)
    to per-tensor e4m3: ``e4m3(x / scale)`` (float32 division; NaN beyond 464 * scale),
    float8_e4m3fn of the same shape, contiguous, on its device. `scale`: a float, finite and positive as a float32 (e.g.
    :func:`per_tensor_scale`)."""
    torch = _torch()
    _require_bf16_cache("k_cache", k_cache, torch)
    s = _check_scale(scale)
    # A true division: the divisor a tensor on the device (a Python scalar divisor is a
    # multiplication by its reciprocal on CUDA).
    d = torch.full((), s, dtype=torch.float32, device=k_cache.device)
    x = k_cache.float()
    return _e4m3_bytes(x / d, torch.signbit(x), torch).contiguous().view(torch.float8_e4m3fn)


def dequantize_e4m3_per_tensor_f64(k_cache, scale):
    """A per-tensor e4m3 cache's values, exactly: e4m3 * scale in float64 (the product of an
    e4m3 value and a float32 is exact there; as bf16 it is rarely). The reference's cache."""
    torch = _torch()
    raw = _fp8_bytes("k_cache", k_cache, torch)
    return raw.view(torch.float8_e4m3fn).double() * _check_scale(scale)


def dequantize_e4m3_per_tensor(k_cache, scale):
    """The bf16 cache a per-tensor e4m3 cache (float8_e4m3fn or uint8, any shape) stands for:
    e4m3 * scale in float32, rounded once to bf16."""
    torch = _torch()
    raw = _fp8_bytes("k_cache", k_cache, torch)
    s = _check_scale(scale)
    return (raw.view(torch.float8_e4m3fn).float() * s).to(torch.bfloat16)

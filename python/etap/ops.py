"""etap as torch custom ops, so torch.compile sees it (one opaque node, with a fake
implementation for shape propagation): ``torch.ops.etap.mla_decode`` (16-bit caches) and
``torch.ops.etap.mla_decode_fp8`` (FP8 caches).

    import etap.ops
    out, lse = torch.ops.etap.mla_decode(q, k_cache, block_table, cache_seqlens, None, True, True)
    out, lse = torch.ops.etap.mla_decode_fp8(q, k8, block_table, cache_seqlens, None, True, True, kv_scale)

Arguments: q, k_cache, block_table, cache_seqlens as in ``flash_mla_with_kvcache``;
softmax_scale (float or None); causal (bool); fmla_lse (True: lse +inf for a (token, head) that
saw no row, FlashMLA's; False: -inf). ``mla_decode_fp8`` takes an FP8 cache (FlashMLA's
``[num_blocks, 64, 1, 656]`` or per-tensor e4m3 ``[num_blocks, 64, 1, 576]``, as
``flash_mla_with_kvcache(..., is_fp8_kvcache=True)`` does) and ``kv_scale``: the per-tensor
format's scale (a float), None for FlashMLA's format. No metadata crosses the op boundary, so
each call re-plans for its seqlens (one small scheduler launch more per call than the
FlashMLA-style call, which plans once per step). Needs torch >= 2.4 (torch.library.custom_op).
"""

from typing import Optional, Tuple

import torch

from . import _checks
from .interface import flash_mla_with_kvcache, get_mla_metadata


@torch.library.custom_op("etap::mla_decode", mutates_args=())
def mla_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    softmax_scale: Optional[float],
    causal: bool,
    fmla_lse: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    return _decode(q, k_cache, block_table, cache_seqlens, softmax_scale, causal, fmla_lse)


def _decode(q, k_cache, block_table, cache_seqlens, softmax_scale, causal, fmla_lse, fp8=False, kv_scale=None):
    """Both ops' body: FlashMLA's call, planned for this call's seqlens (no metadata crosses an
    op boundary)."""
    meta, _ = get_mla_metadata(is_fp8_kvcache=fp8)
    return flash_mla_with_kvcache(
        q, k_cache, block_table, cache_seqlens, _checks.D_V, meta, None, softmax_scale, causal, fp8,
        kv_scale=kv_scale, empty_lse="+inf" if fmla_lse else "-inf",
    )


def _fake_outputs(q):
    """What both ops return, for a q [b, s_q, h_q, 576]: out [b, s_q, h_q, 512] of q's dtype and
    lse float32 [b, h_q, s_q] (the fake implementations' outputs, for torch.compile)."""
    b, s_q, h_q, _ = q.shape
    return q.new_empty((b, s_q, h_q, _checks.D_V)), q.new_empty((b, h_q, s_q), dtype=torch.float32)


@mla_decode.register_fake
def _(q, k_cache, block_table, cache_seqlens, softmax_scale, causal, fmla_lse):
    return _fake_outputs(q)


@torch.library.custom_op("etap::mla_decode_fp8", mutates_args=())
def mla_decode_fp8(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    softmax_scale: Optional[float],
    causal: bool,
    fmla_lse: bool,
    kv_scale: Optional[float],
) -> Tuple[torch.Tensor, torch.Tensor]:
    return _decode(q, k_cache, block_table, cache_seqlens, softmax_scale, causal, fmla_lse, True, kv_scale)


@mla_decode_fp8.register_fake
def _(q, k_cache, block_table, cache_seqlens, softmax_scale, causal, fmla_lse, kv_scale):
    return _fake_outputs(q)

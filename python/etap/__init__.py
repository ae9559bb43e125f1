"""etap: ETAP MLA decode for NVIDIA Hopper, FlashMLA-compatible, for PyTorch serving engines.

    import etap
    meta, num_splits = etap.get_mla_metadata(cache_seqlens, s_q * h_q, 1)
    out, lse = etap.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, 512,
                                           meta, num_splits, causal=True)

q is ``[b, s_q, h_q, 576]`` with s_q 1 to ``MAX_S_Q`` (8) and h_q 1 to ``MAX_HEADS`` (128);
k_cache is ``[num_blocks, page_block_size, 1, 576]`` with page_block_size one of ``PAGE_SIZES``
(16, 32, 64, 128), read from its shape. Tensors are read through their attributes and torch's
current stream is used, so one wheel works with any torch version; torch is imported only when a
GPU call needs it.

etap's own call also takes the packed query layout (FlashAttention's varlen names), each request
its own number of query tokens:

    plan = etap.plan(q, k_cache, block_table, cache_seqlens, cu_seqlens_q=cu, max_seqlen_q=n)
    out, lse = etap.decode(plan, q, k_cache, block_table, cache_seqlens, cu_seqlens_q=cu, max_seqlen_q=n)

with q ``[total_q, h_q, 576]``, cu ``int32[b + 1]`` (request r's tokens are rows
``cu[r]..cu[r + 1]``), n 1 to 8; out ``[total_q, h_q, 512]``, lse ``float32[total_q, h_q]``.

FP8 caches (bf16 or fp16 q and out, s_q and h_q as above, pages of 64 rows, the uniform layout), made by
:mod:`etap.quant`:

    k8 = etap.quant.quantize_fp8_656(k_cache)          # FlashMLA's [num_blocks, 64, 1, 656]
    out, lse = etap.flash_mla_with_kvcache(q, k8, block_table, cache_seqlens, 512, meta, None,
                                           causal=True, is_fp8_kvcache=True)
    s = etap.quant.per_tensor_scale(k_cache)
    ke = etap.quant.quantize_e4m3_per_tensor(k_cache, s)  # per-tensor e4m3 [num_blocks, 64, 1, 576]
    out, lse = etap.flash_mla_with_kvcache(q, ke, block_table, cache_seqlens, 512, meta, None,
                                           causal=True, is_fp8_kvcache=True, kv_scale=s)

(etap.plan / etap.decode take them too: the format is read from the cache, ``kv_scale=`` given
to decode.)
"""

from . import _etap, quant
from ._checks import D_QK, D_V, DEFAULT_PAGE_SIZE, FP8_PAGE_SIZE, MAX_HEADS, MAX_S_Q, PAGE_SIZES
from .interface import EtapMetadata, Plan, decode, decoder, flash_mla_with_kvcache, get_mla_metadata, plan
from .merge import merge_states

__version__ = _etap.__version__

__all__ = [
    "D_QK",
    "D_V",
    "DEFAULT_PAGE_SIZE",
    "FP8_PAGE_SIZE",
    "MAX_HEADS",
    "MAX_S_Q",
    "PAGE_SIZES",
    "EtapMetadata",
    "Plan",
    "decode",
    "decoder",
    "flash_mla_with_kvcache",
    "get_mla_metadata",
    "merge_states",
    "plan",
    "quant",
]

"""Merging partial attention states: decode context parallelism.

When each request's KV is split over ranks (or over any disjoint parts), each part gives a
partial ``(out_i, lse_i)``: the attention over its rows only, lse the natural log of its softmax
denominator. The full result is the lse-weighted mean:

    lse = log(sum_i exp(lse_i)),    out = sum_i exp(lse_i - lse) * out_i

A part that saw no row has lse_i = -inf (decode with ``empty_lse="-inf"``) and weight 0; if no
part saw a row, out = 0 and lse = -inf (or +inf with ``empty_lse="+inf"``, FlashMLA's). Torch
ops only, no host synchronization: capturable in a CUDA graph and seen by torch.compile.
"""


def merge_states(outs, lses, empty_lse="-inf"):
    """Merge partial states of the same queries over disjoint KV parts.

    outs: a sequence of ``[b, s_q, h_q, d_v]`` tensors (or one tensor stacked on dim 0);
    lses: the matching ``float32[b, h_q, s_q]`` (or stacked), -inf where a part saw no row
    (+inf, FlashMLA's value for that case, is read as -inf too).
    Returns ``(out, lse)``: out in the dtype of ``outs``, lse float32.
    """
    import torch

    if empty_lse not in ("+inf", "-inf"):
        raise ValueError(f"empty_lse: must be '+inf' or '-inf', got {empty_lse!r}")
    out_parts = torch.stack(list(outs)) if isinstance(outs, (list, tuple)) else outs
    lse_parts = torch.stack(list(lses)) if isinstance(lses, (list, tuple)) else lses
    if out_parts.dim() != 5:
        raise ValueError(f"outs: expected parts of [b, s_q, h_q, d_v], got stacked shape {list(out_parts.shape)}")
    n, b, s_q, h_q, _ = out_parts.shape
    if tuple(lse_parts.shape) != (n, b, h_q, s_q):
        raise ValueError(f"lses: expected {n} parts of [b, h_q, s_q] = {[b, h_q, s_q]}, got stacked shape {list(lse_parts.shape)}")
    if lse_parts.dtype != torch.float32:
        raise TypeError(f"lses: dtype must be torch.float32, got {lse_parts.dtype}")
    if lse_parts.device != out_parts.device:
        raise ValueError(f"lses: on {lse_parts.device}, but outs are on {out_parts.device}")
    # +inf (FlashMLA's empty lse) means empty too.
    lse_parts = torch.where(torch.isposinf(lse_parts), torch.full_like(lse_parts, float("-inf")), lse_parts)
    lse = torch.logsumexp(lse_parts, dim=0)  # [b, h_q, s_q]; -inf when every part is empty
    safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    w = torch.exp(lse_parts - safe.unsqueeze(0))  # [n, b, h_q, s_q]; 0 for empty parts
    w = w.permute(0, 1, 3, 2).unsqueeze(-1)  # [n, b, s_q, h_q, 1]
    out = (w * out_parts.float()).sum(dim=0).to(out_parts.dtype)
    if empty_lse == "+inf":
        lse = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)
    return out, lse

"""A torch reference of MLA decode (float64), and FlashMLA-style test inputs, for validating
etap in a deployment and for the package's own GPU tests; both also in the packed query
layout (:func:`make_packed_inputs`, :func:`mla_decode_packed_reference`), and over FP8 caches
(:func:`mla_decode_fp8_reference`, :func:`mla_decode_fp8_packed_reference`: the references over
the dequantized cache)."""

import math
import random


def make_inputs(b, s_q, h_q, s_k, varlen=False, dtype=None, device="cuda", seed=0, zero_lens=False, num_extra_pages=3,
                page_size=64, lens=None):
    """FlashMLA's test data: q and a shuffled paged cache (values in [-1, 1] / 10-ish) of pages of
    `page_size` rows (k_cache ``[num_pages, page_size, 1, 576]``), NaN in every cache row past
    each request's length, and block-table slots past the used pages set to 2147480000 (never
    read); each block table holds the longest request's length rounded up to 256 rows. `lens`,
    if given, are the requests' lengths (b of them), in place of `s_k`, `varlen` and `zero_lens`.
    Returns (q, k_cache, block_table, cache_seqlens)."""
    import torch

    dtype = dtype or torch.bfloat16
    if page_size not in (16, 32, 64, 128):
        raise ValueError(f"page_size: {page_size} rows is not one etap takes (16, 32, 64 or 128)")
    rng = random.Random(seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    if lens is not None:
        lens = [int(n) for n in lens]
        if len(lens) != b or min(lens) < 0:
            raise ValueError(f"lens: expected {b} lengths >= 0, got {lens}")
    else:
        lens = [s_k] * b
        if varlen:
            lens = [max(int(rng.normalvariate(s_k, s_k / 2)), s_q) for _ in range(b)]
        if zero_lens:
            lens = [0 if rng.random() < 0.5 else n for n in lens]
    max_len = max(max(lens), 1)
    max_pages = (max_len + 255) // 256 * (256 // page_size)
    num_pages = b * max_pages + num_extra_pages
    perm = torch.randperm(num_pages, generator=gen, device=device)[: b * max_pages].view(b, max_pages).to(torch.int32)
    q = (torch.randn(b, s_q, h_q, 576, generator=gen, device=device) / 10).clamp_(-1, 1).to(dtype)
    k = (torch.randn(num_pages, page_size, 1, 576, generator=gen, device=device) / 10).clamp_(-1, 1).to(dtype)
    bt = perm.clone()
    perm_cpu = perm.cpu()
    for i, n in enumerate(lens):
        used = (n + page_size - 1) // page_size
        k[perm_cpu[i, used:].long().to(device)] = float("nan")
        if n % page_size:
            k[int(perm_cpu[i, used - 1]), n % page_size :] = float("nan")
        bt[i, used:] = 2147480000
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    return q, k, bt, seqlens


def mla_decode_reference(q, k_cache, block_table, cache_seqlens, softmax_scale=None, causal=True, empty_lse="+inf"):
    """MLA decode in float64 with FlashMLA's semantics: out [b, s_q, h_q, 512] (float64), lse
    [b, h_q, s_q] (float64, natural log); a (token, head) that sees no row gets out 0 and lse
    +inf (FlashMLA) or -inf. causal: token t sees rows < seqlen - s_q + t + 1. The page size is
    k_cache's dim 1 ([num_pages, page_size, 1, 576]); block-table entries index its pages."""
    import torch

    b, s_q, h_q, d = q.shape
    page_size = k_cache.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    lens = [int(x) for x in cache_seqlens.cpu()]
    out = torch.zeros(b, s_q, h_q, 512, dtype=torch.float64, device=q.device)
    lse = torch.empty(b, h_q, s_q, dtype=torch.float64, device=q.device)
    for i in range(b):
        n = lens[i]
        pages = block_table[i, : (n + page_size - 1) // page_size].long()
        kv = k_cache[pages].reshape(-1, d)[:n].double()  # [n, 576]
        qi = q[i].double().reshape(s_q * h_q, d)  # rows (t, h)
        s = (qi @ kv.T) * scale  # [s_q*h_q, n]
        if causal:
            t = torch.arange(s_q, device=q.device).repeat_interleave(h_q)  # token of each row
            rows = torch.arange(n, device=q.device)
            visible = rows[None, :] < (n - s_q + t + 1)[:, None]
            s = s.masked_fill(~visible, float("-inf"))
        m = torch.logsumexp(s, dim=-1) if n > 0 else torch.full((s_q * h_q,), float("-inf"), dtype=torch.float64, device=q.device)
        p = torch.exp(s - torch.where(torch.isinf(m), torch.zeros_like(m), m)[:, None]) if n > 0 else s
        o = p @ kv[:, :512] if n > 0 else torch.zeros(s_q * h_q, 512, dtype=torch.float64, device=q.device)
        empty = torch.isneginf(m)
        o[empty] = 0.0
        out[i] = o.view(s_q, h_q, 512)
        m = m.clone()
        if empty_lse == "+inf":
            m[empty] = float("inf")
        lse[i] = m.view(s_q, h_q).T
    return out, lse


def dequantize_cache(k_cache, kv_scale=None, *, exact=False):
    """The bf16 cache ``[num_blocks, 64, 1, 576]`` an FP8 cache stands for (:mod:`etap.quant`):
    FlashMLA's 656-byte format (k_cache's last dim 656; ``kv_scale`` None) or per-tensor e4m3
    (576; ``kv_scale`` its scale). With ``exact``, the per-tensor values are float64 instead
    (e4m3 * scale is rarely a bf16; the 656 format's power-of-two scales keep bf16 exact)."""
    from . import quant

    last = k_cache.shape[-1]
    if last == 656:
        if kv_scale is not None:
            raise ValueError("kv_scale: given, but k_cache is FlashMLA's 656-byte format, which carries its scales")
        return quant.dequantize_fp8_656(k_cache)
    if last == 576:
        if kv_scale is None:
            raise ValueError("kv_scale: needed for a per-tensor e4m3 cache (576 bytes a token)")
        if exact:
            return quant.dequantize_e4m3_per_tensor_f64(k_cache, kv_scale)
        return quant.dequantize_e4m3_per_tensor(k_cache, kv_scale)
    raise ValueError(f"k_cache: an FP8 cache has 656 or 576 bytes a token, got {last}")


def mla_decode_fp8_reference(q, k_cache, block_table, cache_seqlens, kv_scale=None, softmax_scale=None, causal=True,
                             empty_lse="+inf"):
    """:func:`mla_decode_reference` over an FP8 cache, dequantized exactly: FlashMLA's format to
    bf16 (e4m3 * a power-of-two scale is exact; :func:`dequantize_cache`), per-tensor e4m3 to
    float64 (e4m3 * scale, rarely a bf16), then the float64 reference. Returns out
    [b, s_q, h_q, 512] and lse [b, h_q, s_q] (float64)."""
    cache = dequantize_cache(k_cache, kv_scale, exact=True)
    return mla_decode_reference(q, cache, block_table, cache_seqlens,
                                softmax_scale=softmax_scale, causal=causal, empty_lse=empty_lse)


def mla_decode_fp8_packed_reference(q, cu_seqlens_q, k_cache, block_table, cache_seqlens, kv_scale=None,
                                    max_seqlen_q=None, softmax_scale=None, causal=True, empty_lse="+inf"):
    """:func:`mla_decode_packed_reference` over an FP8 cache dequantized exactly, as in
    :func:`mla_decode_fp8_reference`. Returns out ``[total_q, h_q, 512]`` and lse ``[total_q,
    h_q]`` (float64)."""
    cache = dequantize_cache(k_cache, kv_scale, exact=True)
    return mla_decode_packed_reference(q, cu_seqlens_q, cache, block_table, cache_seqlens, max_seqlen_q,
                                       softmax_scale=softmax_scale, causal=causal, empty_lse=empty_lse)


def make_packed_inputs(counts, h_q, s_k=0, max_seqlen_q=None, **kw):
    """Test data in the packed query layout: request r has ``counts[r]`` query tokens (0 to
    ``max_seqlen_q``, which defaults to the largest count). :func:`make_inputs` makes a uniform
    batch of ``max_seqlen_q`` tokens a request (``kw``: its arguments, ``lens``, ``page_size``,
    ``dtype``, ``seed``, ...); request r's tokens are the last ``counts[r]`` of its row there, so
    each token's causal bound is the uniform case's. Returns (q ``[total_q, h_q, 576]``,
    cu_seqlens_q ``int32[b + 1]``, k_cache, block_table, cache_seqlens)."""
    import torch

    counts = [int(n) for n in counts]
    s_q = max(counts) if max_seqlen_q is None else int(max_seqlen_q)
    if not counts or min(counts) < 0 or max(counts) > s_q or s_q < 1:
        raise ValueError(f"counts: expected 0 to max_seqlen_q = {s_q} tokens for each request, got {counts}")
    q, k, bt, sl = make_inputs(len(counts), s_q, h_q, s_k, **kw)
    q_packed = torch.cat([q[r, s_q - n :] for r, n in enumerate(counts)]).contiguous()
    offsets = [0]
    for n in counts:
        offsets.append(offsets[-1] + n)
    cu_seqlens_q = torch.tensor(offsets, dtype=torch.int32, device=q.device)
    return q_packed, cu_seqlens_q, k, bt, sl


def mla_decode_packed_reference(q, cu_seqlens_q, k_cache, block_table, cache_seqlens, max_seqlen_q=None,
                                softmax_scale=None, causal=True, empty_lse="+inf"):
    """:func:`mla_decode_reference` in the packed query layout: q ``[total_q, h_q, 576]``,
    request r's tokens are rows ``cu_seqlens_q[r]..cu_seqlens_q[r + 1]``, each request the
    uniform reference of its own token count n (token i sees rows < seqlen - n + i + 1 with
    ``causal``). Returns out ``[total_q, h_q, 512]`` and lse ``[total_q, h_q]`` (float64; lse
    token-major, the uniform reference's ``[h_q, n]`` transposed). Checks the offsets (they
    start at 0, never decrease, end at total_q, and, with ``max_seqlen_q``, give no request
    more than that), raising ValueError naming cu_seqlens_q."""
    import torch

    total_q, h_q, _ = q.shape
    offsets = [int(x) for x in cu_seqlens_q.cpu()]
    b = len(offsets) - 1
    if b < 1 or b != block_table.shape[0] or b != cache_seqlens.shape[0]:
        raise ValueError(f"cu_seqlens_q: {len(offsets)} offsets for a batch of {block_table.shape[0]} (b + 1 needed)")
    if offsets[0] != 0 or offsets[-1] != total_q:
        raise ValueError(f"cu_seqlens_q: must start at 0 and end at total_q = {total_q}, got {offsets}")
    for r in range(b):
        n = offsets[r + 1] - offsets[r]
        if n < 0 or (max_seqlen_q is not None and n > max_seqlen_q):
            raise ValueError(f"cu_seqlens_q: request {r} has {n} tokens (0 to max_seqlen_q = {max_seqlen_q}): {offsets}")
    out = torch.zeros(total_q, h_q, 512, dtype=torch.float64, device=q.device)
    lse = torch.empty(total_q, h_q, dtype=torch.float64, device=q.device)
    for r in range(b):
        a, e = offsets[r], offsets[r + 1]
        if a == e:
            continue
        o, l = mla_decode_reference(q[a:e].unsqueeze(0), k_cache, block_table[r : r + 1], cache_seqlens[r : r + 1],
                                    softmax_scale=softmax_scale, causal=causal, empty_lse=empty_lse)
        out[a:e] = o[0]
        lse[a:e] = l[0].T
    return out, lse


# max_violation's out tolerances by the output's dtype: bf16's are FlashMLA's own test's (abs 8e-4,
# rel 2/128: about two units in the last place); fp16 has 3 more mantissa bits, so 8x tighter in
# the relative term and an absolute floor below its smallest step near the outputs' scale.
OUT_TOLERANCES = {"bfloat16": (8e-4, 2.01 / 128), "float16": (1e-4, 2.01 / 1024)}


def max_violation(out, lse, ref_out, ref_lse, out_atol=None, out_rtol=None, lse_atol=1e-4, lse_rtol=1.3e-4):
    """The largest ratio |err| / tolerance over out and lse (<= 1 passes). out's tolerances are
    its dtype's (`OUT_TOLERANCES`: bf16 and fp16, the kernels' outputs) unless given (both must
    be, for an out of another dtype: ValueError); lse's are etap's; infinite lse must match
    exactly; any NaN fails."""
    import torch

    if out_atol is None or out_rtol is None:
        name = str(out.dtype).split(".")[-1]
        if name not in OUT_TOLERANCES:
            raise ValueError(f"out: no default tolerance for {name} (the kernels write bfloat16 or float16): "
                             "convert it back, or pass out_atol and out_rtol")
        atol, rtol = OUT_TOLERANCES[name]
        out_atol = atol if out_atol is None else out_atol
        out_rtol = rtol if out_rtol is None else out_rtol
    o = out.double()
    if torch.isnan(o).any() or torch.isnan(lse).any():
        return float("inf")
    eo = ((o - ref_out).abs() / (out_atol + out_rtol * ref_out.abs())).max().item()
    l = lse.double()
    inf = torch.isinf(ref_lse)
    if not torch.equal(torch.isinf(l), inf) or not torch.equal(l[inf], ref_lse[inf]):
        return float("inf")
    fin = ~inf
    el = ((l[fin] - ref_lse[fin]).abs() / (lse_atol + lse_rtol * ref_lse[fin].abs())).max().item() if fin.any() else 0.0
    return max(eo, el)

"""The packed query layout's per-request check, shared by the GPU tests of the 16-bit and the
FP8 caches."""

from etap.reference import max_violation


def check_each_packed_request(torch, out, lse, cu, sl, ref, what, empty_lse="-inf"):
    """Every request of the packed layout on its own against ``ref`` (the reference's out
    ``[total_q, h_q, 512]`` and lse ``[total_q, h_q]``; a failure names the request, its tokens
    and length); no NaN anywhere (every row of out and lse written); a token that sees no row has
    out 0 and lse ``empty_lse``. The caller has synchronized."""
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), f"{what}: NaN in out or lse"
    ref_out, ref_lse = ref
    offsets, lens = cu.tolist(), sl.tolist()
    for r in range(len(lens)):
        a, e = offsets[r], offsets[r + 1]
        if a == e:
            continue
        v = max_violation(out[a:e], lse[a:e], ref_out[a:e], ref_lse[a:e])
        assert v <= 1.0, f"{what}: request {r} ({e - a} tokens, seqlen {lens[r]}): error {v:.3f} x tolerance"
        blind = min(max(e - a - lens[r], 0), e - a)  # its first tokens that see no row
        assert (out[a : a + blind] == 0).all() and (lse[a : a + blind] == float(empty_lse)).all(), what

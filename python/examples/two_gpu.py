"""etap across GPUs with PyTorch's distributed engine (NCCL), one process per GPU:

    torchrun --nproc-per-node 2 python/examples/two_gpu.py

(a) tensor parallel: the 128 heads split over the ranks, each rank decodes its shard, the
    outputs all-gathered along the heads: equal to one GPU decoding all 128 heads;
(b) decode context parallel: each request's KV split (page-aligned) over the ranks, each rank
    decodes its part (lse -inf where it saw no row), the partial (out, lse) all-gathered and
    merged with etap.merge_states: equal to one GPU decoding the whole KV.

Every rank builds the same inputs from the same seed. Both results are checked on every rank
against the single-GPU decode and the float64 reference; the script exits non-zero on a
mismatch and prints one PASS/FAIL line per check from rank 0.
"""

import os
import sys

import torch
import torch.distributed as dist

import etap
from etap.reference import make_inputs, max_violation, mla_decode_reference


def gather(t, world):
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return parts


def split_kv(bt, sl, rank, world):
    """This rank's page-aligned share of each request's KV: (block table, seqlens)."""
    lens = [int(x) for x in sl.cpu()]
    t = torch.zeros_like(bt)
    n = torch.zeros_like(sl)
    for i, length in enumerate(lens):
        pages = (length + 63) // 64
        per = (pages + world - 1) // world
        p0, p1 = min(rank * per, pages), min((rank + 1) * per, pages)
        t[i, : p1 - p0] = bt[i, p0:p1]
        n[i] = max(0, min(length, p1 * 64) - p0 * 64)
    return t, n


def main():
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", rank))
    torch.cuda.set_device(local)
    dev = torch.device("cuda", local)
    ok = True

    def report(name, v):
        nonlocal ok
        passed = v <= 1.0
        ok &= passed
        flags = torch.tensor([0 if passed else 1], device=dev)
        dist.all_reduce(flags)
        if rank == 0:
            print(f"{name}: {'PASS' if flags.item() == 0 else 'FAIL'} (rank 0: worst error {v:.3f} x tolerance)", flush=True)

    # (a) tensor parallel over the heads: 128 heads, 128 / world per rank.
    h_q = 128
    assert h_q % world == 0 and 1 <= h_q // world <= etap.MAX_HEADS, f"{h_q} heads over {world} ranks"
    for s_q in (1, 2):
        q, k, bt, sl = make_inputs(16, s_q, h_q, 4096, varlen=True, seed=100 + s_q, device=dev)
        full_out, full_lse = etap.flash_mla_with_kvcache(q, k, bt, sl, 512, etap.get_mla_metadata()[0], None, causal=True)
        hs = h_q // world
        shard = q[:, :, rank * hs : (rank + 1) * hs].contiguous()
        meta, splits = etap.get_mla_metadata(sl, s_q * hs, 1)
        out, lse = etap.flash_mla_with_kvcache(shard, k, bt, sl, 512, meta, splits, causal=True)
        tp_out = torch.cat(gather(out, world), dim=2)  # [b, s_q, h_q, 512]
        tp_lse = torch.cat(gather(lse, world), dim=1)  # [b, h_q, s_q]
        v_ref = max_violation(tp_out, tp_lse, *mla_decode_reference(q, k, bt, sl))
        v_one = max_violation(tp_out, tp_lse, full_out.double(), full_lse.double(), 1.6e-3, 4.02 / 128, 2e-4, 2.6e-4)
        report(f"TP  s_q={s_q} h={h_q} over {world} GPUs vs one GPU", v_one)
        report(f"TP  s_q={s_q} h={h_q} over {world} GPUs vs float64 reference", v_ref)

    # (b) decode context parallel: each request's KV split over the ranks (s_q = 1; see README).
    for h_q in (16, 128):
        q, k, bt, sl = make_inputs(8, 1, h_q, 16384, varlen=True, seed=200 + h_q, device=dev)
        sl[0] = 40  # a request shorter than a page: every other rank's share is empty
        full_out, full_lse = etap.flash_mla_with_kvcache(q, k, bt, sl, 512, etap.get_mla_metadata()[0], None)
        pbt, psl = split_kv(bt, sl, rank, world)
        out, lse = etap.flash_mla_with_kvcache(q, k, pbt, psl, 512, etap.get_mla_metadata()[0], None, empty_lse="-inf")
        cp_out, cp_lse = etap.merge_states(gather(out, world), gather(lse, world), empty_lse="+inf")
        v_ref = max_violation(cp_out, cp_lse, *mla_decode_reference(q, k, bt, sl))
        v_one = max_violation(cp_out, cp_lse, full_out.double(), full_lse.double(), 1.6e-3, 4.02 / 128, 2e-4, 2.6e-4)
        report(f"CP  h={h_q} KV over {world} GPUs, merge_states vs one GPU", v_one)
        report(f"CP  h={h_q} KV over {world} GPUs, merge_states vs float64 reference", v_ref)

    dist.barrier()
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

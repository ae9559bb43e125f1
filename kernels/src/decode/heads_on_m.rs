//! The wide decode kernel: heads on M, for requests with `s_q * h_q >= 32` (token, head) rows.
//!
//! ETAP puts the KV rows on wgmma M so that 16 heads waste nothing; once a request has 32 or
//! more rows, M = 64 is (nearly) filled by the rows themselves and the transposition no longer
//! pays: the ETAP kernel's GEMMs are narrow (N = 16-32 per warpgroup) and read the whole page
//! tile as the A operand for every one of them, and its per-column softmax needs a cross-warp
//! reduction per page. Here, per tile of 64 KV rows and CTA of 64 rows (see `tile`'s
//! heads-on-M section):
//!
//! ```text
//!   S[64 x 64]     = Q[64 x 576] · K[64 x 576]^T      warpgroup 0 (the scorer)
//!   row softmax; P[64 x 64] and the rescale factors -> shared memory        (scorer)
//!   O_w[64 x 256] += P · V[64 x 256w..]               warpgroup w = 0, 1: half the features each
//! ```
//!
//! The producer warpgroup, the two-page TMA ring, the Q loads, the work ranges, the partial
//! outputs and the split merge are those of the ETAP kernel (`decode`): only the consumers
//! differ. Padding rows (s_q * h_q = 32 or 48) compute on and are never written. Wider
//! requests (h_q = 128, or s_q * h_q > 64) are cut into column groups of 64 rows, one CTA
//! each; the CTAs of one part read the same pages at about the same time, so that the second
//! read of a page is mostly an L2 hit (docs/perf-notes.md).
use super::{for_each_segment, prologue, run_producer, DecodeParams, Smem, CONSUMERS, CONSUMER_REGS, STAGES, THREADS};
use crate::barriers::{CONSUMERS as BAR_CONSUMERS, OWN as BAR_OWN, P_FREE as BAR_P_FREE, P_READY as BAR_P_READY};
use crate::device::{index, mbarrier, smem, sync};
use crate::elem::{Bf16, Elem, F16};
use crate::merge;
use crate::tile::{self, Frag, RowState, WideAcc, ROW_BYTES, TILE_BYTES, WIDE_ROWS, WIDE_V_BLOCKS};
use crate::unroll;
use etap_core::{visible_rows, WorkRange, QK_BLOCKS};

/// The kernel's shared memory: Q (64 rows), the two-page ring, one P tile, the scorer's
/// hand-overs (`red`: the rows' rescale factors, `red_sum`: their 1 / l at a segment's end;
/// 64 f32 each, in 512-byte slots sized for two warpgroups' worth), the mbarriers.
#[inline(always)]
pub(crate) fn layout() -> (Smem, u32) {
    let q = smem::base();
    let pages = q + QK_BLOCKS as u32 * WIDE_ROWS * ROW_BYTES;
    let p = pages + STAGES * TILE_BYTES;
    let red = p + WIDE_ROWS * ROW_BYTES;
    let red_sum = red + 2 * WIDE_ROWS * 4;
    let bars = red_sum + 2 * WIDE_ROWS * 4;
    (Smem::with_barriers_at(q, pages, p, red, bars), red_sum)
}

/// Dynamic shared memory of the wide kernel (230,448 bytes of the 232,448 a CTA may have: the
/// layout above).
pub use etap_core::contract::wide_smem_bytes as smem_bytes;

#[inline(always)]
unsafe fn decode_wide<E: Elem>(prm: &DecodeParams) {
    let (sm, red_sum) = layout();
    let group = index::group();
    match prologue::<STAGES, 1>(prm, &sm) {
        Some(range) => {
            if !run_producer(prm, &range, &sm, group, WIDE_ROWS) {
                sync::setmaxnreg!(inc, CONSUMER_REGS);
                consume::<E>(prm, &range, &sm, red_sum, group);
            }
        }
        None => merge::write_empty(prm, group, WIDE_ROWS, index::thread_x(), THREADS),
    }
}

/// A consumer warpgroup. Warpgroup 0 (the scorer) computes S and the softmax of every page and
/// hands P and the rescale factors over through shared memory; both update their half of O.
/// Over an FP8 cache (`fp8_wide`: f16 operands) the scorer converts each request's Q to f16
/// when q is bf16, and a per-tensor scale is folded into the scores' scale and the output's
/// normalizer, as in the ETAP consumer.
#[inline(always)]
pub(crate) unsafe fn consume<E: Elem>(prm: &DecodeParams, range: &WorkRange, sm: &Smem, red_sum: u32, group: u32) {
    let t = index::thread_x();
    let wg = sync::warp_uniform(t / index::WARPGROUP);
    let tw = t % index::WARPGROUP;
    let scorer = wg == 0;
    let vb0 = wg * WIDE_V_BLOCKS as u32;
    // The rescale factors of the page's rows, from the scorer to the other warpgroup.
    let alpha_buf = sm.red;
    // The request row of the tile's first row.
    let col0 = group * WIDE_ROWS;
    // A per-tensor scale multiplies every score (and, in finish_segment, the output).
    let scale_log2 = if E::FOLD_KV_SCALE {
        prm.scale_log2 * prm.kv_scale
    } else {
        prm.scale_log2
    };
    for_each_segment!(prm, range, sm, t, tw, per_stage: false;
        segment |r, rows| {
            // Visible KV rows of this thread's two rows (causal for s_q > 1). Padding rows (past
            // the request's columns) compute on, but never past the request's rows.
            let q_len = prm.req_cols(r).q_len;
            let mut visible = [0u32; 2];
            unroll!(h < 2, max 2 => {
                let (row, _) = crate::device::wgmma::frag_pos(tw, 2 * h as u32);
                let vis = visible_rows(rows, q_len, (col0 + row) / prm.h_q);
                visible[h] = if vis < rows { vis } else { rows };
            });
            let mut st = RowState::new();
            let mut o: WideAcc = [0f32; 128];
        }
        q_ready {
            // Only the scorer reads Q; both warpgroups convert it (the other has nothing to do
            // before the first P).
            if E::F16 != E::IO_F16 {
                let all = CONSUMERS * index::WARPGROUP;
                tile::q_to_f16::<{ WIDE_ROWS as usize }>(sm.q, WIDE_ROWS, BAR_CONSUMERS, all);
            }
        }
        tile |page, hi, row0, kv, _it| {
            let alpha = if scorer {
                let mut s: Frag = [0f32; 32];
                tile::scores::<E>(&mut s, sm.q, kv);
                // The scorer no longer reads Q after its last page's scores.
                mbarrier::arrive_if(page + 1 == hi && tw == 0, sm.q_empty);
                let alpha = tile::row_softmax(&mut s, &mut st, &visible, row0, scale_log2);
                // The other warpgroup is done with the previous P (and alpha).
                sync::bar_sync(BAR_P_FREE, CONSUMERS * index::WARPGROUP);
                tile::store_p::<E>(sm.p, &s, alpha, alpha_buf);
                sync::bar_sync(BAR_P_READY, CONSUMERS * index::WARPGROUP);
                alpha
            } else {
                // This warpgroup never reads Q.
                mbarrier::arrive_if(page + 1 == hi && tw == 0, sm.q_empty);
                sync::bar_sync(BAR_P_FREE, CONSUMERS * index::WARPGROUP);
                sync::bar_sync(BAR_P_READY, CONSUMERS * index::WARPGROUP);
                let (row, _) = crate::device::wgmma::frag_pos(tw, 0);
                [
                    smem::ld_f32(alpha_buf + row * 4),
                    smem::ld_f32(alpha_buf + (row + 8) * 4),
                ]
            };
            tile::rescale_rows(&mut o, alpha);
            tile::accumulate_o::<E>(&mut o, kv, sm.p, vb0);
        }
        end {
            finish_segment::<E>(prm, r, range.split_of(r), col0, &st, &o, red_sum, wg);
            merge::publish(prm, r, group, BAR_OWN + wg);
        }
    );
    merge::merge_splits::<E>(prm, group, WIDE_ROWS, BAR_CONSUMERS);
}

/// Add up the scorer's row sums (over the quad), pass 1 / l to the other warpgroup through
/// `red_sum` ([64] f32), normalize, and write this warpgroup's 256 features of one segment:
/// the final out/lse when the request has a single split, else the partial O and lse.
///
/// `red_sum` is written here by the scorer and read after the barrier below; the scorer's next
/// write (the next segment's end) comes after its next page's `BAR_P_FREE`, at which the other
/// warpgroup arrives only after this read.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn finish_segment<E: Elem>(
    prm: &DecodeParams,
    r: u32,
    split: u32,
    col0: u32,
    st: &RowState,
    o: &WideAcc,
    red_sum: u32,
    wg: u32,
) {
    let tw = index::thread_x() % index::WARPGROUP;
    let lane = tw % 32;
    let red_sum = smem::opaque(red_sum);
    let mut inv = [0f32; 2];
    let mut lse = [0f32; 2];
    if wg == 0 {
        unroll!(h < 2, max 2 => {
            let mut l = st.l[h];
            l += sync::shfl_xor_f32(l, 1);
            l += sync::shfl_xor_f32(l, 2);
            (inv[h], lse[h]) = tile::normalizer(l, st.m[h]);
            if E::FOLD_KV_SCALE {
                inv[h] *= prm.kv_scale;
            }
            let (row, _) = crate::device::wgmma::frag_pos(tw, 2 * h as u32);
            smem::st_f32_if(lane.is_multiple_of(4), red_sum + row * 4, inv[h]);
        });
    }
    sync::bar_sync(BAR_CONSUMERS, CONSUMERS * index::WARPGROUP);
    if wg != 0 {
        unroll!(h < 2, max 2 => {
            let (row, _) = crate::device::wgmma::frag_pos(tw, 2 * h as u32);
            inv[h] = smem::ld_f32(red_sum + row * 4);
        });
    }
    store_rows!(E; prm, r, split, col0, o, inv, lse, wg, tw, lane);
}

/// The end of a heads-on-M segment: write warpgroup
/// `wg`'s 256 features of the segment's rows (thread `tw`, lane `lane`), normalized by `inv`
/// (1 / l of the thread's two rows), and from warpgroup 0 their `lse`: the final out / lse when
/// request `r` has a single split, else split `split`'s partial O and lse. A macro rather than
/// a function: as an inlined function it changed the wide kernel's code generation (1,500
/// more PTX lines); expanded, the PTX is byte-identical.
macro_rules! store_rows {
    ($f16:ident; $prm:expr, $r:expr, $split:expr, $col0:expr, $o:expr, $inv:expr, $lse:expr, $wg:expr, $tw:expr, $lane:expr) => {{
        let splits = *$prm.split_offsets.add($r as usize + 1) - *$prm.split_offsets.add($r as usize);
        let slot_base = *$prm.split_offsets.add($r as usize) + $split;
        let rc = $prm.req_cols($r);
        let n_max = $prm.n_max();
        $crate::unroll!(c < 4, max 4 => {
            $crate::unroll!(j < 16, max 16 => {
                // Elements i, i + 1: adjacent features of one row.
                let i = 32 * c + 2 * j;
                let (row, dim) = $crate::device::wgmma::frag_pos($tw, i as u32);
                let n = $col0 + row;
                if n < rc.n {
                    let h = $crate::tile::row_half(i);
                    let d = $crate::tile::WIDE_V_BLOCKS as u32 * 64 * $wg + dim;
                    let (v0, v1) = ($o[i] * $inv[h], $o[i + 1] * $inv[h]);
                    if splits == 1 {
                        let idx = ((rc.row0 + n) * etap_core::D_V as u32 + d) as usize;
                        *($prm.out.add(idx) as *mut u32) = $crate::device::math::pack2_out::<$f16>(v0, v1);
                    } else {
                        let idx = ((slot_base * n_max + n) * etap_core::D_V as u32 + d) as usize;
                        *($prm.o_accum.add(idx) as *mut [f32; 2]) = [v0, v1];
                    }
                }
            });
        });
        // lse: the first thread of each quad of the scorer holds its two rows' values.
        if $wg == 0 && $lane.is_multiple_of(4) {
            $crate::unroll!(h < 2, max 2 => {
                let (row, _) = $crate::device::wgmma::frag_pos($tw, 2 * h as u32);
                let n = $col0 + row;
                if n < rc.n {
                    if splits == 1 {
                        *$prm.lse.add(rc.lse_at(n, $prm.h_q) as usize) = $lse[h];
                    } else {
                        *$prm.lse_accum.add((slot_base * n_max + n) as usize) = $lse[h];
                    }
                }
            });
        }
    }};
}
pub(crate) use store_rows;

macro_rules! decode_wide_entry {
    ($($name:ident = $e:ty;)*) => {$(
        /// Wide (heads-on-M) split-KV decode, CTAs of 64 (token, head) rows; see the module
        /// documentation. Launch: grid (column groups, parts), `decode::THREADS` threads,
        /// [`smem_bytes`] bytes.
        #[no_mangle]
        pub unsafe extern "ptx-kernel" fn $name(params: DecodeParams) {
            decode_wide::<$e>(&params)
        }
    )*};
}

decode_wide_entry! {
    etap_decode_wide_bf16 = Bf16;
    etap_decode_wide_f16 = F16;
}

const _: () = assert!(smem_bytes() == 230_448);

//! The ETAP consumer (KV rows on M) and its kernels `etap_decode_{bf16,f16}_c{16,32}`: per page,
//! S^T = K·Q^T on the tensor cores, the online softmax down each column, O^T += V^T·P^T, for
//! this warpgroup's NW columns; the two consumer warpgroups take turns on the tensor cores.
use super::{for_each_segment, prologue, run_producer, DecodeParams, Smem, CONSUMER_REGS, STAGES, THREADS};
use crate::barriers::{CONSUMERS as BAR_CONSUMERS, OWN as BAR_OWN, TURN as BAR_TURN};
use crate::device::{index, math, mbarrier, smem, sync};
use crate::elem::{Bf16, Elem, F16};
use crate::merge;
use crate::tile::{self, ColumnState, Frag, ROW_BYTES};
use crate::unroll;
use etap_core::{visible_rows, WorkRange, D_V, V_BLOCKS};

#[inline(always)]
unsafe fn decode<const NW: usize, E: Elem>(prm: &DecodeParams) {
    let cols = 2 * NW as u32;
    let sm = Smem::new(cols, NW as u32);
    let group = index::group();
    match prologue::<STAGES, 1>(prm, &sm) {
        Some(range) => {
            if !run_producer(prm, &range, &sm, group, cols) {
                sync::setmaxnreg!(inc, CONSUMER_REGS);
                consume::<NW, E, false>(prm, &range, &sm, group);
            }
        }
        None => merge::write_empty(prm, group, cols, index::thread_x(), THREADS),
    }
}

/// A consumer warpgroup: S^T, softmax, O^T for its NW columns over the part's pages. `SOLO`:
/// warpgroup 0 computes all of the CTA's NW columns alone (the FP8 kernel: every tile is read
/// once from shared memory as the wgmma A operand, not once per warpgroup), while warpgroup 1
/// only keeps the frame's count ([`keep_count`]).
#[inline(always)]
pub(crate) unsafe fn consume<const NW: usize, E: Elem, const SOLO: bool>(
    prm: &DecodeParams,
    range: &WorkRange,
    sm: &Smem,
    group: u32,
) {
    let t = index::thread_x();
    // Solo, only warpgroup 0 consumes: a constant, so that its Q and P addresses are too.
    let wg = if SOLO { 0 } else { t / index::WARPGROUP };
    let tw = t % index::WARPGROUP;
    let bar_id = BAR_OWN + wg;
    let cols = if SOLO { NW as u32 } else { 2 * NW as u32 };
    let p_tile = sm.p + wg * NW as u32 * ROW_BYTES;
    let red = sm.red + wg * 2 * 4 * NW as u32 * 4;
    let q_cols = sm.q + wg * NW as u32 * ROW_BYTES;
    // The request column of this warpgroup's first column.
    let col0 = group * cols + wg * NW as u32;

    let turn = tile::Turn::<SOLO> {
        mine: BAR_TURN + wg,
        theirs: BAR_TURN + 1 - wg,
    };
    if wg == 1 {
        // Warpgroup 0 takes the first turn (solo, there is no turn: `Turn<true>` is nothing).
        turn.pass();
    }
    // A per-tensor scale multiplies every score (and, in finish_segment, the output).
    let scale_log2 = if E::FOLD_KV_SCALE {
        prm.scale_log2 * prm.kv_scale
    } else {
        prm.scale_log2
    };
    for_each_segment!(prm, range, sm, t, tw, per_stage: true;
        segment |r, rows| {
            // Visible rows of the columns this thread holds (causal for s_q > 1), per column:
            // with a head count that is not a multiple of 8, one 8-wide block may hold two
            // tokens.
            let q_len = prm.req_cols(r).q_len;
            let mut visible = [0u32; 4];
            unroll!(slot < NW / 4, max 4 => {
                let n = col0 + tile::slot_col(slot, tw % 4);
                // Padding columns (past the request's) compute on, but never past its rows.
                let vis = visible_rows(rows, q_len, n / prm.h_q);
                visible[slot] = if vis < rows { vis } else { rows };
            });
            let mut st = ColumnState::new();
            let mut o: [Frag; V_BLOCKS] = [[0f32; 32]; V_BLOCKS];
        }
        q_ready {
            if E::F16 != E::IO_F16 {
                tile::q_to_f16::<NW>(q_cols, cols, bar_id, index::WARPGROUP);
            }
        }
        tile |page, hi, row0, kv, it| {
            let mut s: Frag = [0f32; 32];
            tile::scores_t::<NW, E, SOLO>(&mut s, kv, q_cols, cols, turn);
            // This warpgroup no longer reads Q after its last page's scores.
            mbarrier::arrive_if(page + 1 == hi && tw == 0, sm.q_empty);
            let red_buf = red + (it & 1) * 4 * NW as u32 * 4;
            tile::column_softmax::<NW>(&mut s, &mut o, &mut st, &visible, row0, scale_log2, red_buf, bar_id);
            tile::store_p_t::<NW, E>(p_tile, &s, bar_id);
            tile::accumulate_o_t::<NW, E, SOLO>(&mut o, kv, p_tile, turn);
        }
        end {
            finish_segment::<NW, E>(prm, r, range.split_of(r), col0, &st, &o, red, bar_id);
            merge::publish(prm, r, group, bar_id);
        }
    );
    if wg == 0 {
        // Warpgroup 1's last hand-over (it passed first, so it passes once more than it
        // takes): consume it so that no barrier is left half-arrived at exit.
        turn.take();
    }
    merge::merge_splits::<E>(prm, group, cols, BAR_CONSUMERS);
}

/// Warpgroup 1 beside a `SOLO` consumer of `cols` columns: what the frame counts on from each
/// consumer warpgroup and nothing else: its wait for each request's Q and each tile (with its
/// share of zeroing a partial tile), its arrivals on the tiles' `empty` and Q's `q_empty`, its
/// count of each split published, and its share of the merge.
#[inline(always)]
pub(crate) unsafe fn keep_count<E: Elem>(prm: &DecodeParams, range: &WorkRange, sm: &Smem, group: u32, cols: u32) {
    let t = index::thread_x();
    let tw = t % index::WARPGROUP;
    let bar_id = BAR_OWN + t / index::WARPGROUP;
    for_each_segment!(prm, range, sm, t, tw, per_stage: false;
        segment |r, rows| {
            let _ = rows;
        }
        tile |page, hi, row0, kv, it| {
            let _ = (row0, kv, it);
            mbarrier::arrive_if(page + 1 == hi && tw == 0, sm.q_empty);
        }
        end {
            merge::publish(prm, r, group, bar_id);
        }
    );
    merge::merge_splits::<E>(prm, group, cols, BAR_CONSUMERS);
}

/// Reduce the row sums, normalize, and write this warpgroup's columns of one segment: the final
/// out/lse when the request has a single split, else the partial O and lse.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn finish_segment<const NW: usize, E: Elem>(
    prm: &DecodeParams,
    r: u32,
    split: u32,
    col0: u32,
    st: &ColumnState,
    o: &[Frag; V_BLOCKS],
    red: u32,
    bar_id: u32,
) {
    let tw = index::thread_x() % index::WARPGROUP;
    let warp = tw / 32;
    let lane = tw % 32;
    let red = smem::opaque(red);
    // Sum each column's 32 shares: across the 8 lanes holding it, then the 4 warps, through
    // `red`'s first buffer (the barrier below orders this after every read of the last tile's
    // maxima, whichever buffer they used).
    sync::bar_sync(bar_id, index::WARPGROUP);
    unroll!(slot < NW / 4, max 8 => {
        let mut x = st.l[slot];
        x += sync::shfl_xor_f32(x, 4);
        x += sync::shfl_xor_f32(x, 8);
        x += sync::shfl_xor_f32(x, 16);
        let col = tile::slot_col(slot, lane % 4);
        smem::st_f32_if(lane < 4, red + (warp * NW as u32 + col) * 4, x);
    });
    sync::bar_sync(bar_id, index::WARPGROUP);
    let mut inv = [0f32; 16];
    let mut lse = [0f32; 16];
    unroll!(slot < NW / 4, max 8 => {
        let col = tile::slot_col(slot, lane % 4);
        let mut l = 0f32;
        for w in 0..4u32 {
            l += smem::ld_f32(red + (w * NW as u32 + col) * 4);
        }
        (inv[slot], lse[slot]) = tile::normalizer(l, st.m[slot]);
        if E::FOLD_KV_SCALE {
            inv[slot] *= prm.kv_scale;
        }
    });
    sync::bar_sync(bar_id, index::WARPGROUP);

    let splits = prm.splits(r);
    let slot_base = *prm.split_offsets.add(r as usize) + split;
    let rc = prm.req_cols(r);
    let n_max = prm.n_max();
    unroll!(c < V_BLOCKS, max 8 => {
        unroll!(i < NW / 2, max 16 => {
            let (dim, col) = crate::device::wgmma::frag_pos(tw, i as u32);
            let n = col0 + col;
            if n < rc.n {
                let d = c as u32 * 64 + dim;
                let v = o[c][i] * inv[tile::col_slot(i)];
                if splits == 1 {
                    let idx = ((rc.row0 + n) * D_V as u32 + d) as usize;
                    *prm.out.add(idx) = math::pack2_out::<E>(v, 0.0) as u16;
                } else {
                    let idx = ((slot_base * n_max + n) * D_V as u32 + d) as usize;
                    *prm.o_accum.add(idx) = v;
                }
            }
        });
    });
    // lse: one thread per column (the lanes 0..3 of warp 0 hold every column between them).
    if warp == 0 && lane < 4 {
        unroll!(slot < NW / 4, max 8 => {
            let col = tile::slot_col(slot, lane);
            let n = col0 + col;
            if n < rc.n {
                if splits == 1 {
                    *prm.lse.add(rc.lse_at(n, prm.h_q) as usize) = lse[slot];
                } else {
                    *prm.lse_accum.add((slot_base * n_max + n) as usize) = lse[slot];
                }
            }
        });
    }
}

macro_rules! decode_entry {
    ($($name:ident = ($nw:literal, $e:ty);)*) => {$(
        /// ETAP split-KV decode for CTAs of 2 x NW columns; see the module documentation.
        /// Launch: grid (column groups, parts), [`THREADS`] threads, [`smem_bytes`] bytes.
        #[no_mangle]
        pub unsafe extern "ptx-kernel" fn $name(params: DecodeParams) {
            decode::<$nw, $e>(&params)
        }
    )*};
}

decode_entry! {
    etap_decode_bf16_c16 = (8, Bf16);
    etap_decode_bf16_c32 = (16, Bf16);
    etap_decode_f16_c16 = (8, F16);
    etap_decode_f16_c32 = (16, F16);
}

//! The seesaw decode kernel (experimental; `Layout::Seesaw`, only on request): heads on M as in
//! the wide kernel (`decode_wide`), without its serial scorer chain (S, the softmax, O, one
//! after the other on one warpgroup, the tensor cores idle during every softmax).
//!
//! Here the two consumer warpgroups take turns as the scorer, unit by unit, each keeping its
//! half of O (256 features) for the whole segment:
//!
//! ```text
//!   scorer of unit u (warpgroup u % 2)           the other warpgroup
//!   S_u = Q · K_u^T                              softmax of unit u - 1 ...
//!   wait for P_{u-1}, m_{u-1}  <---------------  ... publish P_{u-1} and the running max m_{u-1}
//!   softmax of u against m_{u-1}: P_u, m_u       O += P_{u-1} V_{u-1}, S_{u+1} = Q · K_{u+1}^T
//!   publish P_u, m_u  -------------------------> wait for P_u, m_u ...
//!   O = O·a_{u-1} + P_{u-1} V_{u-1}; O = O·a_u + P_u V_u
//! ```
//!
//! so that one warpgroup's S runs on the tensor cores while the other computes its softmax. A
//! unit is half a page (32 KV rows, 36 KiB): with both warpgroups a unit apart, a page's ring
//! buffer would be held from its S to the other warpgroup's O update, a page and a half later;
//! four half-page units fit where two pages did, and each is refilled after half the work. The
//! scorer's P goes to its own O update from registers (wgmma's RS form) and to the other
//! warpgroup through a per-thread slot in shared memory (one buffer: whoever writes P_u has
//! read P_{u-1}, the buffer's previous contents). Both warpgroups keep row sums over their own
//! units, scaled by every unit's factor; they are added at the segment's end.
//!
//! The producer warpgroup, the Q loads, the work ranges, the partial outputs and the split
//! merge are the other kernels'; only the ring's unit and the consumers differ.
//!
//! Measured (docs/perf-notes.md v20, H100): 0.7-1.2% ahead of the wide kernel at 64 columns,
//! even at 32 and 48, 15-20% behind at h_q = 128, where S as m64n32 reads Q from shared memory
//! twice as often and the L2, not the chain, is the bound; on the H200 5-6% behind at 32-64
//! columns too (session 5), so the plan does not pick this kernel. compute-sanitizer's
//! racecheck also reports hazards between `publish_p` and `read_p` and on the row-sum
//! exchange, also with `bar.sync` on both sides of the hand-over; neither the protocol above
//! nor the tests (identical bits over repeated calls) show one.
use crate::decode::{
    produce, prologue, run_producer_with, tiles_end, DecodeParams, Smem, CONSUMERS, CONSUMER_REGS, THREADS,
};
use crate::device::{index, mbarrier, smem, sync};
use crate::merge;
use crate::tile::{
    self, Frag, PFrag, RowState, WideAcc, P_SLOT_BYTES, ROW_BYTES, UNIT_BYTES, UNIT_ROWS, WIDE_ROWS, WIDE_V_BLOCKS,
};
use crate::unroll;
use etap_core::{visible_rows, WorkRange, PAGE_ROWS, QK_BLOCKS};

/// Units in the ring: four half pages (144 KiB, the two pages of the other kernels).
pub const SLOTS: u32 = 4;
/// Named barriers of each consumer warpgroup alone (1 + warpgroup).
const BAR_OWN: u32 = 1;
/// Named barrier over both consumer warpgroups.
const BAR_CONSUMERS: u32 = 3;
/// Named barriers (4 + warpgroup): warpgroup `wg` has published a unit's P and running max.
/// The scorer arrives, the other warpgroup waits.
const BAR_READY: u32 = 4;
/// Threads on a `BAR_READY` barrier: both consumer warpgroups.
const READY_THREADS: u32 = CONSUMERS * index::WARPGROUP;

/// Bytes of the P hand-over buffer: one [`P_SLOT_BYTES`] slot per consumer thread.
const P_BUF_BYTES: u32 = index::WARPGROUP * P_SLOT_BYTES;
/// Bytes of the running-max hand-over buffer: two f32 per consumer thread.
const M_BUF_BYTES: u32 = index::WARPGROUP * 8;
/// Bytes of the row-sum exchange at a segment's end: [segment parity][warpgroup][thread] x 2
/// f32 (double-buffered: a warpgroup may finish its next segment before the other has read).
const L_BUF_BYTES: u32 = 2 * CONSUMERS * index::WARPGROUP * 8;

/// The kernel's shared memory: Q (64 rows), the ring of four units, the P, max and row-sum
/// hand-overs, the mbarriers. Returns the layout and the row-sum buffer.
#[inline(always)]
fn layout() -> (Smem, u32) {
    let q = smem::base();
    let units = q + QK_BLOCKS as u32 * WIDE_ROWS * ROW_BYTES;
    let p = units + SLOTS * UNIT_BYTES;
    let m = p + P_BUF_BYTES;
    let l = m + M_BUF_BYTES;
    let bars = l + L_BUF_BYTES;
    let sm = Smem {
        q,
        pages: units,
        p,
        red: m,
        full: bars,
        empty: bars + 8 * SLOTS,
        q_full: bars + 16 * SLOTS,
        q_empty: bars + 16 * SLOTS + 8,
    };
    (sm, l)
}

/// Dynamic shared memory of the seesaw kernel (230,480 bytes of the 232,448 a CTA may have).
pub const fn smem_bytes() -> u32 {
    QK_BLOCKS as u32 * WIDE_ROWS * ROW_BYTES
        + SLOTS * UNIT_BYTES
        + P_BUF_BYTES
        + M_BUF_BYTES
        + L_BUF_BYTES
        + 16 * SLOTS
        + 16
}

#[inline(always)]
unsafe fn decode_seesaw<const F16: bool>(prm: &DecodeParams) {
    let (sm, l_buf) = layout();
    let group = index::block_y();
    let n_req = prm.s_q * prm.h_q;
    match prologue::<SLOTS>(prm, &sm) {
        Some(range) => {
            if !run_producer_with(prm, group, WIDE_ROWS, n_req, || {
                produce::<UNIT_ROWS, SLOTS>(prm, &range, &sm, group, WIDE_ROWS, n_req)
            }) {
                sync::setmaxnreg_inc::<CONSUMER_REGS>();
                consume::<F16>(prm, &range, &sm, l_buf, group, n_req);
            }
        }
        None => merge::write_empty(prm, group, WIDE_ROWS, n_req, index::thread_x(), THREADS),
    }
}

/// A consumer warpgroup: the scorer of every other unit, and the O update of its 256 features
/// for every unit (see the module documentation).
#[inline(always)]
unsafe fn consume<const F16: bool>(
    prm: &DecodeParams,
    range: &WorkRange,
    sm: &Smem,
    l_buf: u32,
    group: u32,
    n_req: u32,
) {
    let t = index::thread_x();
    let wg = sync::warp_uniform(t / index::WARPGROUP);
    let tw = t % index::WARPGROUP;
    let vb0 = wg * WIDE_V_BLOCKS as u32;
    let (p_buf, m_buf) = (sm.p, sm.red);
    let col0 = group * WIDE_ROWS;
    let per_page = PAGE_ROWS as u32 / UNIT_ROWS;
    let mut it = 0u32;
    let mut q_round = 0u32;
    let mut segments = 0u32;
    let mut split = range.first_split;
    for r in range.begin_req..=range.end_req {
        let (rows, lo, hi) = prm.segment(range, r);
        if lo == hi {
            continue;
        }
        // Visible KV rows of this thread's two rows (causal for s_q > 1). Padding rows
        // (n >= s_q * h_q) compute on, but never past the request's rows.
        let mut visible = [0u32; 2];
        unroll!(h < 2, max 2 => {
            let (row, _) = crate::device::wgmma::frag_pos(tw, 2 * h as u32);
            let vis = visible_rows(rows, prm.s_q, (col0 + row) / prm.h_q);
            visible[h] = if vis < rows { vis } else { rows };
        });
        let (u_lo, u_hi) = (lo * per_page, tiles_end(hi, rows, UNIT_ROWS));
        let mut st = RowState::new();
        let mut o: WideAcc = [0f32; 128];
        tile::wait(sm.q_full, q_round & 1);
        q_round += 1;
        for u in u_lo..u_hi {
            let slot = it % SLOTS;
            let unit = sm.pages + slot * UNIT_BYTES;
            let row0 = u * UNIT_ROWS;
            if sync::warp_uniform(it % 2) == wg {
                // This warpgroup scores unit u.
                tile::wait(sm.full + 8 * slot, (it / SLOTS) & 1);
                if row0 + UNIT_ROWS > rows {
                    // The request's last, partial unit: zero V's rows past its end (before the
                    // other warpgroup's O update too, which follows this warpgroup's signal).
                    tile::zero_tile_rows_from(unit, UNIT_ROWS, rows - row0, tw, index::WARPGROUP);
                    sync::fence_proxy_async_shared();
                    sync::bar_sync(BAR_OWN + wg, index::WARPGROUP);
                }
                let mut s: Frag = [0f32; 32];
                tile::scores_unit::<F16>(&mut s, sm.q, unit);
                // This warpgroup's last S of the segment: done with Q.
                mbarrier::arrive_if(u + 2 >= u_hi && tw == 0, sm.q_empty);
                // The other warpgroup's unit u - 1, when it is of this segment.
                let prev = u > u_lo;
                let mut p_prev: PFrag = [0u32; 8];
                let mut a_prev = [1f32; 2];
                if prev {
                    sync::bar_sync(BAR_READY + 1 - wg, READY_THREADS);
                    let (p, m) = tile::read_p(p_buf, m_buf, tw);
                    p_prev = p;
                    a_prev = tile::advance_max(&mut st, m);
                }
                let a_u =
                    tile::row_softmax_n::<{ UNIT_ROWS as usize }>(&mut s, &mut st, &visible, row0, prm.scale_log2);
                let p_u = tile::pack_p::<F16>(&s);
                // Every thread of this warpgroup has read P_{u-1} before P_u overwrites it.
                sync::bar_sync(BAR_OWN + wg, index::WARPGROUP);
                tile::publish_p(p_buf, m_buf, tw, &p_u, st.m);
                sync::bar_arrive(BAR_READY + wg, READY_THREADS);
                if prev {
                    let prev_slot = (it - 1) % SLOTS;
                    tile::wait(sm.full + 8 * prev_slot, ((it - 1) / SLOTS) & 1);
                    tile::rescale_rows(&mut o, a_prev);
                    tile::accumulate_o_rs::<F16>(&mut o, sm.pages + prev_slot * UNIT_BYTES, vb0, &p_prev);
                    mbarrier::arrive_if(tw == 0, sm.empty + 8 * prev_slot);
                }
                tile::rescale_rows(&mut o, a_u);
                tile::accumulate_o_rs::<F16>(&mut o, unit, vb0, &p_u);
                mbarrier::arrive_if(tw == 0, sm.empty + 8 * slot);
            } else if u + 1 == u_hi {
                // The segment's last unit, scored by the other warpgroup: only its O update.
                // (In a one-unit segment this warpgroup never reads Q.)
                mbarrier::arrive_if(u == u_lo && tw == 0, sm.q_empty);
                sync::bar_sync(BAR_READY + 1 - wg, READY_THREADS);
                let (p, m) = tile::read_p(p_buf, m_buf, tw);
                let a = tile::advance_max(&mut st, m);
                tile::wait(sm.full + 8 * slot, (it / SLOTS) & 1);
                tile::rescale_rows(&mut o, a);
                tile::accumulate_o_rs::<F16>(&mut o, unit, vb0, &p);
                mbarrier::arrive_if(tw == 0, sm.empty + 8 * slot);
            }
            // Otherwise the other warpgroup scores u and this one updates O with it in its own
            // next unit, u + 1.
            it += 1;
        }
        let seg_split = split;
        split = 0;
        finish_segment::<F16>(prm, r, seg_split, col0, n_req, &st, &o, l_buf, segments, wg);
        segments += 1;
        if prm.splits(r) > 1 {
            merge::publish(prm, r, group, BAR_OWN + wg);
        }
    }
    merge::merge_splits::<F16>(prm, group, WIDE_ROWS, n_req, BAR_CONSUMERS);
}

/// Add up both warpgroups' row sums (each over its quad, then across the warpgroups through
/// `l_buf`), normalize and write
/// this warpgroup's 256 features of one segment, and the lse.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn finish_segment<const F16: bool>(
    prm: &DecodeParams,
    r: u32,
    split: u32,
    col0: u32,
    n_req: u32,
    st: &RowState,
    o: &WideAcc,
    l_buf: u32,
    segments: u32,
    wg: u32,
) {
    let tw = index::thread_x() % index::WARPGROUP;
    let mut mine = [0f32; 2];
    unroll!(h < 2, max 2 => {
        let mut l = st.l[h];
        l += sync::shfl_xor_f32(l, 1);
        l += sync::shfl_xor_f32(l, 2);
        mine[h] = l;
    });
    let buf = smem::opaque(l_buf) + (segments % 2) * CONSUMERS * index::WARPGROUP * 8;
    smem::st_v2_f32(buf + (wg * index::WARPGROUP + tw) * 8, mine);
    sync::bar_sync(BAR_CONSUMERS, CONSUMERS * index::WARPGROUP);
    let theirs = smem::ld_v2_f32(buf + ((1 - wg) * index::WARPGROUP + tw) * 8);
    let mut inv = [0f32; 2];
    let mut lse = [0f32; 2];
    unroll!(h < 2, max 2 => {
        // One addition of two numbers: the same bits in both warpgroups (IEEE addition
        // commutes).
        let l = mine[h] + theirs[h];
        (inv[h], lse[h]) = tile::normalizer(l, st.m[h]);
    });
    let lane = tw % 32;
    crate::decode_wide::store_rows!(F16; prm, r, split, col0, n_req, o, inv, lse, wg, tw, lane);
}

macro_rules! decode_seesaw_entry {
    ($($name:ident = $f16:literal;)*) => {$(
        /// Seesaw (heads-on-M, alternating scorer) split-KV decode, CTAs of 64 (token, head)
        /// rows; see the module documentation. Launch: grid (parts, column groups),
        /// `decode::THREADS` threads, [`smem_bytes`] bytes, a KV tensor map of 32-row boxes.
        #[no_mangle]
        pub unsafe extern "ptx-kernel" fn $name(params: DecodeParams) {
            decode_seesaw::<$f16>(&params)
        }
    )*};
}

decode_seesaw_entry! {
    etap_decode_seesaw_bf16 = false;
    etap_decode_seesaw_f16 = true;
}

const _: () = assert!(
    smem_bytes() <= 232_448,
    "the seesaw kernel's shared memory exceeds a CTA's"
);

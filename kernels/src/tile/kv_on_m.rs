//! The ETAP (KV rows on M) tile operations: S^T = K·Q^T, the column softmax, P^T to shared
//! memory, O^T += V^T·P^T (the layouts are in the parent module's documentation).
use super::*;
use crate::device::{index, math, smem, sync, wgmma, wgmma::Desc};
use crate::elem::Elem;
use crate::unroll;
use etap_core::V_BLOCKS;

/// S^T[64 KV rows x NW] = K[64 x 576] · Q^T[576 x NW] for this warpgroup's NW columns, whose Q
/// rows start at `q_cols` (inside a Q tile of `q_rows` rows per block). Issues 36 wgmmas and
/// waits for them.
///
/// # Safety
/// The whole warpgroup calls it, with the page and Q loaded.
#[inline(always)]
pub unsafe fn scores_t<const NW: usize, E: Elem, const SOLO: bool>(
    s: &mut Frag,
    page: u32,
    q_cols: u32,
    q_rows: u32,
    turn: Turn<SOLO>,
) {
    let (page, q_cols) = (smem::opaque(page), smem::opaque(q_cols));
    turn.take();
    wgmma::fence();
    gemm_k576::<NW, E>(s, page, BLOCK_BYTES, q_cols, q_rows * ROW_BYTES);
    wgmma::commit_group();
    turn.pass();
    wgmma::wait_group::<0>();
}

/// O^T[512 x NW] += V^T[512 x 64] · P^T[64 x NW]: eight m64 chunks of V's features, each four
/// K steps over the page's 64 KV rows. V^T is the page tile read M-major (no copy, no
/// transpose: the ETAP trick); P^T is this warpgroup's P tile. Waits for completion.
///
/// # Safety
/// The whole warpgroup calls it, with P written and fenced.
#[inline(always)]
pub unsafe fn accumulate_o_t<const NW: usize, E: Elem, const SOLO: bool>(
    o: &mut [Frag; V_BLOCKS],
    page: u32,
    p: u32,
    turn: Turn<SOLO>,
) {
    let (page, p) = (smem::opaque(page), smem::opaque(p));
    turn.take();
    wgmma::fence();
    let (v_t, p_t) = (Desc::m_major_sw128(page), Desc::k_major_sw128(p));
    unroll!(c < V_BLOCKS, max 8 => {
        unroll!(j < STEPS_PER_BLOCK as usize, max 4 => {
            // 16 KV rows of 128 bytes per step.
            let a = v_t.advance(c as u32 * BLOCK_BYTES + j as u32 * K_STEP * ROW_BYTES);
            let b = p_t.advance(j as u32 * K_STEP * 2);
            wgmma::mma::<NW, 1, 0, E>(&mut o[c], a, b, true);
        });
    });
    wgmma::commit_group();
    turn.pass();
    wgmma::wait_group::<0>();
}

/// Running state of the online softmax for the columns one thread holds: NW/4 columns (two in
/// each 8-wide block), in log2 units (scores pre-multiplied by scale * log2 e).
pub struct ColumnState {
    /// Running maximum per column (-inf until a row is seen).
    pub m: [f32; 16],
    /// This thread's share of the running sum of exp2(s - m) (its 2 rows per tile); the 32
    /// shares of a column are added once, at the end.
    pub l: [f32; 16],
}

impl Default for ColumnState {
    #[inline(always)]
    fn default() -> Self {
        Self::new()
    }
}

impl ColumnState {
    #[inline(always)]
    pub fn new() -> Self {
        ColumnState {
            m: [f32::NEG_INFINITY; 16],
            l: [0.0; 16],
        }
    }
}

/// The warpgroup column of a thread's column `slot` (0..NW/4), for the thread at position
/// `quad` (lane % 4) in its group of four: two adjacent columns in each 8-wide block. The
/// inverse of [`col_slot`] (with [`wgmma::frag_pos`]).
#[inline(always)]
pub const fn slot_col(slot: usize, quad: u32) -> u32 {
    8 * (slot as u32 / 2) + 2 * quad + (slot as u32 % 2)
}

/// Index (0..NW/4) of the column that fragment element `i` belongs to, among this thread's.
#[inline(always)]
pub const fn col_slot(i: usize) -> usize {
    (i / 4) * 2 + (i % 2)
}

/// Column softmax of one S^T tile, in place: mask rows at or past each column's visible bound,
/// scale to log2 units, update the running max (a cross-warp reduction through `red`, one
/// named barrier), turn `s` into P = exp2(s - m), add to the row sums, and return the factor
/// rescale O^T's columns by alpha = exp2(m_old - m_new).
///
/// `visible[slot]` is the number of KV rows of the request that this thread's column `slot`
/// sees; `row0` the request
/// row of this page's first row. `red` is this warpgroup's [4 warps][NW] f32 scratch (double
/// buffered by the caller), `bar_id` its named barrier.
///
/// # Safety
/// The whole warpgroup calls it.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub unsafe fn column_softmax<const NW: usize>(
    s: &mut Frag,
    o: &mut [Frag; V_BLOCKS],
    st: &mut ColumnState,
    visible: &[u32; 4],
    row0: u32,
    scale_log2: f32,
    red: u32,
    bar_id: u32,
) {
    let t = index::thread_x() % index::WARPGROUP;
    let warp = t / 32;
    let lane = t % 32;
    let red = smem::opaque(red);
    // Mask, scale, and this thread's max over its two rows, per column.
    let mut tmax = [f32::NEG_INFINITY; 16];
    unroll!(i < NW / 2, max 16 => {
        let (row, _) = wgmma::frag_pos(t, i as u32);
        let slot = col_slot(i);
        let v = if row0 + row < visible[slot] { s[i] * scale_log2 } else { f32::NEG_INFINITY };
        s[i] = v;
        tmax[slot] = math::fmax(tmax[slot], v);
    });
    // Across the 8 lanes that share columns (lane / 4 varies), then across the 4 warps.
    unroll!(slot < NW / 4, max 8 => {
        let mut x = tmax[slot];
        x = math::fmax(x, sync::shfl_xor_f32(x, 4));
        x = math::fmax(x, sync::shfl_xor_f32(x, 8));
        x = math::fmax(x, sync::shfl_xor_f32(x, 16));
        let col = slot_col(slot, lane % 4);
        smem::st_f32_if(lane < 4, red + (warp * NW as u32 + col) * 4, x);
    });
    sync::bar_sync(bar_id, index::WARPGROUP);
    let mut m_use = [0f32; 16];
    unroll!(slot < NW / 4, max 8 => {
        let col = slot_col(slot, lane % 4);
        let mut x = smem::ld_f32(red + col * 4);
        for w in 1..4u32 {
            x = math::fmax(x, smem::ld_f32(red + (w * NW as u32 + col) * 4));
        }
        let alpha;
        (m_use[slot], alpha) = online_step(&mut st.m[slot], &mut st.l[slot], x);
        rescale_column::<NW>(o, slot, alpha);
    });
    unroll!(i < NW / 2, max 16 => {
        let slot = col_slot(i);
        let p = math::exp2(s[i] - m_use[slot]);
        s[i] = p;
        st.l[slot] += p;
    });
}

/// Scale one of this thread's O^T columns (`slot`) by `alpha`, in every chunk.
#[inline(always)]
pub fn rescale_column<const NW: usize>(o: &mut [Frag; V_BLOCKS], slot: usize, alpha: f32) {
    unroll!(c < V_BLOCKS, max 8 => {
        unroll!(i < NW / 2, max 16 => {
            if col_slot(i) == slot {
                o[c][i] *= alpha;
            }
        });
    });
}

/// Write P^T (this warpgroup's probabilities, rounded to the element type) to its P tile,
/// stored as P[col][KV row] rows of 128 bytes, swizzled: the K-major B operand of O^T.
/// Fences the writes for the tensor cores and synchronizes the warpgroup.
///
/// # Safety
/// The whole warpgroup calls it; no wgmma is still reading the P tile.
#[inline(always)]
pub unsafe fn store_p_t<const NW: usize, E: Elem>(p_tile: u32, s: &Frag, bar_id: u32) {
    let t = index::thread_x() % index::WARPGROUP;
    let p_tile = smem::opaque(p_tile);
    unroll!(i < NW / 2, max 16 => {
        let (row, col) = wgmma::frag_pos(t, i as u32);
        let bits = math::pack2::<E>(s[i], 0.0) as u16;
        smem::st_u16(p_tile + smem::sw128_offset(col, row), bits);
    });
    sync::fence_proxy_async_shared();
    sync::bar_sync(bar_id, index::WARPGROUP);
}

/// This warpgroup's Q rows (`NW` of them at `q_cols`, in a Q tile of `q_rows` rows per block)
/// from bf16 to f16, in place: for the FP8 kernel, whose operands are f16 under bf16 q. The
/// conversion is per element, so each 16-byte chunk is converted where it lies, swizzle or not.
/// The `threads` threads that call it (a warpgroup, or the wide kernel's two consumer
/// warpgroups, threads 0 to `threads - 1` of the CTA modulo `threads`) share the chunks; then
/// the writes are fenced for the tensor cores and those threads synchronize on `bar_id`.
///
/// # Safety
/// All `threads` threads call it, with the Q rows loaded and no wgmma reading them.
#[inline(always)]
pub unsafe fn q_to_f16<const NW: usize>(q_cols: u32, q_rows: u32, bar_id: u32, threads: u32) {
    let t = index::thread_x() % threads;
    // 16-byte chunks: eight a 128-byte row, NW rows a block.
    let per_block = NW as u32 * (ROW_BYTES / 16);
    // The bound hidden from the optimizer: fully unrolled (18 chunks a thread over the wide
    // kernel's two warpgroups) the loads all went first and the wide consumers spilled.
    let end = smem::opaque(QK_BLOCKS as u32 * per_block);
    let mut k = t;
    while k < end {
        let at = q_cols + (k / per_block) * q_rows * ROW_BYTES + (k % per_block) * 16;
        let v = smem::ld_v4_u32(at);
        smem::st_v4_u32(at, v.map(math::bf16x2_to_f16x2));
        k += threads;
    }
    sync::fence_proxy_async_shared();
    sync::bar_sync(bar_id, threads);
}

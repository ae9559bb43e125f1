//! The heads-on-M tile operations of the wide kernel.
use super::*;
use crate::device::{index, math, smem, sync, wgmma, wgmma::Desc};
use crate::elem::Elem;
use crate::unroll;
use etap_core::{TILE_ROWS, V_BLOCKS};

// ---------------------------------------------------------------------------------------------
// Heads on M: the tile operations of the wide kernel (`decode::heads_on_m`), for requests with
// s_q * h_q >= 32 columns, where a 64-row wgmma M is (nearly) filled by (token, head) rows
// and padding no longer wastes much of the tensor cores. Per page, warpgroup 0 (the scorer) computes all of S and
// the softmax; both warpgroups then update their half of O (256 features each):
//
//   S[64 x 64]     = Q[64 x 576] · K[64 x 576]^T        Q K-major A, the page K-major B (wg 0)
//   row softmax, P[64 x 64] and the rescale factors -> shared memory                  (wg 0)
//   O_w[64 x 256] += P[64 x 64] · V[64 x 256w..]        P K-major A, the page N-major B
//
// S is one m64n64 GEMM by one warpgroup: each of its 36 wgmmas reads 4 KiB of shared memory
// for 32 cycles of tensor work, where splitting S between the warpgroups (m64n32 each) reads
// the 2 KiB Q slice twice: 1.5x the shared-memory traffic of the page's largest GEMM (measured
// slower, see docs/perf-notes.md). The page tile is the same 128-byte-swizzled buffer as in the
// ETAP layout: read K-major for S and N-major (transposed) for O, without a copy.
// ---------------------------------------------------------------------------------------------

/// 64-feature blocks of O each warpgroup accumulates: half of V's 8.
pub const WIDE_V_BLOCKS: usize = V_BLOCKS / 2;
/// Rows of the wide kernel's tiles (Q, P, O): one wgmma M.
pub use etap_core::contract::WIDE_ROWS;
/// Accumulator of a warpgroup's O_w[64 x 256] (one m64n256 fragment: 128 floats a thread).
pub type WideAcc = [f32; 128];

/// S[64 x 64] = Q[64 x 576] · K[64 x 576]^T: the page at `page` against the 64 Q rows at `q`.
/// Issues 36 wgmmas (m64n64k16) and waits.
///
/// # Safety
/// The whole warpgroup calls it, with the page and Q loaded.
#[inline(always)]
pub unsafe fn scores<E: Elem>(s: &mut Frag, q: u32, page: u32) {
    let (page, q) = (smem::opaque(page), smem::opaque(q));
    wgmma::fence();
    gemm_k576::<TILE_ROWS, E>(s, q, WIDE_ROWS * ROW_BYTES, page, BLOCK_BYTES);
    wgmma::commit_group();
    wgmma::wait_group::<0>();
}

/// Running state of the online softmax for the two rows a thread holds (rows `r` and `r + 8`
/// of its warp's 16), in log2 units.
pub struct RowState {
    /// Running maximum per row (-inf until a KV row is seen).
    pub m: [f32; 2],
    /// This thread's share of the row sum (its 16 KV columns of each page); the four shares of
    /// a row are added across the quad once, at the end.
    pub l: [f32; 2],
}

impl Default for RowState {
    #[inline(always)]
    fn default() -> Self {
        Self::new()
    }
}

impl RowState {
    #[inline(always)]
    pub fn new() -> Self {
        RowState {
            m: [f32::NEG_INFINITY; 2],
            l: [0.0; 2],
        }
    }
}

/// Which of a thread's two rows fragment element `i` belongs to.
#[inline(always)]
pub const fn row_half(i: usize) -> usize {
    (i / 2) % 2
}

/// Row softmax of S (the page whose first request row is `row0`), in place: mask KV rows at or
/// past each row's visible bound (only on pages where some row of the warp needs it), update
/// the running row maxima (over the quad that shares a row: no cross-warp step), turn `s` into
/// P = exp2(s * scale - m_new) (one FFMA and one exp2 a score; the maxima are kept in log2
/// units of scaled scores), add to the row sums, and return alpha = exp2(m_old - m_new) for
/// each of the thread's two rows: the factor O's rows must be scaled by.
///
/// # Safety
/// The whole warpgroup calls it.
#[inline(always)]
pub unsafe fn row_softmax(s: &mut Frag, st: &mut RowState, visible: &[u32; 2], row0: u32, scale_log2: f32) -> [f32; 2] {
    row_softmax_n::<{ TILE_ROWS }>(s, st, visible, row0, scale_log2)
}

/// [`row_softmax`] of an S of `N` KV columns (`N / 2` fragment elements a thread): 64 for a
/// page, fewer for a tile of part of a page.
///
/// # Safety
/// As [`row_softmax`].
#[inline(always)]
pub unsafe fn row_softmax_n<const N: usize>(
    s: &mut Frag,
    st: &mut RowState,
    visible: &[u32; 2],
    row0: u32,
    scale_log2: f32,
) -> [f32; 2] {
    let t = index::thread_x() % index::WARPGROUP;
    // Mask only where a row of this warp ends inside this page.
    let whole = row0 + N as u32 <= visible[0] && row0 + N as u32 <= visible[1];
    if !sync::warp_all(whole) {
        unroll!(i < N / 2, max 32 => {
            let (_, col) = wgmma::frag_pos(t, i as u32);
            if row0 + col >= visible[row_half(i)] {
                s[i] = f32::NEG_INFINITY;
            }
        });
    }
    // Raw maxima (scale > 0 keeps the order), then over the quad that shares a row.
    let mut tmax = [f32::NEG_INFINITY; 2];
    unroll!(i < N / 2, max 32 => {
        let h = row_half(i);
        tmax[h] = math::fmax(tmax[h], s[i]);
    });
    let mut m_use = [0f32; 2];
    let mut alpha = [0f32; 2];
    unroll!(h < 2, max 2 => {
        let mut x = tmax[h];
        x = math::fmax(x, sync::shfl_xor_f32(x, 1));
        x = math::fmax(x, sync::shfl_xor_f32(x, 2));
        (m_use[h], alpha[h]) = online_step(&mut st.m[h], &mut st.l[h], x * scale_log2);
    });
    unroll!(i < N / 2, max 32 => {
        let h = row_half(i);
        let p = math::exp2(math::fma(s[i], scale_log2, -m_use[h]));
        s[i] = p;
        st.l[h] += p;
    });
    alpha
}

/// Scale this warpgroup's O rows by `alpha` (per row half), skipped when every alpha of the
/// warp is 1, as it is once the row maxima settle: multiplying by 1 changes nothing.
#[inline(always)]
pub fn rescale_rows(o: &mut WideAcc, alpha: [f32; 2]) {
    if !sync::warp_all(alpha[0] == 1.0 && alpha[1] == 1.0) {
        unroll!(c < 4, max 4 => {
            unroll!(k < 32, max 32 => {
                let i = 32 * c + k;
                o[i] *= alpha[row_half(i)];
            });
        });
    }
}

/// Write P (rounded to the element type) to the P tile, stored as P[row][KV column] rows of
/// 128 bytes, swizzled: the K-major A operand of O = P·V; and each row's rescale factor to
/// `alpha_buf` ([64] f32), for the other warpgroup. Fences the writes for the tensor cores;
/// the caller then signals the other warpgroup.
///
/// # Safety
/// The whole warpgroup calls it; no wgmma still reads the P tile, nobody reads `alpha_buf`.
#[inline(always)]
pub unsafe fn store_p<E: Elem>(p_tile: u32, s: &Frag, alpha: [f32; 2], alpha_buf: u32) {
    let t = index::thread_x() % index::WARPGROUP;
    let p_tile = smem::opaque(p_tile);
    unroll!(j < TILE_ROWS / 4, max 16 => {
        // Elements 2j and 2j + 1 are adjacent KV columns of one row: one 32-bit store.
        let i = 2 * j;
        let (row, col) = wgmma::frag_pos(t, i as u32);
        let bits = math::pack2::<E>(s[i], s[i + 1]);
        smem::st_u32(p_tile + smem::sw128_offset(row, col), bits);
    });
    unroll!(h < 2, max 2 => {
        let (row, _) = wgmma::frag_pos(t, 2 * h as u32);
        smem::st_f32_if(t.is_multiple_of(4), alpha_buf + row * 4, alpha[h]);
    });
    sync::fence_proxy_async_shared();
}

/// O_w[64 x 256] += P[64 x 64] · V[64 x 256]: this warpgroup's 256 features of V (blocks
/// `vb0..vb0+4`, consecutive 8 KiB swizzle blocks: the descriptor's leading offset steps from
/// one to the next), one m64n256 wgmma per K step of 16 KV rows. V is the page tile read
/// N-major (transposed B): no copy. Waits for completion.
///
/// # Safety
/// The whole warpgroup calls it, with P written and fenced.
#[inline(always)]
pub unsafe fn accumulate_o<E: Elem>(o: &mut WideAcc, page: u32, p_tile: u32, vb0: u32) {
    let (page, p_tile) = (smem::opaque(page), smem::opaque(p_tile));
    wgmma::fence();
    let (p_k, v_n) = (
        Desc::k_major_sw128(p_tile),
        Desc::m_major_sw128(page + vb0 * BLOCK_BYTES),
    );
    unroll!(j < STEPS_PER_BLOCK as usize, max 4 => {
        let a = p_k.advance(j as u32 * K_STEP * 2);
        // 16 KV rows of 128 bytes per step.
        let b = v_n.advance(j as u32 * K_STEP * ROW_BYTES);
        wgmma::mma_n256::<0, 1, E>(o, a, b, true);
    });
    wgmma::commit_group();
    wgmma::wait_group::<0>();
}

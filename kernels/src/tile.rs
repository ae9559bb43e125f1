//! The tile operations the ETAP decode kernel is written in, as ThunderKittens keeps its tile
//! ops: load a KV page, load Q, S^T = K·Q^T, the column softmax, P^T to shared memory,
//! O^T += V^T·P^T, and the stores.
//!
//! Layout (all tiles 16-bit, stored as 64-column blocks of 128-byte rows with the 128-byte
//! swizzle, each block 1024-aligned):
//! - a KV page: 64 rows x 576 = 9 blocks of [64 rows][128 B] (8 KiB each); block `c` holds
//!   columns 64c..64c+63. It is the K-major A operand of S^T = K·Q^T (M = KV rows, K = the 576
//!   features) and, for c < 8, the M-major A operand of O^T = V^T·P^T (M = features 64c.., K =
//!   KV rows).
//! - Q: the CTA's columns (token, head pairs) x 576 = 9 blocks of [cols][128 B]: the K-major B
//!   operand of S^T.
//! - P: per warpgroup [its cols][64 KV rows] = one block of [cols][128 B]: the K-major B operand
//!   of O^T (K = KV rows).
use crate::device::{index, math, mbarrier, smem, sync, tma, tma::TensorMap, wgmma, wgmma::Desc};
use crate::elem::Elem;
use crate::unroll;
use etap_core::{BLOCK_COLS, PAGE_ROWS, QK_BLOCKS, V_BLOCKS};

/// Bytes of one [64 rows][64 cols] block of 16-bit elements: one TMA box of a KV page.
pub const BLOCK_BYTES: u32 = (PAGE_ROWS * BLOCK_COLS * 2) as u32;
/// Bytes of a KV page in shared memory (9 blocks) and of one 128-byte swizzle row (64 16-bit
/// elements): the contract's.
pub use etap_core::contract::{PAGE_BYTES, ROW_BYTES};
const _: () = assert!(PAGE_BYTES == QK_BLOCKS as u32 * BLOCK_BYTES);
/// wgmma K per instruction for 16-bit operands.
pub const K_STEP: u32 = 16;
/// K steps in one 64-wide block (4 steps of 32 bytes along a swizzle row).
pub const STEPS_PER_BLOCK: u32 = BLOCK_COLS as u32 / K_STEP;

/// Turn-taking between the two consumer warpgroups for the tensor cores (FlashAttention-3's
/// "ping-pong"): a warpgroup waits for its turn before issuing a batch of wgmmas and hands the
/// turn over right after, so one warpgroup's softmax runs while the other's GEMMs do, instead
/// of both stopping the tensor cores for their softmax at the same time.
#[derive(Clone, Copy)]
pub struct Turn {
    /// Named barrier this warpgroup waits on ("my turn").
    pub mine: u32,
    /// Named barrier the other warpgroup waits on.
    pub theirs: u32,
}

impl Turn {
    /// Threads on each turn barrier: both consumer warpgroups.
    const THREADS: u32 = 2 * index::WARPGROUP;

    #[inline(always)]
    pub fn take(&self) {
        sync::bar_sync(self.mine, Self::THREADS);
    }

    #[inline(always)]
    pub fn pass(&self) {
        sync::bar_arrive(self.theirs, Self::THREADS);
    }
}

/// Per-thread accumulator fragment of an m64nN tile (N <= 64): the first N/2 floats are used.
pub type Frag = [f32; 32];

/// Issue the TMA loads of one KV tile of `tile_rows` rows (cache rows `row ..`: a page, or part of
/// one; one box of `tile_rows` x 64 columns per block) into `dst` (blocks
/// of `tile_rows` x 128 bytes), completing on `bar`. One thread calls it.
///
/// # Safety
/// `map` is the cache's tensor map (boxes of `tile_rows` rows); `dst` a free, 1024-aligned
/// buffer; `bar` an mbarrier whose phase expects the whole tile.
#[inline(always)]
pub unsafe fn load_kv_tile(map: *const TensorMap, dst: u32, bar: u32, row: i32, tile_rows: u32) {
    for blk in 0..QK_BLOCKS as u32 {
        tma::load_2d(
            map,
            dst + blk * tile_rows * ROW_BYTES,
            bar,
            (blk * BLOCK_COLS as u32) as i32,
            row,
        );
    }
}

/// Issue the TMA loads of `cols` query rows starting at global row `row` into `dst`.
///
/// # Safety
/// As [`load_kv_tile`]; `dst` holds 9 blocks of `cols` rows.
#[inline(always)]
pub unsafe fn load_q(map: *const TensorMap, dst: u32, bar: u32, row: i32, cols: u32) {
    for blk in 0..QK_BLOCKS as u32 {
        tma::load_2d(
            map,
            dst + blk * cols * ROW_BYTES,
            bar,
            (blk * BLOCK_COLS as u32) as i32,
            row,
        );
    }
}

/// D[64 x N] = A[64 x 576] · B[N x 576]^T, both operands K-major 128-byte-swizzled tiles of
/// nine 64-wide column blocks (`a_block` and `b_block` bytes apart): the 36 wgmmas of a score
/// tile (S^T = K·Q^T of the ETAP kernel, S = Q·K^T of the wide kernel), the first overwriting
/// `d`. The caller fences before and commits after.
///
/// # Safety
/// The whole warpgroup calls it, with both tiles loaded.
#[inline(always)]
pub unsafe fn gemm_k576<const N: usize, E: Elem>(d: &mut Frag, a: u32, a_block: u32, b: u32, b_block: u32) {
    for kk in 0..(QK_BLOCKS as u32 * STEPS_PER_BLOCK) {
        let blk = kk / STEPS_PER_BLOCK;
        let within = (kk % STEPS_PER_BLOCK) * K_STEP * 2;
        let da = Desc::k_major_sw128(a + blk * a_block + within);
        let db = Desc::k_major_sw128(b + blk * b_block + within);
        wgmma::mma::<N, 0, 0, E>(d, da, db, kk > 0);
    }
}

/// S^T[64 KV rows x NW] = K[64 x 576] · Q^T[576 x NW] for this warpgroup's NW columns, whose Q
/// rows start at `q_cols` (inside a Q tile of `q_rows` rows per block). Issues 36 wgmmas and
/// waits for them.
///
/// # Safety
/// The whole warpgroup calls it, with the page and Q loaded.
#[inline(always)]
pub unsafe fn scores_t<const NW: usize, E: Elem>(s: &mut Frag, page: u32, q_cols: u32, q_rows: u32, turn: Turn) {
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
pub unsafe fn accumulate_o_t<const NW: usize, E: Elem>(o: &mut [Frag; V_BLOCKS], page: u32, p: u32, turn: Turn) {
    let (page, p) = (smem::opaque(page), smem::opaque(p));
    turn.take();
    wgmma::fence();
    unroll!(c < V_BLOCKS, max 8 => {
        unroll!(j < STEPS_PER_BLOCK as usize, max 4 => {
            // 16 KV rows of 128 bytes per step.
            let a = Desc::m_major_sw128(page + c as u32 * BLOCK_BYTES + j as u32 * K_STEP * ROW_BYTES);
            let b = Desc::k_major_sw128(p + j as u32 * K_STEP * 2);
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
/// `visible[b]` is the number of KV rows of the request that the columns of 8-wide block `b`
/// see (one token per block: h_q is a multiple of 8); `row0` the request
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
        let v = if row0 + row < visible[i / 4] { s[i] * scale_log2 } else { f32::NEG_INFINITY };
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
        let m_new = math::fmax(st.m[slot], x);
        // A column that has seen no row yet keeps m = -inf; subtract 0 instead so that
        // exp2(-inf - m) is 0, not NaN.
        m_use[slot] = if m_new == f32::NEG_INFINITY { 0.0 } else { m_new };
        let alpha = math::exp2(st.m[slot] - m_use[slot]);
        st.m[slot] = m_new;
        st.l[slot] *= alpha;
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

/// Zero KV rows `first..64` of the V part of a page tile (8 blocks), so that rows past the
/// request's end, which may hold anything (NaN included), contribute 0 · P = 0 and not NaN.
/// Shared by `threads` threads, `rank` being this thread's index among them.
///
/// # Safety
/// No wgmma reads the tile meanwhile; the caller fences and synchronizes afterwards.
#[inline(always)]
pub unsafe fn zero_rows_from(page: u32, first: u32, rank: u32, threads: u32) {
    zero_tile_rows_from(page, PAGE_ROWS as u32, first, rank, threads)
}

/// [`zero_rows_from`] for a tile of `tile_rows` KV rows (blocks of `tile_rows` x 128 bytes).
///
/// # Safety
/// As [`zero_rows_from`].
#[inline(always)]
pub unsafe fn zero_tile_rows_from(page: u32, tile_rows: u32, first: u32, rank: u32, threads: u32) {
    let rows = tile_rows - first;
    // 16-byte chunks: 8 per 128-byte row, per block. The swizzle permutes chunks within a row,
    // so whole rows stay whole rows.
    let total = rows * V_BLOCKS as u32 * 8;
    let mut idx = rank;
    while idx < total {
        let chunk = idx % 8;
        let row = first + (idx / 8) % rows;
        let blk = idx / (8 * rows);
        smem::st_zero16(page + blk * tile_rows * ROW_BYTES + row * ROW_BYTES + chunk * 16);
        idx += threads;
    }
}

/// Wait for an mbarrier phase (re-exported for the kernels' readability).
///
/// # Safety
/// `bar` is an initialized mbarrier.
#[inline(always)]
pub unsafe fn wait(bar: u32, parity: u32) {
    mbarrier::wait(bar, parity)
}

// ---------------------------------------------------------------------------------------------
// Heads on M: the tile operations of the wide kernel (`decode_wide`), for requests with
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
    gemm_k576::<PAGE_ROWS, E>(s, q, WIDE_ROWS * ROW_BYTES, page, BLOCK_BYTES);
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

/// A segment's normalization of one row (or column): from its softmax sum `l` and running max
/// `m` (log2 units), `(1 / l, lse)` with the lse in natural-log units; `(0, -inf)` when the row
/// saw no KV row (`l = 0`). The decode kernels' segment ends all use it.
#[inline(always)]
pub fn normalizer(l: f32, m: f32) -> (f32, f32) {
    if l > 0.0 {
        // m and log2(l) are in log2 units.
        (
            1.0 / l,
            (m + math::ln(l) * core::f32::consts::LOG2_E) * core::f32::consts::LN_2,
        )
    } else {
        (0.0, f32::NEG_INFINITY)
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
    row_softmax_n::<{ PAGE_ROWS }>(s, st, visible, row0, scale_log2)
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
        let m_new = math::fmax(st.m[h], x * scale_log2);
        // A row that has seen no KV row yet keeps m = -inf; subtract 0 instead so that
        // exp2(-inf - m) is 0, not NaN.
        m_use[h] = if m_new == f32::NEG_INFINITY { 0.0 } else { m_new };
        alpha[h] = math::exp2(st.m[h] - m_use[h]);
        st.m[h] = m_new;
        st.l[h] *= alpha[h];
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
    unroll!(j < PAGE_ROWS / 4, max 16 => {
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
    unroll!(j < STEPS_PER_BLOCK as usize, max 4 => {
        let a = Desc::k_major_sw128(p_tile + j as u32 * K_STEP * 2);
        // 16 KV rows of 128 bytes per step.
        let b = Desc::m_major_sw128(page + vb0 * BLOCK_BYTES + j as u32 * K_STEP * ROW_BYTES);
        wgmma::mma_n256::<0, 1, E>(o, a, b, true);
    });
    wgmma::commit_group();
    wgmma::wait_group::<0>();
}

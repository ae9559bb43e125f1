//! The tile operations the decode kernels are written in, as ThunderKittens keeps its tile ops:
//! here the shared ones (load a KV page, load Q, the score GEMM, zero a partial page, the
//! segment's normalizer); in [`kv_on_m`] the ETAP kernel's (S^T = K·Q^T, the column softmax,
//! P^T to shared memory, O^T += V^T·P^T), in [`heads_on_m`] the wide kernel's (S = Q·K^T, the
//! row softmax, P and O).
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
use etap_core::{BLOCK_COLS, QK_BLOCKS, TILE_ROWS, V_BLOCKS};

pub mod heads_on_m;
pub mod kv_on_m;
pub use heads_on_m::*;
pub use kv_on_m::*;

/// Bytes of one [64 rows][64 cols] block of 16-bit elements: one TMA box of a KV page.
pub const BLOCK_BYTES: u32 = (TILE_ROWS * BLOCK_COLS * 2) as u32;
/// Bytes of a KV page in shared memory (9 blocks) and of one 128-byte swizzle row (64 16-bit
/// elements): the contract's.
pub use etap_core::contract::{ROW_BYTES, TILE_BYTES};
const _: () = assert!(TILE_BYTES == QK_BLOCKS as u32 * BLOCK_BYTES);
/// wgmma K per instruction for 16-bit operands.
pub const K_STEP: u32 = 16;
/// K steps in one 64-wide block (4 steps of 32 bytes along a swizzle row).
pub const STEPS_PER_BLOCK: u32 = BLOCK_COLS as u32 / K_STEP;

/// Turn-taking between the two consumer warpgroups for the tensor cores (FlashAttention-3's
/// "ping-pong"): a warpgroup waits for its turn before issuing a batch of wgmmas and hands the
/// turn over right after, so one warpgroup's softmax runs while the other's GEMMs do, instead
/// of both stopping the tensor cores for their softmax at the same time.
/// `SOLO`: one warpgroup computes alone (the FP8 kernel's consumer of all 16 columns), so there
/// is no turn to take or pass and both are nothing.
#[derive(Clone, Copy)]
pub struct Turn<const SOLO: bool = false> {
    /// Named barrier this warpgroup waits on ("my turn").
    pub mine: u32,
    /// Named barrier the other warpgroup waits on.
    pub theirs: u32,
}

impl<const SOLO: bool> Turn<SOLO> {
    /// Threads on each turn barrier: both consumer warpgroups.
    const THREADS: u32 = 2 * index::WARPGROUP;

    #[inline(always)]
    pub fn take(&self) {
        if !SOLO {
            sync::bar_sync(self.mine, Self::THREADS);
        }
    }

    #[inline(always)]
    pub fn pass(&self) {
        if !SOLO {
            sync::bar_arrive(self.theirs, Self::THREADS);
        }
    }
}

/// Per-thread accumulator fragment of an m64nN tile (N <= 64): the first N/2 floats are used.
pub type Frag = [f32; 32];

/// Issue the TMA loads of one box of rows (global rows `row..`, as many as `map`'s box has) of
/// all nine 64-column blocks, completing on `bar`: block `c` of the box goes to
/// `dst + c * block_bytes`. One thread calls it.
///
/// # Safety
/// `dst` is in a free tile whose blocks are `block_bytes` apart, 1024-aligned within each block
/// (the 128-byte swizzle's atom); `bar` an mbarrier whose phase expects these bytes.
#[inline(always)]
pub unsafe fn load_kv_rows(map: *const TensorMap, dst: u32, bar: u32, row: i32, block_bytes: u32) {
    for blk in 0..QK_BLOCKS as u32 {
        tma::load_2d(map, dst + blk * block_bytes, bar, (blk * BLOCK_COLS as u32) as i32, row);
    }
}

/// Issue the TMA loads of `cols` query rows starting at global row `row` into `dst`: nine
/// boxes of `cols` rows, as a KV tile's.
///
/// # Safety
/// As [`load_kv_rows`]; `dst` holds 9 blocks of `cols` rows.
#[inline(always)]
pub unsafe fn load_q(map: *const TensorMap, dst: u32, bar: u32, row: i32, cols: u32) {
    load_kv_rows(map, dst, bar, row, cols * ROW_BYTES)
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
    let (da, db) = (Desc::k_major_sw128(a), Desc::k_major_sw128(b));
    unroll!(blk < QK_BLOCKS, max 16 => {
        unroll!(j < STEPS_PER_BLOCK as usize, max 4 => {
            let within = j as u32 * K_STEP * 2;
            let a_k = da.advance(blk as u32 * a_block + within);
            let b_k = db.advance(blk as u32 * b_block + within);
            // The first step overwrites d (`blk` and `j` are constants: no comparison is made).
            let first = blk == 0 && j == 0;
            wgmma::mma::<N, 0, 0, E>(d, a_k, b_k, !first);
        });
    });
}

/// Zero KV rows `first..64` of the V part of a page tile (8 blocks), so that rows past the
/// request's end, which may hold anything (NaN included), contribute 0 · P = 0 and not NaN.
/// Shared by `threads` threads, `rank` being this thread's index among them.
///
/// # Safety
/// No wgmma reads the tile meanwhile; the caller fences and synchronizes afterwards.
#[inline(always)]
pub unsafe fn zero_rows_from(page: u32, first: u32, rank: u32, threads: u32) {
    let tile_rows = TILE_ROWS as u32;
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

/// One step of the online softmax for a row (or column) with running maximum `m` and sum `l`
/// (log2 units), given the new tile's maximum `tile_max`: updates both and returns the base to
/// subtract from the tile's scores and the factor `alpha = exp2(m_old - m_new)` that rescales
/// its O. Both layouts' softmax use it.
#[inline(always)]
pub fn online_step(m: &mut f32, l: &mut f32, tile_max: f32) -> (f32, f32) {
    let m_new = math::fmax(*m, tile_max);
    // A row that has seen nothing yet keeps m = -inf (and subtracts 0).
    let base = math::max_base(m_new);
    let alpha = math::exp2(*m - base);
    *m = m_new;
    *l *= alpha;
    (base, alpha)
}

/// Wait for an mbarrier phase (re-exported for the kernels' readability).
///
/// # Safety
/// `bar` is an initialized mbarrier.
#[inline(always)]
pub unsafe fn wait(bar: u32, parity: u32) {
    mbarrier::wait(bar, parity)
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

//! Warpgroup matrix multiply-accumulate (`wgmma`, sm_90a): fence/commit/wait, shared-memory
//! matrix descriptors, and `mma` for the tile widths the kernels use.
use super::wgmma_ops as ops;
use crate::elem::Elem;
use core::arch::asm;

/// Make register and shared-memory writes before it visible to the next `wgmma`s (needed
/// before the first `mma` and whenever accumulator registers were touched in between).
#[inline(always)]
pub fn fence() {
    // SAFETY: executed by the whole warpgroup at a convergent point.
    unsafe { asm!("wgmma.fence.sync.aligned;", options(nostack)) };
}

/// Close the group of `mma`s issued since the last commit.
#[inline(always)]
pub fn commit_group() {
    // SAFETY: as `fence`.
    unsafe { asm!("wgmma.commit_group.sync.aligned;", options(nostack)) };
}

/// Wait until at most `N` committed groups are still running.
#[inline(always)]
pub fn wait_group<const N: u32>() {
    // SAFETY: as `fence`.
    unsafe { asm!("wgmma.wait_group.sync.aligned {0};", const N, options(nostack)) };
}

/// Shared-memory layouts a descriptor can name. Only 128-byte swizzle and no swizzle are used.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Swizzle {
    None = 0,
    B128 = 1,
}

/// A wgmma shared-memory matrix descriptor (64 bits): start address, leading and stride byte
/// offsets (all in 16-byte units), and the swizzle mode in bits 62-63.
#[derive(Clone, Copy)]
pub struct Desc(pub u64);

impl Desc {
    /// Descriptor of a tile at shared address `addr` (1024-aligned for 128-byte swizzle, plus
    /// an offset inside the first swizzle row to step along K).
    #[inline(always)]
    pub const fn new(addr: u32, leading_bytes: u32, stride_bytes: u32, swizzle: Swizzle) -> Desc {
        Desc(
            ((addr as u64 >> 4) & 0x3fff)
                | (((leading_bytes as u64 >> 4) & 0x3fff) << 16)
                | (((stride_bytes as u64 >> 4) & 0x3fff) << 32)
                | ((swizzle as u64) << 62),
        )
    }

    /// The descriptor of the same layout `bytes` further on (a multiple of 16): its start
    /// address field plus `bytes / 16`, as one 32-bit add on the low word, so that a GEMM's
    /// wgmmas step from one base descriptor by constants instead of encoding each address
    /// again (a shift, a mask and an or per operand per wgmma: most of the consumers' issue
    /// slots, session 14's ncu). Exact while the address stays below 256 KiB, where the 14-bit
    /// field (16-byte units) ends: all of shared memory (at most 228 KiB on sm_90), so no
    /// carry reaches the leading offset.
    #[inline(always)]
    pub const fn advance(self, bytes: u32) -> Desc {
        let lo = self.0 as u32 + (bytes >> 4);
        Desc((self.0 & !0xffff_ffff) | lo as u64)
    }

    /// K-major operand, 128-byte swizzle: rows of 64 16-bit elements (128 bytes, contiguous
    /// along K), 8-row groups 1024 bytes apart. One 16-wide K step is 32 bytes further along
    /// the row, inside the swizzle atom; the leading offset is unused in this mode.
    #[inline(always)]
    pub const fn k_major_sw128(addr: u32) -> Desc {
        Desc::new(addr, 16, 1024, Swizzle::B128)
    }

    /// M-major (transposed) A operand, 128-byte swizzle: each 128-byte row holds 64 consecutive
    /// M elements of one K index; rows are consecutive K; 8-row groups (8 K) are 1024 bytes
    /// apart (the stride offset). M is exactly one swizzle row (64), so the leading offset,
    /// the step between 64-wide M blocks, is never used.
    #[inline(always)]
    pub const fn m_major_sw128(addr: u32) -> Desc {
        Desc::mn_major_sw128(addr, 8192)
    }

    /// An M- or N-major operand, 128-byte swizzle, wider than one swizzle row: its 64-element
    /// blocks (along M or N) lie `block_bytes` apart (the leading offset); within a block as
    /// [`Desc::m_major_sw128`] (e.g. V of a 32-row tile as N-major B: blocks 4 KiB apart).
    #[inline(always)]
    pub const fn mn_major_sw128(addr: u32, block_bytes: u32) -> Desc {
        Desc::new(addr, block_bytes, 1024, Swizzle::B128)
    }
}

/// D[64 x N] (+)= A[64 x 16] * B[16 x N] for N in 8, 16, ..., 64 (a multiple of 8). The
/// accumulator array holds 32 floats (the most, N = 64); the first N/2 are the fragment.
/// `TA` = 1 reads A M-major (transposed); `TB` = 1 reads B N-major (transposed).
///
/// # Safety
/// As [`ops::mma_bf16_n8`]: the whole warpgroup, between `fence` and `commit_group`, with
/// descriptors into valid shared memory.
#[inline(always)]
pub unsafe fn mma<const N: usize, const TA: u32, const TB: u32, E: Elem>(
    d: &mut [f32; 32],
    a: Desc,
    b: Desc,
    accumulate: bool,
) {
    let acc = accumulate as u32;
    macro_rules! arm {
        ($bf:ident, $hf:ident, $k:literal) => {{
            // SAFETY: $k <= 32, so the first $k floats of `d` are in bounds.
            let frag = &mut *(d.as_mut_ptr() as *mut [f32; $k]);
            if E::F16 {
                ops::$hf::<TA, TB>(frag, a.0, b.0, acc)
            } else {
                ops::$bf::<TA, TB>(frag, a.0, b.0, acc)
            }
        }};
    }
    match N {
        8 => arm!(mma_bf16_n8, mma_f16_n8, 4),
        16 => arm!(mma_bf16_n16, mma_f16_n16, 8),
        24 => arm!(mma_bf16_n24, mma_f16_n24, 12),
        32 => arm!(mma_bf16_n32, mma_f16_n32, 16),
        40 => arm!(mma_bf16_n40, mma_f16_n40, 20),
        48 => arm!(mma_bf16_n48, mma_f16_n48, 24),
        56 => arm!(mma_bf16_n56, mma_f16_n56, 28),
        64 => arm!(mma_bf16_n64, mma_f16_n64, 32),
        _ => super::sync::trap(),
    }
}

/// D[64 x 256] (+)= A[64 x 16] * B[16 x 256]: 128 accumulator floats per thread (the wide
/// kernel's O = P·V, one instruction per K step for a warpgroup's 256 features). `TA`, `TB`
/// as in [`mma`].
///
/// # Safety
/// As [`mma`].
#[inline(always)]
pub unsafe fn mma_n256<const TA: u32, const TB: u32, E: Elem>(d: &mut [f32; 128], a: Desc, b: Desc, accumulate: bool) {
    let acc = accumulate as u32;
    if E::F16 {
        ops::mma_f16_n256::<TA, TB>(d, a.0, b.0, acc)
    } else {
        ops::mma_bf16_n256::<TA, TB>(d, a.0, b.0, acc)
    }
}

/// D[64 x 256] (+)= A[64 x 16] * B[16 x 256] with A from registers: `a` is the thread's m64k16
/// A fragment, elements (row, k) at the positions `frag_pos` gives an m64n16 accumulator, two
/// per register (the low half first). `TB` as in [`mma`].
///
/// # Safety
/// As [`mma`]; `fence` also after `a`'s registers were last written.
#[inline(always)]
pub unsafe fn mma_rs_n256<const TB: u32, E: Elem>(d: &mut [f32; 128], a: [u32; 4], b: Desc, accumulate: bool) {
    let acc = accumulate as u32;
    if E::F16 {
        ops::mma_rs_f16_n256::<TB>(d, a, b.0, acc)
    } else {
        ops::mma_rs_bf16_n256::<TB>(d, a, b.0, acc)
    }
}

/// Where accumulator element `i` (0..N/2) of thread `t` (0..128) of an m64nN fragment sits:
/// (row, column). Rows: warp `t / 32` owns rows 16w..16w+15; lane `l` holds rows l/4 and
/// l/4 + 8 of them. Columns: pairs 2(l%4), +1 in each 8-wide block. The same for every N
/// (8 to 256).
#[inline(always)]
pub const fn frag_pos(t: u32, i: u32) -> (u32, u32) {
    let w = t / 32;
    let l = t % 32;
    let row = 16 * w + l / 4 + 8 * ((i / 2) % 2);
    let col = 8 * (i / 4) + 2 * (l % 4) + (i % 2);
    (row, col)
}

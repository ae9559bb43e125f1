//! Thread, warp and block coordinates (PTX special registers).
use core::arch::asm;

macro_rules! special_reg {
    ($(#[$m:meta])* $name:ident, $reg:literal) => {
        $(#[$m])*
        #[inline(always)]
        pub fn $name() -> u32 {
            let r: u32;
            // SAFETY: reading a special register has no side effects.
            unsafe { asm!(concat!("mov.u32 {0}, ", $reg, ";"), out(reg32) r, options(pure, nomem, nostack)) };
            r
        }
    };
}

special_reg!(/// `threadIdx.x`.
    thread_x, "%tid.x");
special_reg!(/// `blockIdx.x`.
    block_x, "%ctaid.x");
special_reg!(/// `blockIdx.y`.
    block_y, "%ctaid.y");
special_reg!(/// `blockIdx.z`.
    block_z, "%ctaid.z");
special_reg!(/// `gridDim.x`.
    grid_x, "%nctaid.x");
special_reg!(/// `gridDim.y`.
    grid_y, "%nctaid.y");
special_reg!(/// `blockDim.x`.
    block_dim_x, "%ntid.x");

/// This decode CTA's part (the scheduler's work range it runs) and column group: the decode
/// grid is (column groups, parts), groups on x, so that the groups of one part are consecutive
/// CTAs, which the hardware starts side by side: they read the same pages (at 128 columns,
/// both from the L2: docs/perf-notes.md).
#[inline(always)]
pub fn part() -> u32 {
    block_y()
}

/// This decode CTA's column group (see [`part`]).
#[inline(always)]
pub fn group() -> u32 {
    block_x()
}

/// The decode grid's parts (see [`part`]).
#[inline(always)]
pub fn parts() -> u32 {
    grid_y()
}

/// The decode grid's column groups (see [`part`]).
#[inline(always)]
pub fn groups() -> u32 {
    grid_x()
}

/// Threads in a warp.
pub const WARP: u32 = 32;
/// Threads in a warpgroup: the four consecutive warps that issue one `wgmma` together.
pub const WARPGROUP: u32 = 128;

/// Lane within the warp.
#[inline(always)]
pub fn lane() -> u32 {
    thread_x() % WARP
}

/// Warp index within the CTA.
#[inline(always)]
pub fn warp() -> u32 {
    thread_x() / WARP
}

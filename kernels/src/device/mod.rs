//! A small device runtime of our own: the few PTX primitives the MLA kernels need, each a thin
//! wrapper over inline PTX, in the spirit of rust-cuda's `cuda_std` (which cannot be built for
//! rustc's mainline NVPTX target; docs/build.md says why).
//!
//! - [`index`]: thread, warp and block coordinates.
//! - [`sync`]: CTA and named barriers, proxy fences, warp shuffles.
//! - [`smem`]: the dynamic shared-memory window and typed shared loads/stores.
//! - [`mbarrier`]: transaction-counting barriers that TMA copies complete on.
//! - [`tma`]: the bulk tensor copy engine (`cp.async.bulk.tensor`).
//! - [`wgmma`]: warpgroup matrix multiply (fence/commit/wait, descriptors, `mma_async`).
//! - [`math`]: `ex2.approx`, conversions to bf16/f16 pairs.
//! - [`global`]: gpu-scope counters and L2-only loads between the CTAs of a grid.
//!
//! Everything here is `#[inline(always)]`: these are single instructions, and keeping them
//! inlined keeps accumulator fragments in registers.
pub mod global;
pub mod index;
pub mod math;
pub mod mbarrier;
pub mod smem;
pub mod sync;
pub mod tma;
pub mod wgmma;
#[allow(clippy::missing_safety_doc)]
pub mod wgmma_ops;

/// Fully unrolled loop with a compile-time index: `unroll!(i < N, max 16 => { .. })` runs the
/// body for i = 0..N, with `i` a `const`; N must be known at compile time (after
/// monomorphization) and at most the given max (2, 4, 8, 16 or 32: the largest index the body may see,
/// so that no out-of-range constant index appears even in the dead copies).
///
/// Register arrays (wgmma accumulator fragments, per-column softmax state) stay in registers
/// only if every index is a constant; LLVM's unroller declines loops whose bodies hold much
/// inline asm, which would send the arrays to local memory. This makes the unrolling explicit.
#[macro_export]
macro_rules! unroll {
    ($i:ident < $n:expr, max 2 => $body:block) => {
        $crate::unroll!(@go $i, $n, $body, 0 1)
    };
    ($i:ident < $n:expr, max 4 => $body:block) => {
        $crate::unroll!(@go $i, $n, $body, 0 1 2 3)
    };
    ($i:ident < $n:expr, max 8 => $body:block) => {
        $crate::unroll!(@go $i, $n, $body, 0 1 2 3 4 5 6 7)
    };
    ($i:ident < $n:expr, max 16 => $body:block) => {
        $crate::unroll!(@go $i, $n, $body, 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15)
    };
    ($i:ident < $n:expr, max 32 => $body:block) => {
        $crate::unroll!(@go $i, $n, $body, 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31)
    };
    (@go $i:ident, $n:expr, $body:block, $($k:literal)*) => {{
        $(
            if $k < $n {
                #[allow(non_upper_case_globals)]
                const $i: usize = $k;
                $body
            }
        )*
    }};
}

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
//!
//! Everything here is `#[inline(always)]`: these are single instructions, and keeping them
//! inlined keeps accumulator fragments in registers.
pub mod index;
pub mod math;
pub mod mbarrier;
pub mod smem;
pub mod sync;
pub mod tma;
pub mod wgmma;
#[allow(clippy::missing_safety_doc)]
pub mod wgmma_ops;

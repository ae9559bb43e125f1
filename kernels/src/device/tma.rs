//! The bulk tensor copy engine (TMA): one thread asks for a whole 2-D box of a tensor, the
//! engine writes it to shared memory in the tensor map's swizzled layout and completes the
//! bytes on an mbarrier. Coordinates outside the tensor are not read: the box is filled with
//! zeros there, which is what makes a bad block-table entry unable to read out of bounds.
use core::arch::asm;

/// A CUtensorMap (128 bytes, 64-byte aligned), built on the host by `cuTensorMapEncodeTiled`
/// and kept in global memory (the contract's type).
pub use etap_core::contract::TensorMap;

/// Copy the box at (`col`, `row`) (innermost coordinate first) of `map` to shared address
/// `dst`, completing on mbarrier `bar`.
///
/// # Safety
/// `map` points to a valid tensor map in global memory; `dst` is a shared buffer large enough
/// for the box, aligned as its swizzle needs (1024 bytes for 128-byte swizzle); `bar` is an
/// initialized mbarrier whose current phase expects these bytes.
#[inline(always)]
pub unsafe fn load_2d(map: *const TensorMap, dst: u32, bar: u32, col: i32, row: i32) {
    asm!(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [{0}], [{1}, {{{2}, {3}}}], [{4}];",
        in(reg32) dst,
        in(reg64) map,
        in(reg32) col,
        in(reg32) row,
        in(reg32) bar,
        options(nostack),
    );
}

/// Acquire a tensor map that the host wrote to global memory (with a copy) for the tensormap
/// proxy the copy engine reads it through. Required once per CTA before the map's first use;
/// without it the engine may see stale bytes.
///
/// # Safety
/// `map` points to a valid tensor map in global memory.
#[inline(always)]
pub unsafe fn acquire_map(map: *const TensorMap) {
    asm!("fence.proxy.tensormap::generic.acquire.sys [{0}], 128;", in(reg64) map, options(nostack));
}

/// Bring the tensor map into the TMA unit's cache ahead of its first use.
///
/// # Safety
/// `map` points to a valid tensor map in global memory.
#[inline(always)]
pub unsafe fn prefetch_map(map: *const TensorMap) {
    asm!("prefetch.tensormap [{0}];", in(reg64) map, options(nostack));
}

/// Ask the copy engine to bring the box at (`col`, `row`) of `map` into L2, with no shared
/// memory and no mbarrier: a hint, which the engine may drop, for loads that follow. Coordinates
/// outside the tensor are not read.
///
/// # Safety
/// `map` points to a valid tensor map in global memory, acquired by this CTA.
#[inline(always)]
pub unsafe fn prefetch_2d(map: *const TensorMap, col: i32, row: i32) {
    asm!(
        "cp.async.bulk.prefetch.tensor.2d.L2.global.tile [{0}, {{{1}, {2}}}];",
        in(reg64) map,
        in(reg32) col,
        in(reg32) row,
        options(nostack),
    );
}

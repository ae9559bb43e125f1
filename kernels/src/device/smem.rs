//! The dynamic shared-memory window and typed accesses to it.
//!
//! Shared memory is addressed with 32-bit `.shared` addresses (`u32`), the form `cp.async`,
//! `mbarrier`, TMA and wgmma descriptors take.
use core::arch::{asm, global_asm};

// The CTA's dynamic shared memory. 1024-byte alignment is what the 128-byte swizzle pattern
// repeats over; tiles placed at multiples of 1024 from here decode with a zero base offset.
global_asm!(".extern .shared .align 1024 .b8 ETAP_SMEM[];");

/// Shared-memory address of the start of the dynamic window.
#[inline(always)]
pub fn base() -> u32 {
    let r: u32;
    // SAFETY: takes the address of a symbol; no memory is touched.
    unsafe { asm!("mov.u32 {0}, ETAP_SMEM;", out(reg32) r, options(pure, nomem, nostack)) };
    r
}

/// Store a 16-bit value.
///
/// # Safety
/// `addr` must lie inside the dynamic window the kernel was launched with.
#[inline(always)]
pub unsafe fn st_u16(addr: u32, v: u16) {
    asm!("st.shared.u16 [{0}], {1};", in(reg32) addr, in(reg16) v, options(nostack));
}

/// Store a 32-bit value.
///
/// # Safety
/// As [`st_u16`], and `addr` 4-byte aligned.
#[inline(always)]
pub unsafe fn st_u32(addr: u32, v: u32) {
    asm!("st.shared.u32 [{0}], {1};", in(reg32) addr, in(reg32) v, options(nostack));
}

/// Store an f32.
///
/// # Safety
/// As [`st_u32`].
#[inline(always)]
pub unsafe fn st_f32(addr: u32, v: f32) {
    asm!("st.shared.f32 [{0}], {1};", in(reg32) addr, in(reg32) v, options(nostack));
}

/// Store an f32 in the threads where `pred` holds, as one predicated instruction (no branch:
/// see `mbarrier::arrive_if`).
///
/// # Safety
/// As [`st_u32`] (for the threads that store).
#[inline(always)]
pub unsafe fn st_f32_if(pred: bool, addr: u32, v: f32) {
    asm!(
        "{{ .reg .pred p; setp.ne.u32 p, {2}, 0; @p st.shared.f32 [{0}], {1}; }}",
        in(reg32) addr,
        in(reg32) v,
        in(reg32) pred as u32,
        options(nostack)
    );
}

/// Load an f32.
///
/// # Safety
/// As [`st_u32`].
#[inline(always)]
pub unsafe fn ld_f32(addr: u32) -> f32 {
    let r: f32;
    asm!("ld.shared.f32 {0}, [{1}];", out(reg32) r, in(reg32) addr, options(nostack, readonly));
    r
}

/// Store four 32-bit words (16 bytes).
///
/// # Safety
/// As [`st_u16`], and `addr` 16-byte aligned.
#[inline(always)]
pub unsafe fn st_v4_u32(addr: u32, v: [u32; 4]) {
    asm!(
        "st.shared.v4.u32 [{0}], {{{1}, {2}, {3}, {4}}};",
        in(reg32) addr,
        in(reg32) v[0],
        in(reg32) v[1],
        in(reg32) v[2],
        in(reg32) v[3],
        options(nostack)
    );
}

/// Load four 32-bit words (16 bytes).
///
/// # Safety
/// As [`st_v4_u32`].
#[inline(always)]
pub unsafe fn ld_v4_u32(addr: u32) -> [u32; 4] {
    let (a, b, c, d): (u32, u32, u32, u32);
    asm!(
        "ld.shared.v4.u32 {{{0}, {1}, {2}, {3}}}, [{4}];",
        out(reg32) a,
        out(reg32) b,
        out(reg32) c,
        out(reg32) d,
        in(reg32) addr,
        options(nostack, readonly)
    );
    [a, b, c, d]
}

/// Load two 32-bit words (8 bytes).
///
/// # Safety
/// As [`st_u16`], and `addr` 8-byte aligned.
#[inline(always)]
pub unsafe fn ld_v2_u32(addr: u32) -> [u32; 2] {
    let (a, b): (u32, u32);
    asm!(
        "ld.shared.v2.u32 {{{0}, {1}}}, [{2}];",
        out(reg32) a,
        out(reg32) b,
        in(reg32) addr,
        options(nostack, readonly)
    );
    [a, b]
}

/// Store two f32 (8 bytes).
///
/// # Safety
/// As [`st_u16`], and `addr` 8-byte aligned.
#[inline(always)]
pub unsafe fn st_v2_f32(addr: u32, v: [f32; 2]) {
    asm!("st.shared.v2.f32 [{0}], {{{1}, {2}}};", in(reg32) addr, in(reg32) v[0], in(reg32) v[1], options(nostack));
}

/// Load two f32 (8 bytes).
///
/// # Safety
/// As [`st_v2_f32`].
#[inline(always)]
pub unsafe fn ld_v2_f32(addr: u32) -> [f32; 2] {
    let (a, b): (f32, f32);
    asm!(
        "ld.shared.v2.f32 {{{0}, {1}}}, [{2}];",
        out(reg32) a,
        out(reg32) b,
        in(reg32) addr,
        options(nostack, readonly)
    );
    [a, b]
}

/// Store 16 zero bytes.
///
/// # Safety
/// As [`st_u16`], and `addr` 16-byte aligned.
#[inline(always)]
pub unsafe fn st_zero16(addr: u32) {
    asm!("st.shared.v4.u32 [{0}], {{0, 0, 0, 0}};", in(reg32) addr, options(nostack));
}

/// Byte offset of element (`row`, `col`) of a 16-bit tile stored as rows of 64 elements
/// (128 bytes) with the 128-byte swizzle: the 16-byte chunk `col / 8` of row `row` is stored at
/// chunk `(col / 8) ^ (row % 8)`. This is the layout TMA writes with `SWIZZLE_128B` and the
/// layout wgmma reads with a 128-byte-swizzle descriptor; the tile must start 1024-aligned.
#[inline(always)]
pub const fn sw128_offset(row: u32, col: u32) -> u32 {
    row * 128 + (((col / 8) ^ (row % 8)) * 16) + (col % 8) * 2
}

/// The same address, hidden from the optimizer: LLVM hoists loop-invariant shared-memory
/// addresses out of the page loop and keeps dozens of them live across it, which pushes the
/// 64-column decode kernel past its register budget into spills. Re-deriving an address
/// through this (one `mov`) where it is used keeps it short-lived.
#[inline(always)]
pub fn opaque(addr: u32) -> u32 {
    let r: u32;
    // SAFETY: a register move; not `pure`, so it is neither hoisted nor merged.
    unsafe { asm!("mov.u32 {0}, {1};", out(reg32) r, in(reg32) addr, options(nomem, nostack)) };
    r
}

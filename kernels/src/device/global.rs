//! Global memory shared between the CTAs of one grid: gpu-scope release/acquire counters and
//! L2-only loads, for the split merge that the decode kernels do themselves (`merge`).
//!
//! The pattern is CUTLASS's split-K semaphore: the writers of a result pass a CTA-level
//! barrier, then one thread issues a gpu-scope release fence and a relaxed atomic add; a reader
//! spins with gpu-scope acquire loads, then passes a barrier before its threads read.
use core::arch::asm;

/// In the threads where `pred` holds: add `v` to `*ptr` after a gpu-scope release fence, so
/// that every write this thread has made, or has observed (through a barrier before it), is
/// visible to a thread that acquires the new value. Predicated instructions, no branch (see
/// `mbarrier::arrive_if`).
///
/// # Safety
/// `ptr` points to a live, 4-byte aligned `u32` in global memory (in the threads that add).
#[inline(always)]
pub unsafe fn release_add_if(pred: bool, ptr: *mut u32, v: u32) {
    asm!(
        "{{ .reg .pred p; setp.ne.u32 p, {2}, 0;",
        "@p fence.acq_rel.gpu;",
        "@p red.relaxed.gpu.global.add.u32 [{0}], {1}; }}",
        in(reg64) ptr,
        in(reg32) v,
        in(reg32) pred as u32,
        options(nostack)
    );
}

/// Load `*ptr` with gpu-scope acquire semantics.
///
/// # Safety
/// As [`release_add_if`].
#[inline(always)]
pub unsafe fn ld_acquire(ptr: *const u32) -> u32 {
    let r: u32;
    asm!("ld.acquire.gpu.global.u32 {0}, [{1}];", out(reg32) r, in(reg64) ptr, options(nostack));
    r
}

/// Spin until `*ptr - target`, read as a wrapping difference, is no longer negative: the
/// counter has reached `target`. Traps after about a second, as
/// `mbarrier::wait` does, instead of hanging the GPU on a bug.
///
/// # Safety
/// As [`release_add_if`]; every CTA that adds to the counter is resident (a cooperative launch).
#[inline(always)]
pub unsafe fn wait_reached(ptr: *const u32, target: u32) {
    let mut tries = 0u32;
    while (ld_acquire(ptr).wrapping_sub(target) as i32) < 0 {
        asm!("nanosleep.u32 64;", options(nostack));
        tries += 1;
        if tries == SPIN_LIMIT {
            super::sync::trap();
        }
    }
}

/// Add 1 to `*ptr`, and set it to 0 when it held `last` before the add (the last of the
/// counter's users this launch). Relaxed: the reset is read by the next launch on the stream,
/// which a kernel boundary orders after this one.
///
/// # Safety
/// As [`release_add_if`], in one thread.
#[inline(always)]
pub unsafe fn leave_and_reset(ptr: *mut u32, last: u32) {
    asm!(
        "{{ .reg .pred p; .reg .b32 old;",
        "atom.relaxed.gpu.global.add.u32 old, [{0}], 1;",
        "setp.eq.u32 p, old, {1};",
        "@p st.relaxed.gpu.global.u32 [{0}], 0; }}",
        in(reg64) ptr,
        in(reg32) last,
        options(nostack)
    );
}

/// Polls after which [`wait_reached`] gives up (at 64 ns or more a poll: over a second).
pub const SPIN_LIMIT: u32 = 1 << 24;

/// Load 4 f32 through L2 only (`.cg`): data other CTAs of this grid wrote, never a stale L1 line.
///
/// # Safety
/// `ptr` points to 4 live f32 in global memory, 16-byte aligned.
#[inline(always)]
pub unsafe fn ld_cg_f32x4(ptr: *const f32) -> [f32; 4] {
    let (a, b, c, d): (f32, f32, f32, f32);
    asm!(
        "ld.global.cg.v4.f32 {{{0}, {1}, {2}, {3}}}, [{4}];",
        out(reg32) a,
        out(reg32) b,
        out(reg32) c,
        out(reg32) d,
        in(reg64) ptr,
        options(pure, readonly, nostack)
    );
    [a, b, c, d]
}

/// Load one f32 through L2 only.
///
/// # Safety
/// `ptr` points to a live f32 in global memory.
#[inline(always)]
pub unsafe fn ld_cg_f32(ptr: *const f32) -> f32 {
    let r: f32;
    asm!("ld.global.cg.f32 {0}, [{1}];", out(reg32) r, in(reg64) ptr, options(pure, readonly, nostack));
    r
}

/// Store an f32 in the threads where `pred` holds, as one predicated instruction: no branch,
/// so the warp stays converged for the shuffles after it (see `mbarrier::arrive_if`).
///
/// # Safety
/// `ptr` points to a live f32 in global memory (in the threads that store).
#[inline(always)]
pub unsafe fn st_f32_if(pred: bool, ptr: *mut f32, v: f32) {
    asm!(
        "{{ .reg .pred p; setp.ne.u32 p, {2}, 0; @p st.global.f32 [{0}], {1}; }}",
        in(reg64) ptr,
        in(reg32) v,
        in(reg32) pred as u32,
        options(nostack)
    );
}

/// Store 8 bytes (two 32-bit words) where `pred` holds, as one predicated instruction.
///
/// # Safety
/// `ptr` points to 8 live, 8-byte aligned bytes of global memory (in the threads that store).
#[inline(always)]
pub unsafe fn st_u32x2_if(pred: bool, ptr: *mut u32, v: [u32; 2]) {
    asm!(
        "{{ .reg .pred p; setp.ne.u32 p, {3}, 0; @p st.global.v2.u32 [{0}], {{{1}, {2}}}; }}",
        in(reg64) ptr,
        in(reg32) v[0],
        in(reg32) v[1],
        in(reg32) pred as u32,
        options(nostack)
    );
}

/// Load 8 bytes that no thread writes while the kernel runs (the cache), through the
/// non-coherent path and without allocating in L1 (each is read once per CTA).
///
/// # Safety
/// `ptr` points to 8 live, 8-byte aligned bytes of global memory.
#[inline(always)]
pub unsafe fn ld_nc_u32x2(ptr: *const u8) -> [u32; 2] {
    let (a, b): (u32, u32);
    asm!(
        "ld.global.nc.L1::no_allocate.v2.u32 {{{0}, {1}}}, [{2}];",
        out(reg32) a,
        out(reg32) b,
        in(reg64) ptr,
        options(readonly, nostack)
    );
    [a, b]
}

/// [`ld_nc_u32x2`] for 16 bytes.
///
/// # Safety
/// `ptr` points to 16 live, 16-byte aligned bytes of global memory, unwritten while the
/// kernel runs.
#[inline(always)]
pub unsafe fn ld_nc_u32x4(ptr: *const u8) -> [u32; 4] {
    let (a, b, c, d): (u32, u32, u32, u32);
    asm!(
        "ld.global.nc.L1::no_allocate.v4.u32 {{{0}, {1}, {2}, {3}}}, [{4}];",
        out(reg32) a,
        out(reg32) b,
        out(reg32) c,
        out(reg32) d,
        in(reg64) ptr,
        options(readonly, nostack)
    );
    [a, b, c, d]
}

/// [`ld_nc_u32x2`] for one f32.
///
/// # Safety
/// `ptr` points to a live, 4-byte aligned f32 of global memory, unwritten while the kernel runs.
#[inline(always)]
pub unsafe fn ld_nc_f32(ptr: *const u8) -> f32 {
    let r: f32;
    asm!(
        "ld.global.nc.L1::no_allocate.f32 {0}, [{1}];",
        out(reg32) r,
        in(reg64) ptr,
        options(readonly, nostack)
    );
    r
}

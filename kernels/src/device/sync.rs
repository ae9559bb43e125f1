//! Barriers, fences and warp shuffles.
use core::arch::asm;

// Barriers use `barrier.sync`, not `bar.sync`: `bar.sync` is `barrier.sync.aligned`, which
// requires every thread of a warp to execute the *same* instruction. Inline asm cannot be
// marked convergent, so LLVM may duplicate a barrier into both arms of a divergent branch
// (it does: tail duplication after `if thread == 0 { .. }`), and with `.aligned` that hangs
// the CTA. The non-aligned form is defined for divergent warps (sm_70+).

/// `__syncthreads()`: barrier 0 over the whole CTA.
#[inline(always)]
pub fn sync_threads() {
    // SAFETY: every thread of the CTA reaches this barrier.
    unsafe { asm!("barrier.sync 0;", options(nostack)) };
}

/// Named barrier `id` (1..16) over `count` threads (a multiple of 32): lets one warpgroup
/// synchronize without stopping the others.
#[inline(always)]
pub fn bar_sync(id: u32, count: u32) {
    // SAFETY: exactly `count` threads use barrier `id` at this point of the program.
    unsafe { asm!("barrier.sync {0}, {1};", in(reg32) id, in(reg32) count, options(nostack)) };
}

/// Arrive at named barrier `id` (counting `count` threads in all) without waiting: the
/// producer side of a barrier that other threads `bar_sync` on.
#[inline(always)]
pub fn bar_arrive(id: u32, count: u32) {
    // SAFETY: the matching `bar_sync` side completes the barrier with the same `count`.
    unsafe { asm!("barrier.arrive {0}, {1};", in(reg32) id, in(reg32) count, options(nostack)) };
}

/// Make this thread's ordinary shared-memory writes visible to the async proxy (the tensor
/// cores reading wgmma operands, the TMA engine). Put it before the barrier that hands the data
/// over.
#[inline(always)]
pub fn fence_proxy_async_shared() {
    // SAFETY: a fence has no operands.
    unsafe { asm!("fence.proxy.async.shared::cta;", options(nostack)) };
}

/// Order the initialization of mbarriers before their use by other threads and the TMA engine.
#[inline(always)]
pub fn fence_mbarrier_init() {
    // SAFETY: a fence has no operands.
    unsafe { asm!("fence.mbarrier_init.release.cluster;", options(nostack)) };
}

/// Butterfly shuffle of an f32 within the warp (all 32 lanes take part).
#[inline(always)]
pub fn shfl_xor_f32(v: f32, mask: u32) -> f32 {
    let r: f32;
    // SAFETY: all lanes of the warp execute it (full member mask).
    unsafe {
        asm!("shfl.sync.bfly.b32 {0}, {1}, {2}, 0x1f, 0xffffffff;", out(reg32) r, in(reg32) v, in(reg32) mask, options(nostack))
    };
    r
}

/// Lane 0's `v`, in every lane: a value the compiler then knows to be warp-uniform (as
/// CUTLASS's `canonical_warp_group_idx`), for the warpgroup index that role branches test.
#[inline(always)]
pub fn warp_uniform(v: u32) -> u32 {
    let r: u32;
    // SAFETY: all lanes of the warp execute it (full member mask).
    unsafe { asm!("shfl.sync.idx.b32 {0}, {1}, 0, 0x1f, 0xffffffff;", out(reg32) r, in(reg32) v, options(nostack)) };
    r
}

/// True in every lane when `pred` holds in every lane of the warp (all 32 lanes take part).
#[inline(always)]
pub fn warp_all(pred: bool) -> bool {
    let r: u32;
    // SAFETY: all lanes of the warp execute it (full member mask).
    unsafe {
        asm!(
            "{{ .reg .pred p, q; setp.ne.u32 p, {1}, 0; vote.sync.all.pred q, p, 0xffffffff; selp.u32 {0}, 1, 0, q; }}",
            out(reg32) r,
            in(reg32) pred as u32,
            options(nostack)
        )
    };
    r != 0
}

/// Programmatic dependent launch (sm_90): wait until the grids this one depends on in its
/// stream have completed and their writes are visible (`griddepcontrol.wait`; returns at once
/// when the launch had no programmatic dependency).
#[inline(always)]
pub fn grid_dependency_wait() {
    // SAFETY: a wait on the grids before; no operands.
    unsafe { asm!("griddepcontrol.wait;", options(nostack)) }
}

/// Programmatic dependent launch: let the next grid of the stream launch as SMs free up
/// (`griddepcontrol.launch_dependents`); its CTAs still wait for this grid's end before they
/// read anything (`grid_dependency_wait`).
#[inline(always)]
pub fn launch_dependents() {
    // SAFETY: a scheduling hint; no operands.
    unsafe { asm!("griddepcontrol.launch_dependents;", options(nostack)) }
}

/// Stop the kernel with an error (the launch then fails with an illegal-instruction error).
#[inline(always)]
pub fn trap() -> ! {
    // SAFETY: `trap` aborts the kernel; nothing runs after it.
    unsafe { asm!("trap;", options(noreturn, nostack)) }
}

/// Lower (`dec`: a producer gives its registers to the consumers) or raise (`inc`) this
/// warpgroup's register allocation to `n` per thread (`setmaxnreg`, sm_90a). All warps of the
/// warpgroup execute it. A macro, not a function of a const generic, so that `n` may be a
/// constant expression of the caller's own generic parameters (an asm `const` operand takes
/// one; a const generic argument does not).
macro_rules! setmaxnreg {
    (dec, $n:expr) => {
        // SAFETY: executed convergently by a whole warpgroup; the kernel has a register cap at
        // entry (the module is loaded with a max-registers JIT option).
        unsafe { core::arch::asm!("setmaxnreg.dec.sync.aligned.u32 {0};", const $n, options(nostack)) }
    };
    (inc, $n:expr) => {
        // SAFETY: as for `dec`.
        unsafe { core::arch::asm!("setmaxnreg.inc.sync.aligned.u32 {0};", const $n, options(nostack)) }
    };
}
pub(crate) use setmaxnreg;

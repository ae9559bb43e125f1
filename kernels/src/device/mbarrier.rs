//! mbarriers: shared-memory barriers that count arrivals and, for TMA, bytes.
//!
//! Phases alternate; a waiter passes once the phase with the given parity has completed.
use core::arch::asm;

/// Initialize the barrier at `addr` to expect `count` arrivals per phase.
///
/// # Safety
/// `addr` is an 8-byte aligned shared address reserved for this barrier; one thread initializes
/// it, followed by [`super::sync::fence_mbarrier_init`] and a CTA barrier before any use.
#[inline(always)]
pub unsafe fn init(addr: u32, count: u32) {
    asm!("mbarrier.init.shared::cta.b64 [{0}], {1};", in(reg32) addr, in(reg32) count, options(nostack));
}

/// Arrive once.
///
/// # Safety
/// `addr` is an initialized barrier.
#[inline(always)]
pub unsafe fn arrive(addr: u32) {
    asm!("mbarrier.arrive.shared::cta.b64 _, [{0}];", in(reg32) addr, options(nostack));
}

/// [`arrive`] by the threads where `pred` holds, as one predicated instruction: no branch,
/// so the warp stays converged for the warp-synchronous code after it (a branch around inline
/// asm cannot be if-converted, and the warp then runs later `shfl.sync`s diverged, through
/// ptxas's slow WARPSYNC.COLLECTIVE path).
///
/// # Safety
/// As [`arrive`].
#[inline(always)]
pub unsafe fn arrive_if(pred: bool, addr: u32) {
    asm!(
        "{{ .reg .pred p; setp.ne.u32 p, {1}, 0; @p mbarrier.arrive.shared::cta.b64 _, [{0}]; }}",
        in(reg32) addr,
        in(reg32) pred as u32,
        options(nostack)
    );
}

/// Arrive once and announce `bytes` of transactions (TMA copies) that complete this phase.
///
/// # Safety
/// `addr` is an initialized barrier.
#[inline(always)]
pub unsafe fn arrive_expect_tx(addr: u32, bytes: u32) {
    asm!("mbarrier.arrive.expect_tx.shared::cta.b64 _, [{0}], {1};", in(reg32) addr, in(reg32) bytes, options(nostack));
}

/// Test once whether the phase of parity `parity` has completed (with a bounded hardware
/// suspend inside `try_wait`).
///
/// # Safety
/// `addr` is an initialized barrier.
#[inline(always)]
pub unsafe fn try_wait(addr: u32, parity: u32) -> bool {
    let done: u32;
    asm!(
        "{{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [{1}], {2}; selp.u32 {0}, 1, 0, p; }}",
        out(reg32) done,
        in(reg32) addr,
        in(reg32) parity,
        options(nostack),
    );
    done != 0
}

/// Wait until the phase of parity `parity` (0 or 1) has completed.
///
/// # Safety
/// `addr` is an initialized barrier.
#[inline(always)]
pub unsafe fn wait(addr: u32, parity: u32) {
    let mut tries = 0u32;
    while !try_wait(addr, parity) {
        tries += 1;
        // Each try_wait suspends the thread for a while in hardware; this many failed tries
        // means seconds of waiting, so the phase will never complete (a bug, or a fault in
        // the copy engine). Fail the launch instead of hanging the GPU.
        if tries == WAIT_LIMIT {
            super::sync::trap();
        }
    }
}

/// Failed `try_wait`s after which [`wait`] gives up and traps.
pub const WAIT_LIMIT: u32 = 1 << 26;

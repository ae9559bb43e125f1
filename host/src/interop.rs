//! Calling etap from other CUDA libraries (PyTorch through the `etap` Python package): making
//! the decoder's context current for a call without disturbing the caller's, and checking that
//! a foreign stream belongs to the decoder's device before anything is enqueued on it.
use crate::decoder::Decoder;
use crate::driver;
use crate::error::{EtapError, Result};
use crate::plan::RawBuffers;
use cust::sys::CUstream;

/// The decoder's primary context pushed on the calling thread's context stack for the guard's
/// lifetime, and popped on drop, so the caller's current context (PyTorch's current device) is
/// what it was before. Cheap: two driver calls that touch no device state.
pub struct ContextGuard {
    _not_send: std::marker::PhantomData<*const ()>,
}

impl ContextGuard {
    /// Make `decoder`'s context current on this thread until the guard drops.
    pub fn new(decoder: &Decoder) -> Result<Self> {
        // SAFETY: pushes a live context handle (the decoder holds a retained reference to it
        // for at least as long as the caller borrows it); popped in `drop` on the same thread
        // (the guard is neither Send nor Sync).
        unsafe { driver::push_context(decoder.context_raw())? };
        Ok(ContextGuard {
            _not_send: std::marker::PhantomData,
        })
    }
}

impl Drop for ContextGuard {
    fn drop(&mut self) {
        // SAFETY: pops the context this guard pushed on this thread (guards nest as the stack).
        unsafe { driver::pop_context() };
    }
}

/// Check that `stream` (a raw handle, e.g. `torch.cuda.current_stream().cuda_stream`; 0 is the
/// legacy default stream) belongs to `decoder`'s context, i.e. its device: a plan used with a
/// stream of another device is reported, not launched. Needs the decoder's context current
/// (inside a [`ContextGuard`]) for the default streams, whose context is the current one.
///
/// # Safety
/// `stream` must be 0, 2 (the per-thread default stream) or a live stream handle.
pub unsafe fn check_stream(decoder: &Decoder, stream: CUstream) -> Result<()> {
    // SAFETY: `stream` is a valid handle (the caller's contract).
    let ctx = unsafe { driver::stream_context(stream)? };
    if ctx != decoder.context_raw() {
        return Err(EtapError::Device(format!(
            "stream {:#x} belongs to another device's context than this decoder's (device {})",
            stream as usize,
            decoder.device()
        )));
    }
    Ok(())
}

/// The id of the CUDA graph capture `stream` is in now, or `None` when it is not capturing
/// (allocations are not allowed during a capture; work enqueued then is replayed, not run).
/// Ids are unique per process, so a caller can tell one capture from the next.
///
/// # Safety
/// As [`check_stream`].
pub unsafe fn capture_id(stream: CUstream) -> Result<Option<u64>> {
    // SAFETY: a valid stream handle (the caller's contract).
    unsafe { driver::capture_id(stream) }
}

/// Check the addresses of a decode call's `q, k_cache, block_table, cache_seqlens, out, lse`
/// (FlashMLA's names, [`RawBuffers::ALIGN`]'s order) against the alignments the kernels need.
pub fn check_alignment(addrs: [u64; 6]) -> Result<()> {
    let [q, kv_cache, block_table, cache_seqlens, out, lse] = addrs;
    RawBuffers {
        q,
        kv_cache,
        block_table,
        cache_seqlens,
        out,
        lse,
        q_offsets: 0,
    }
    .check_alignment(["q", "k_cache", "block_table", "cache_seqlens", "out", "lse"])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_names_the_first_misaligned_argument() {
        assert!(check_alignment([0x1000, 0x2000, 0x3004, 0x4004, 0x5008, 0x6004]).is_ok());
        let e = check_alignment([0x1000, 0x2008, 0, 0, 0, 0]).unwrap_err();
        assert_eq!(
            e,
            EtapError::Misaligned {
                arg: "k_cache",
                align: 16,
                addr: 0x2008
            }
        );
        let e = check_alignment([0, 0, 0, 0, 0x5004, 0]).unwrap_err();
        assert!(matches!(
            e,
            EtapError::Misaligned {
                arg: "out",
                align: 8,
                ..
            }
        ));
    }
}

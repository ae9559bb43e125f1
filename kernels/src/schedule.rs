//! The scheduler kernel: runs `etap_core::schedule` on the device-resident seqlens, so a decode
//! step needs no host synchronization and can be captured in a CUDA graph. The work is a
//! sequential walk over the requests (a few microseconds for hundreds of requests): one thread.
use crate::device::index;
use etap_core::WorkRange;

/// Launch with one thread; `max_tiles` is a request's KV tiles at most
/// (`DecodeParams::max_tiles`). Writes `parts` [`WorkRange`]s and `batch + 1` split offsets.
#[no_mangle]
pub unsafe extern "ptx-kernel" fn etap_schedule(
    seqlens: *const i32,
    batch: u32,
    max_tiles: u32,
    ranges: *mut WorkRange,
    parts: u32,
    split_offsets: *mut u32,
) {
    if index::thread_x() != 0 || index::block_x() != 0 {
        return;
    }
    let seqlens = core::slice::from_raw_parts(seqlens, batch as usize);
    let ranges = core::slice::from_raw_parts_mut(ranges, parts as usize);
    let offsets = core::slice::from_raw_parts_mut(split_offsets, batch as usize + 1);
    etap_core::schedule(seqlens, max_tiles, ranges, offsets);
}

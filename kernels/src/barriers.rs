//! The named barriers of the decode kernels, in one place (FlashMLA keeps an `enum
//! NamedBarriers`): each id says what it waits for, and the ids one kernel uses at once are
//! checked distinct at compile time. Id 0 is `__syncthreads` (`sync::sync_threads`), the whole
//! CTA; hardware has 16.

/// Each consumer warpgroup's own barrier: `OWN + warpgroup` (ids 1 and 2), for its 128 threads
/// (both kernels).
pub const OWN: u32 = 1;
/// Both consumer warpgroups, 256 threads (both kernels).
pub const CONSUMERS: u32 = 3;
/// ETAP kernel: the tensor-core turn of warpgroup 0 and 1, `TURN + warpgroup` (ids 4 and 5;
/// `tile::Turn`).
pub const TURN: u32 = 4;
/// Wide kernel: the helper warpgroup is done with the P tile and alpha; the scorer may
/// overwrite them. Both warpgroups wait at it (an arrive would do, but compute-sanitizer's
/// racecheck does not follow arrive/sync pairs).
pub const P_FREE: u32 = 4;
/// Wide kernel: the scorer has written P and alpha; the helper may read them (both wait).
pub const P_READY: u32 = 5;
/// The producer warpgroup's three idle warps, 96 threads (`merge::publish_empty_splits`, both
/// kernels): above every consumer barrier, since they run while the consumers do.
pub const IDLE: u32 = 6;

/// Whether the ids of `ids` are pairwise distinct (for the compile-time checks below).
const fn distinct(ids: &[u32]) -> bool {
    let mut i = 0;
    while i < ids.len() {
        let mut j = i + 1;
        while j < ids.len() {
            if ids[i] == ids[j] {
                return false;
            }
            j += 1;
        }
        i += 1;
    }
    true
}

const _: () = assert!(
    distinct(&[0, OWN, OWN + 1, CONSUMERS, TURN, TURN + 1, IDLE]),
    "ETAP kernel"
);
const _: () = assert!(
    distinct(&[0, OWN, OWN + 1, CONSUMERS, P_FREE, P_READY, IDLE]),
    "wide kernel"
);
const _: () = assert!(IDLE < 16);

//! The split-KV decode kernels' frame, shared by the ETAP kernel ([`kv_on_m`]) and the
//! heads-on-M one ([`heads_on_m`]): the parameter block, the shared-memory layout, the prologue,
//! the producer warpgroup and its TMA ring, the register hand-over, and the segment loop
//! (`for_each_segment!`) that calls each consumer's per-segment state, tile step and segment
//! end.
//!
//! One CTA per (part, column group). A part is a contiguous run of KV tiles (64 rows, gathered
//! from the cache's pages) over one or more requests (the scheduler's [`WorkRange`]); a column
//! group is up to 64 of a request's `s_q * h_q` (token, head) columns. Per tile, in the ETAP
//! kernel:
//!
//! ```text
//!   S^T[64 x cols] = K[64 x 576] · Q^T[576 x cols]      KV rows on wgmma M: nothing padded
//!   P^T = softmax down each column (online, running max per column)
//!   O^T[512 x cols] += V^T[512 x 64] · P^T[64 x cols]   V^T = the same smem tile, M-major
//! ```
//!
//! Warpgroup roles (384 threads): warpgroups 0 and 1 are consumers, each owning half of the
//! CTA's columns (its own S^T, softmax, P tile and O^T accumulators: they share only the KV
//! pages); warpgroup 2 is the producer, whose first thread issues the TMA loads of Q and of the
//! KV pages into a two-stage ring ahead of the consumers. The producer gives its registers to
//! the consumers (setmaxnreg).
//!
//! At the end of each segment (the part's pages of one request) the consumers write either the
//! final output (when the request has one split) or a partial O and lse, which the CTAs of the
//! request then merge (`merge`).
use crate::barriers::IDLE as BAR_IDLE;
use crate::device::{index, mbarrier, smem, sync, tma};

pub mod fp8;
pub mod fp8_wide;
pub mod heads_on_m;
pub mod kv_on_m;
use crate::merge;
use crate::tile::{self, ROW_BYTES, TILE_BYTES};
use crate::unroll;
use etap_core::contract::kv_box_rows;
use etap_core::{WorkRange, D_QK, D_V, QK_BLOCKS, TILE_ROWS, V_BLOCKS};

pub use etap_core::contract::{CONSUMERS, DECODE_THREADS as THREADS, STAGES};
const _: () = assert!(etap_core::contract::WARPGROUP == index::WARPGROUP);
/// Register cap at entry (see `etap_core::DECODE_ENTRY_REGS`); setmaxnreg needs one.
pub const ENTRY_REGS: u32 = etap_core::DECODE_ENTRY_REGS;
/// Registers per thread after the hand-over: the producer keeps [`PRODUCER_REGS`], the two
/// consumer warpgroups get [`CONSUMER_REGS`]: (168 - 40) * 128 = 16384 registers given back,
/// (232 - 168) * 256 = 16384 taken. The CTA keeps its launch allocation (384 * 168), so the
/// consumers can take no more than the producer gives back, or their `setmaxnreg.inc` waits
/// forever (checked below). A consumer holds O^T for 32 columns (8 chunks x 16 floats =
/// 128), S^T (16), and the softmax state. The producer needs 40 since it gathers tiles from
/// pages of any size (ptxas spills its page arithmetic at 24 and 32; setmaxnreg counts are
/// multiples of 8, so the consumers went from 240 to 232, with no spill).
pub const PRODUCER_REGS: u32 = 40;
pub const CONSUMER_REGS: u32 = 232;
const _: () = assert!(
    (ENTRY_REGS - PRODUCER_REGS) * index::WARPGROUP >= (CONSUMER_REGS - ENTRY_REGS) * CONSUMERS * index::WARPGROUP,
    "the consumers would take more registers than the producer gives back"
);

pub use etap_core::contract::DecodeParams;

/// Shared-memory layout for a CTA of `COLS` columns (two warpgroups of COLS/2). The wide
/// kernel (`heads_on_m`) lays out the same fields its own way.
pub(crate) struct Smem {
    pub(crate) q: u32,
    pub(crate) pages: u32,
    pub(crate) p: u32,
    pub(crate) red: u32,
    pub(crate) full: u32,
    pub(crate) empty: u32,
    pub(crate) q_full: u32,
    pub(crate) q_empty: u32,
}

impl Smem {
    #[inline(always)]
    pub(crate) fn new(cols: u32, nw: u32) -> Smem {
        let base = smem::base();
        let q = base;
        let pages = q + QK_BLOCKS as u32 * cols * ROW_BYTES; // cols * 128 * 9: a multiple of 1024 (cols % 8 == 0)
        let p = pages + STAGES * TILE_BYTES;
        let red = p + CONSUMERS * nw * ROW_BYTES;
        // Per warpgroup: 2 buffers x 4 warps x nw floats.
        let bars = red + CONSUMERS * 2 * 4 * nw * 4;
        Smem::with_barriers_at(q, pages, p, red, bars)
    }

    /// The layout of buffers at `q`, `pages`, `p`, `red`, with the ring's mbarriers (full and
    /// empty per stage, then Q's full and empty, 8 bytes each) from `bars` on: both kernels'
    /// layouts end this way.
    #[inline(always)]
    pub(crate) fn with_barriers_at(q: u32, pages: u32, p: u32, red: u32, bars: u32) -> Smem {
        Smem {
            q,
            pages,
            p,
            red,
            full: bars,
            empty: bars + 8 * STAGES,
            q_full: bars + 16 * STAGES,
            q_empty: bars + 16 * STAGES + 8,
        }
    }
}

/// Dynamic shared memory the kernel of `cols` columns needs (the layout above).
pub use etap_core::contract::decode_smem_bytes as smem_bytes;

/// What both decode kernels do first: check the shared-memory alignment, initialize the
/// mbarriers of a ring of `SLOTS` buffers (a stage is full after `FULL_ARRIVALS` arrivals: the
/// producer's, or the FP8 kernel's converters') and read the CTA's work range (`None` when the
/// CTA has no work).
///
/// # Safety
/// Every thread of the CTA calls it, with `sm` laid out in the dynamic shared memory.
#[inline(always)]
pub(crate) unsafe fn prologue<const SLOTS: u32, const FULL_ARRIVALS: u32>(
    prm: &DecodeParams,
    sm: &Smem,
) -> Option<WorkRange> {
    let t = index::thread_x();
    let part = index::part();
    #[allow(clippy::manual_is_multiple_of)] // the GPU-tested PTX; `is_multiple_of` lays out the branch differently
    if sm.q % 1024 != 0 {
        sync::trap();
    }
    // Launched with programmatic stream serialization: this CTA may start while the grid
    // before it in the stream (the previous layer's decode, a re-plan, the cache update)
    // still runs. Nothing of the caller's or the plan's memory is read before this wait; the
    // next grid may start its own CTAs as this one's free their SMs.
    sync::grid_dependency_wait();
    sync::launch_dependents();
    if t == 0 {
        tma::acquire_map(prm.q_map);
        tma::acquire_map(prm.kv_map);
        for s in 0..SLOTS {
            mbarrier::init(sm.full + 8 * s, FULL_ARRIVALS);
            mbarrier::init(sm.empty + 8 * s, CONSUMERS);
        }
        mbarrier::init(sm.q_full, 1);
        mbarrier::init(sm.q_empty, CONSUMERS);
        sync::fence_mbarrier_init();
    }
    sync::sync_threads();

    let range = *prm.ranges.add(part as usize);
    if range.empty != 0 {
        return None;
    }
    Some(range)
}

/// The producer warpgroup's part: hand its registers to the consumers, and (its first thread)
/// issue the loads. True for the producer's threads, which then have nothing left to do.
///
/// # Safety
/// As [`prologue`], after it.
#[inline(always)]
pub(crate) unsafe fn run_producer(prm: &DecodeParams, range: &WorkRange, sm: &Smem, group: u32, cols: u32) -> bool {
    let t = index::thread_x();
    if sync::warp_uniform(t / index::WARPGROUP) != CONSUMERS {
        return false;
    }
    sync::setmaxnreg!(dec, PRODUCER_REGS);
    let first_idle = CONSUMERS * index::WARPGROUP + index::WARP;
    if t == CONSUMERS * index::WARPGROUP {
        // One loop per page size, so that each keeps its page arithmetic in constants (the
        // producer has 24 registers).
        produce(prm, range, sm, group, cols)
    } else if t >= first_idle {
        // The producer warpgroup's other three warps, while the loads run: the requests with no
        // rows that fall to this CTA (zeros and lse = -inf), and with a stale plan the splits
        // of this CTA left without pages.
        merge::write_empty(prm, group, cols, t - first_idle, THREADS - first_idle);
        merge::publish_empty_splits(prm, group, cols, t - first_idle, THREADS - first_idle, BAR_IDLE);
    }
    true
}

/// Boxes of a KV tile at most: a tile of the smallest pages.
const MAX_BOXES: usize = TILE_ROWS / etap_core::PAGE_SIZES[0];

/// The producer: the first thread of warpgroup 2 walks the part's segments and issues the loads
/// of each request's Q and its KV tiles into the ring. A tile of [`TILE_ROWS`] rows is gathered
/// from the cache's pages of `PAGE` rows in boxes of `kv_box_rows(PAGE)` rows: from 64 / PAGE
/// pages of 16 or 32 rows, one page of 64, or half of one of 128. Boxes wholly past the
/// request's rows are not loaded (the consumers mask and zero those rows of the tile).
///
/// # Safety
/// One thread, after the prologue, with the ring laid out in `sm`, `prm.page_size == PAGE` and a
/// KV tensor map of `kv_box_rows(PAGE)`-row boxes.
#[inline(always)]
pub(crate) unsafe fn produce(prm: &DecodeParams, range: &WorkRange, sm: &Smem, group: u32, cols: u32) {
    let page = prm.page_size;
    let box_rows = kv_box_rows(page);
    let box_shift = box_rows.trailing_zeros();
    let page_shift = page.trailing_zeros();
    let in_page = page - 1;
    // The part's first block-table entry, read beside the first request's seqlen rather than
    // after it (the entry exists whatever the seqlen: the table has `max_pages` entries a
    // request). The first box is on that page when the seqlens are the plan's (a range starts at
    // a tile its request has); with a stale plan the test of `r` below keeps it to that page.
    let first_slot = {
        let slot = (range.begin_tile * TILE_ROWS as u32) >> page_shift;
        if slot < prm.max_pages {
            slot
        } else {
            prm.max_pages - 1
        }
    };
    let first_id = *prm
        .block_table
        .add((range.begin_req * prm.max_pages + first_slot) as usize);
    for_each_producer_tile!(prm, range, sm, group, cols, |r, rows, table, tile, it| {
        let stage = it % STAGES;
        // The tile's rows of the request (`row0 < rows`: `hi` is within the request's
        // tiles), so every entry read below is below `rows / page_size <= max_pages`.
        let row0 = tile * TILE_ROWS as u32;
        let left = rows - row0;
        // div_ceil by a power of two, as a shift (a division would take registers the
        // producer does not have).
        let boxes = ((if left < TILE_ROWS as u32 {
            left
        } else {
            TILE_ROWS as u32
        }) + box_rows
            - 1)
            >> box_shift;
        // The tile's block-table entries, read before waiting for a free stage: the loads
        // are independent, in flight together, and their latency overlaps the wait.
        let mut ids = [0i32; MAX_BOXES];
        unroll!(k < MAX_BOXES, max 4 => {
            let slot = (row0 + k as u32 * box_rows) >> page_shift;
            if (k as u32) < boxes {
                ids[k] = if it == 0 && k == 0 && r == range.begin_req && slot == first_slot {
                    first_id
                } else {
                    *table.add(slot as usize)
                };
            }
        });
        if it >= STAGES {
            tile::wait(sm.empty + 8 * stage, (it / STAGES - 1) & 1);
        }
        let (dst, bar) = (sm.pages + stage * TILE_BYTES, sm.full + 8 * stage);
        mbarrier::arrive_expect_tx(bar, boxes * box_rows * QK_BLOCKS as u32 * ROW_BYTES);
        unroll!(k < MAX_BOXES, max 4 => {
            if (k as u32) < boxes {
                let row = row0 + k as u32 * box_rows;
                let at = prm.page_row(ids[k], row & in_page, page);
                tile::load_kv_rows(prm.kv_map, dst + k as u32 * box_rows * ROW_BYTES, bar, at, tile::BLOCK_BYTES);
            }
        });
    });
}

/// The producer thread's walk over its part: for each request with tiles in the part, its Q
/// (`load_request_q`), then the body for each of its tiles, in order, with `r` the request,
/// `rows` its rows, `table` its block-table row, `tile` the tile and `it` the tiles issued so
/// far. Both producers (`produce`,
/// the FP8 kernel's raw one) walk the part this way, so that the consumers' segments match. A
/// macro, not a function taking a closure: the closure's captures cost the 40-register
/// producer a spill (ptxas), the macro's expansion is the loop as written before (PTX
/// byte-identical).
macro_rules! for_each_producer_tile {
    ($prm:expr, $range:expr, $sm:expr, $group:expr, $cols:expr, |$r:ident, $rows:pat, $table:pat, $tile:ident, $it:ident| $body:block) => {{
        let mut $it = 0u32;
        let mut q_round = 0u32;
        for $r in $range.begin_req..=$range.end_req {
            let (rows, lo, hi) = $prm.segment($range, $r);
            if lo == hi {
                continue;
            }
            $crate::decode::load_request_q($prm, $sm, $r, $group, $cols, q_round);
            q_round += 1;
            let table = $prm.block_table.add(($r * $prm.max_pages) as usize);
            for $tile in lo..hi {
                let $rows = rows;
                let $table = table;
                $body
                $it += 1;
            }
        }
    }};
}
pub(crate) use for_each_producer_tile;

const _: () = assert!(
    STAGES == 2,
    "for_each_segment!'s per-stage copies are written for two stages"
);

/// The consumers' walk over their part, the frame's segment loop: for each request with tiles
/// in the part (a segment), the consumer's `segment` statements (its per-segment state, in
/// scope for the rest), the wait for the request's Q, the consumer's optional `q_ready`
/// statements (once its Q is there: the FP8 kernel converts it), then per tile the wait for its stage,
/// the zeroing of a partial tile's rows past the request's end, the consumer's `tile`
/// statements, and the stage's release; after the segment's last tile the consumer's `end`
/// statements (the segment's stores). Names the consumer gives: `r` the request, `rows` its
/// rows, `page` the tile, `hi` the segment's end, `row0` the tile's first row, `kv` its stage
/// in shared memory, `it` the tiles consumed so far; `t` / `tw` are the thread's index in the
/// CTA / its warpgroup.
///
/// `per_stage: true` writes the `tile` statements out once per stage (`STAGES` = 2), each with
/// its stage's address a constant offset from the shared-memory base, so that ptxas computes
/// the tile's wgmma descriptors in uniform registers (an add each) instead of in a thread's
/// registers moved over for every wgmma: 5 instructions a wgmma in place of 9 where both
/// operands' addresses are constants (the solo FP8 consumer), 7 where only the tile's is (the
/// 16-bit ETAP consumers, whose Q and P depend on the warpgroup). Twice the code of the tile
/// step; the wide kernel spilled with it (24 bytes), so it keeps one copy.
///
/// A macro, not a function calling a `Consumer` trait: three tries of the trait moved the same
/// instructions into another order, and ptxas then spilled the wide kernel (24 bytes) and the
/// ETAP kernel of 32 columns (4 bytes) at the consumers' 232 registers; the macro expands to
/// the loop each consumer had written out (PTX byte-identical, checked).
macro_rules! for_each_segment {
    (
        $prm:expr, $range:expr, $sm:expr, $t:expr, $tw:expr, per_stage: $per_stage:literal;
        segment |$r:ident, $rows:ident| { $($segment:tt)* }
        $(q_ready { $($q_ready:tt)* })?
        tile |$page:ident, $hi:ident, $row0:ident, $kv:ident, $it:ident| { $($tile:tt)* }
        end { $($end:tt)* }
    ) => {{
        let mut $it = 0u32;
        let mut q_round = 0u32;
        for $r in $range.begin_req..=$range.end_req {
            let ($rows, lo, $hi) = $prm.segment($range, $r);
            if lo == $hi {
                continue;
            }
            $($segment)*
            $crate::tile::wait($sm.q_full, q_round & 1);
            q_round += 1;
            $($($q_ready)*)?
            for $page in lo..$hi {
                let stage = $it % $crate::decode::STAGES;
                let tile_at = $sm.pages + stage * $crate::tile::TILE_BYTES;
                $crate::tile::wait($sm.full + 8 * stage, ($it / $crate::decode::STAGES) & 1);
                let $row0 = $page * etap_core::TILE_ROWS as u32;
                if $row0 + etap_core::TILE_ROWS as u32 > $rows {
                    // The request's last, partial tile: zero V's rows past its end.
                    let all = $crate::decode::CONSUMERS * $crate::device::index::WARPGROUP;
                    $crate::tile::zero_rows_from(tile_at, $rows - $row0, $t, all);
                    $crate::device::sync::fence_proxy_async_shared();
                    $crate::device::sync::bar_sync($crate::barriers::CONSUMERS, all);
                }
                if !$per_stage {
                    let $kv = tile_at;
                    $($tile)*
                } else if stage == 0 {
                    let $kv = $sm.pages;
                    $($tile)*
                } else {
                    let $kv = $sm.pages + $crate::tile::TILE_BYTES;
                    $($tile)*
                }
                $crate::device::mbarrier::arrive_if($tw == 0, $sm.empty + 8 * stage);
                $it += 1;
            }
            $($end)*
        }
    }};
}
pub(crate) use for_each_segment;

/// Load request `r`'s Q rows of column group `group` (its columns `group * cols ..`; rows past
/// the request's columns are the next request's or, past q, zeros: computed on, never stored)
/// for the consumers, once they are done with the previous request's (`q_round` requests loaded
/// so far). The producer's thread calls it.
///
/// # Safety
/// As [`produce`].
#[inline(always)]
pub(crate) unsafe fn load_request_q(prm: &DecodeParams, sm: &Smem, r: u32, group: u32, cols: u32, q_round: u32) {
    if q_round > 0 {
        // Both warpgroups are done with the previous request's Q.
        tile::wait(sm.q_empty, (q_round - 1) & 1);
    }
    mbarrier::arrive_expect_tx(sm.q_full, QK_BLOCKS as u32 * cols * ROW_BYTES);
    let row = prm.req_cols(r).row0 + group * cols;
    tile::load_q(prm.q_map, sm.q, sm.q_full, row as i32, cols);
}

/// The width of q/cache rows, checked against the tile layout at compile time.
const _: () = assert!(D_QK == QK_BLOCKS * 64 && D_V == V_BLOCKS * 64);

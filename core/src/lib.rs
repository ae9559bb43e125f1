//! Shapes, constants and the split-KV scheduler shared by the etap kernels and the host.
//!
//! This crate is `no_std` and has no dependencies, so the very same code is compiled into the
//! device crate (for `nvptx64-nvidia-cuda`, where the scheduler runs as a one-thread kernel) and
//! into the host crate (where property tests check it, and check that merging the splits it
//! makes gives the unsplit result). One implementation, tested on the CPU, run on the GPU.
#![no_std]

pub mod contract;

/// Rows of one KV tile: the unit the decode kernels compute on and the scheduler splits work in.
/// It is also the wgmma M dimension: ETAP puts one tile of KV rows on M, so one tile is exactly
/// one m64 tile. (The cache's pages are tiles today; the name says which of the two is meant.)
pub const TILE_ROWS: usize = 64;
/// Width of a latent KV row and of a query row: 512 (the compressed latent, which is also V)
/// plus 64 (the decoupled RoPE part).
pub const D_QK: usize = 576;
/// Width of V, the first `D_V` columns of each cache row, and of the output.
pub const D_V: usize = 512;
/// Width of the RoPE part of a row (`D_QK - D_V`).
pub const D_ROPE: usize = D_QK - D_V;
/// Elements of a 16-bit type in one 128-byte swizzle row: the tiles are stored as column blocks
/// this wide, the unit of the 128-byte-swizzled shared-memory layout and of one TMA box.
pub const BLOCK_COLS: usize = 64;
/// Column blocks of a 576-wide row (9).
pub const QK_BLOCKS: usize = D_QK / BLOCK_COLS;
/// Column blocks of the 512-wide V part (8).
pub const V_BLOCKS: usize = D_V / BLOCK_COLS;

/// (token, head) columns handled by one CTA: two consumer warpgroups of 32 columns each. Wider
/// problems (s_q * h_q > 64) are split into column groups of this size.
pub const COLS_PER_CTA: usize = 64;
/// Most query heads the kernels take (any count from 1: a tensor-parallel shard of 128 heads
/// may have 6, 12, 20, ...): the ETAP kernel pads a request's (token, head) columns to its CTA's
/// 16 or 32, the heads-on-M kernel to its 64 rows.
pub const MAX_HEADS: usize = 128;
/// Query tokens per request the kernels support (1 = plain decode, more = multi-token
/// prediction or speculative decoding, which verifies up to 8 draft tokens).
pub const MAX_S_Q: usize = 8;
/// Rows per page of the paged cache that the kernels take: the loads gather a [`TILE_ROWS`]
/// tile from 64 / size pages of fewer rows, or take it from part of a larger one. Each size is
/// a multiple of 8 rows, so every page starts a whole 1024-byte swizzle atom of the tile.
pub const PAGE_SIZES: [usize; 4] = [16, 32, 64, 128];

/// Register cap at the decode kernel's entry: 65536 registers over its 384 threads, rounded down
/// to a multiple of 8. The host JIT-compiles the module with it (`setmaxnreg`, by which the
/// producer warpgroup hands registers to the consumers, needs a cap at entry), and the PTX
/// checks assemble with it.
pub const DECODE_ENTRY_REGS: u32 = 168;

/// Scheduler cost of starting a split, in page-equivalents: loading Q, finishing the softmax and
/// writing one (partial) output. It keeps the scheduler from cutting a request into slivers.
pub const SPLIT_COST_PAGES: u32 = 2;

/// Number of KV tiles a request of `seqlen` rows occupies, at most `max_tiles` (a negative
/// length is an empty request; a length past the block table's capacity is cut to it: the host
/// API rejects it before any launch, and the clamp keeps a device-resident length that nobody
/// checked from reaching past the block table). With `max_tiles = ceil(max_rows / TILE_ROWS)`
/// this is `ceil(rows_of(seqlen, max_rows) / TILE_ROWS)` (ceil is monotone).
#[inline]
pub fn tiles_of(seqlen: i32, max_tiles: u32) -> u32 {
    if seqlen <= 0 {
        0
    } else {
        let tiles = (seqlen as u32).div_ceil(TILE_ROWS as u32);
        if tiles > max_tiles {
            max_tiles
        } else {
            tiles
        }
    }
}

/// The rows of a request that the kernels read: `seqlen` clamped to `[0, max_rows]` (the block
/// table's capacity, `max_pages * page_size`), as in [`tiles_of`].
#[inline]
pub fn rows_of(seqlen: i32, max_rows: u32) -> u32 {
    if seqlen <= 0 {
        0
    } else {
        let cap = max_rows;
        let s = seqlen as u32;
        if s > cap {
            cap
        } else {
            s
        }
    }
}

/// The contiguous run of work one CTA (a "part") owns: pages `[begin_tile, ..)` of request
/// `begin_req`, every page of the requests in between, and pages `[.., end_tile)` of request
/// `end_req` (inclusive). Requests are visited in order; a request with no pages inside the run
/// contributes nothing. `first_split` is the split index, within `begin_req`, of the part's first
/// segment; every later segment of the part starts its request and so has split index 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkRange {
    pub begin_req: u32,
    pub begin_tile: u32,
    pub end_req: u32,
    pub end_tile: u32,
    pub first_split: u32,
    /// 1 when the part has no work at all.
    pub empty: u32,
    pub _pad: [u32; 2],
}

impl WorkRange {
    pub const EMPTY: WorkRange = WorkRange {
        begin_req: 0,
        begin_tile: 0,
        end_req: 0,
        end_tile: 0,
        first_split: 0,
        empty: 1,
        _pad: [0; 2],
    };

    /// The split index, within request `r`, of this run's segment of it: `first_split` for the
    /// run's first request, 0 for every later one (it starts there).
    #[inline]
    pub fn split_of(&self, r: u32) -> u32 {
        if r == self.begin_req {
            self.first_split
        } else {
            0
        }
    }

    /// The page range `[lo, hi)` of request `r` inside this run (`lo == hi` when none), for a
    /// request `r` in `begin_req..=end_req` that has `pages` pages now: the run's pages, never
    /// past `pages` (the plan may have been made for longer seqlens).
    #[inline]
    pub fn segment(&self, r: u32, pages: u32) -> (u32, u32) {
        let lo = if r == self.begin_req { self.begin_tile } else { 0 };
        let hi = if r == self.end_req && self.end_tile < pages {
            self.end_tile
        } else {
            pages
        };
        if lo >= hi {
            (lo, lo)
        } else {
            (lo, hi)
        }
    }
}

/// The cost the scheduler balances: pages plus [`SPLIT_COST_PAGES`] per non-empty request.
pub fn total_cost(seqlens: &[i32], max_tiles: u32) -> u32 {
    let mut total = 0u32;
    for &s in seqlens {
        let p = tiles_of(s, max_tiles);
        if p > 0 {
            total += p + SPLIT_COST_PAGES;
        }
    }
    total
}

/// Split every request's KV pages over `ranges.len()` parts (CTAs) in balanced pieces.
///
/// Writes one [`WorkRange`] per part and `split_offsets` (length `seqlens.len() + 1`): the
/// number of splits of request `r` is `split_offsets[r + 1] - split_offsets[r]`, and its
/// partial results live in slots `split_offsets[r]..split_offsets[r + 1]` of the accumulation
/// buffers. A request with one split is written straight to the output by the decode kernel;
/// a request with none (no rows) gets zeros and `-inf`.
///
/// Greedy and in request order, like FlashMLA's `get_mla_metadata`: each part gets a budget of
/// cost units; it takes whole requests while they fit and cuts the request that does not, as
/// long as at least one page fits. The last part takes whatever is left, so every page is
/// covered exactly once. The budget is the smallest (binary search) with which the greedy walk
/// covers everything in `parts` parts, at most `ceil(total / parts) + SPLIT_COST_PAGES`: the
/// plain rounded-up share can leave parts idle (64 requests of 128 pages over 132 parts: 128
/// parts of 64 pages and 4 idle, where 130 parts of 63 do).
///
/// Returns the total number of splits (`split_offsets[b]`), at most `b + parts - 1`.
pub fn schedule(seqlens: &[i32], max_tiles: u32, ranges: &mut [WorkRange], split_offsets: &mut [u32]) -> u32 {
    let b = seqlens.len();
    let parts = ranges.len();
    debug_assert!(split_offsets.len() == b + 1);
    let total = total_cost(seqlens, max_tiles);
    let parts_u = if parts == 0 { 1 } else { parts as u32 };
    // The greedy walk is monotone enough in the budget for a binary search: a feasible budget
    // is one whose walk, with no part taking the rest, ends within `parts` parts.
    let mut hi = total.div_ceil(parts_u) + SPLIT_COST_PAGES;
    let mut lo = total.div_ceil(parts_u).max(SPLIT_COST_PAGES + 1);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if walk(seqlens, max_tiles, mid, parts, false, |_, _| {}, |_, _| {}) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    for o in split_offsets.iter_mut() {
        *o = 0;
    }
    // split_offsets[r + 1] holds request r's split count until the prefix sum at the end.
    walk(
        seqlens,
        max_tiles,
        hi,
        parts,
        true,
        |p, range| ranges[p] = range,
        |r, splits| split_offsets[r + 1] = splits,
    );
    // Counts to offsets.
    split_offsets[0] = 0;
    for i in 0..b {
        split_offsets[i + 1] += split_offsets[i];
    }
    split_offsets[b]
}

/// The greedy walk of [`schedule`] with a given `budget` per part: calls `range(p, ..)` for
/// each of the `parts` parts (unused parts get [`WorkRange::EMPTY`]) and `splits(r, n)` for
/// each request with pages. With `last_takes_rest` the last part takes whatever is left and
/// the walk always covers everything; without, it returns whether `parts` parts sufficed.
fn walk<R: FnMut(usize, WorkRange), S: FnMut(usize, u32)>(
    seqlens: &[i32],
    max_tiles: u32,
    budget: u32,
    parts: usize,
    last_takes_rest: bool,
    mut range_out: R,
    mut splits_out: S,
) -> bool {
    let b = seqlens.len();
    // `r` is the current request, `page` its next unassigned page and `split` the split
    // index its next segment gets.
    let mut r = 0usize;
    while r < b && tiles_of(seqlens[r], max_tiles) == 0 {
        r += 1;
    }
    let mut page = 0u32;
    let mut split = 0u32;
    for p in 0..parts {
        if r >= b {
            range_out(p, WorkRange::EMPTY);
            continue;
        }
        let last_part = last_takes_rest && p + 1 == parts;
        let mut range = WorkRange {
            begin_req: r as u32,
            begin_tile: page,
            end_req: r as u32,
            end_tile: page,
            first_split: split,
            empty: 0,
            _pad: [0; 2],
        };
        let mut remaining = budget;
        loop {
            let np = tiles_of(seqlens[r], max_tiles);
            let left = np - page;
            let cost = left + SPLIT_COST_PAGES;
            if last_part || cost <= remaining {
                // The rest of request r fits: finish it here.
                remaining = remaining.saturating_sub(cost);
                range.end_req = r as u32;
                range.end_tile = np;
                splits_out(r, split + 1);
                r += 1;
                page = 0;
                split = 0;
                while r < b && tiles_of(seqlens[r], max_tiles) == 0 {
                    r += 1;
                }
                if r >= b || (!last_part && remaining <= SPLIT_COST_PAGES) {
                    break;
                }
            } else {
                // Cut request r: take as many pages as the budget leaves room for (at least
                // one: a part starts with `budget > SPLIT_COST_PAGES`, and continues to a new
                // request only while `remaining > SPLIT_COST_PAGES`).
                let take = remaining - SPLIT_COST_PAGES;
                page += take;
                range.end_req = r as u32;
                range.end_tile = page;
                split += 1;
                break;
            }
        }
        range_out(p, range);
    }
    r >= b
}

/// Upper bound on the number of splits [`schedule`] produces for `b` requests over `parts`
/// parts: each part cuts at most one request, so the splits are at most `b + parts - 1`.
pub const fn max_splits(b: usize, parts: usize) -> usize {
    b + parts
}

/// Where column `n = token * h_q + head` of request `r` has its lse in the output `lse`
/// `[b, h_q, s_q]` (head-major, as FlashMLA's).
#[inline]
pub fn lse_index(r: u32, n: u32, h_q: u32, s_q: u32) -> u32 {
    let (token, head) = (n / h_q, n % h_q);
    (r * h_q + head) * s_q + token
}

/// Column layout: the kernels see a request's `s_q * h_q` query rows as columns
/// `n = token * h_q + head` (the order of q's `[s_q, h_q, 576]` rows). Query token `t` of a
/// request with `rows` cache rows sees rows `j < rows - s_q + t + 1` (causal, as FlashMLA); this
/// returns that bound, 0 when the token sees nothing.
#[inline]
pub fn visible_rows(rows: u32, s_q: u32, token: u32) -> u32 {
    let v = rows as i64 - s_q as i64 + token as i64 + 1;
    if v <= 0 {
        0
    } else {
        v as u32
    }
}

//! The split merge, done by the decode kernels themselves (no combine kernel).
//!
//! A request cut into `n > 1` splits has `n` partial results (O normalized by its own sum, and
//! its lse) in the accumulation buffers, one per CTA that worked on it. Each of those CTAs but
//! the last, after its last page, merges a `1/(n-1)` share of the request's output:
//!
//! ```text
//!   m = max_i lse_i,  w_i = exp(lse_i - m),  lse = m + ln Σ w_i,  out = Σ_i w_i · O_i / Σ w_i
//! ```
//!
//! The share of split `k < n - 1` is the `k`-th `1/(n-1)` of the (column, 4-feature chunk)
//! items of the CTA's column group, so the merge is spread over as many SMs as the request
//! was, whether it has 2 splits or 100 (one long request over every SM). Splits `0..n-1` each
//! end their CTA's range (the request goes on in the next part) while the last split starts
//! one, so every CTA merges at most one request: its range's last.
//!
//! Before merging, a CTA waits until every split of the request is written: a counter per
//! (request, column group), to which each consumer warpgroup adds 1 after writing its part of
//! a partial ([`publish`]), so it reaches `n * CONSUMERS`. Each of the `n - 1` merging CTAs then
//! adds 1 more as it leaves the wait, and the last to leave sets the counter back to 0: every
//! call finds its counters at 0 (the plan zeroes them once), with no count carried from call to
//! call on the host. So a captured CUDA graph replays correctly, and a re-plan needs no reset.
//!
//! The counts are the plan's, whatever the seqlens: every split the plan made publishes, even
//! one whose pages the current seqlens leave empty (it publishes an empty partial, lse = -inf),
//! so a stale plan never leaves a merge waiting (docs/design.md, "Bounds safety").
//!
//! Waiting for other CTAs needs them resident: the host launches the decode kernels
//! cooperatively, and every CTA finishes all its pages before it waits for anything.
//!
//! Requests with no rows, and requests the plan gave no split, are written here too (zeros and
//! lse = -inf), by the CTA whose part index is the request index modulo the parts
//! ([`write_empty`]).
use crate::device::{global, index, math, sync};
use crate::elem::Elem;
use crate::unroll;
use etap_core::contract::{DecodeParams, CONSUMERS};
use etap_core::{rows_of, tiles_of, D_V};

/// Threads that merge: both consumer warpgroups.
const THREADS: u32 = CONSUMERS * index::WARPGROUP;
/// Features a merge item covers: one 16-byte load of the f32 partials.
const CHUNK: u32 = 4;
/// Items per column (512 / 4).
const CHUNKS: u32 = D_V as u32 / CHUNK;

/// The (request, column group) counter of the merge.
#[inline(always)]
unsafe fn counter(prm: &DecodeParams, r: u32, group: u32) -> *mut u32 {
    prm.counters.add((r * index::groups() + group) as usize)
}

/// After this warpgroup has written its part of a segment's result (its stores issued): if the
/// request has several splits, count it for the merge; a single split's result is final and
/// nothing counts it. Every thread of the warpgroup calls it after each segment; `bar_id` is a
/// named barrier of the warpgroup's 128 threads.
///
/// # Safety
/// `r` is a request of the grid's batch; `prm.counters` has `batch * groups` entries.
#[inline(always)]
pub unsafe fn publish(prm: &DecodeParams, r: u32, group: u32, bar_id: u32) {
    if prm.splits(r) > 1 {
        sync::bar_sync(bar_id, index::WARPGROUP);
        global::release_add_if(
            index::thread_x().is_multiple_of(index::WARPGROUP),
            counter(prm, r, group),
            1,
        );
    }
}

/// Merge this CTA's share of the request of its range's last segment, if that segment is a
/// split other than the request's last. Both consumer warpgroups call it after their last
/// segment; `bar_id` names a barrier of the 256 consumer threads.
///
/// # Safety
/// After every consumer thread has published its last segment.
#[inline(always)]
pub unsafe fn merge_splits<E: Elem>(prm: &DecodeParams, group: u32, group_cols: u32, bar_id: u32) {
    // The part's range, read again (volatile: not replaced by the values the main loop had)
    // rather than kept in registers through the main loop, where they made ptxas spill.
    let range = &core::ptr::read_volatile(prm.ranges.add(index::part() as usize));
    let split = range.split_of(range.end_req);
    merge_request::<E>(prm, range.end_req, split, group, group_cols, bar_id);
}

/// This CTA's share of request `r`, whose split `split` it wrote, when the request has more
/// than one split and `split` is not the last.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn merge_request<E: Elem>(prm: &DecodeParams, r: u32, split: u32, group: u32, group_cols: u32, bar_id: u32) {
    let first = *prm.split_offsets.add(r as usize);
    let n = *prm.split_offsets.add(r as usize + 1) - first;
    if n > 1 && split + 1 < n {
        let col0 = group * group_cols;
        let rc = prm.req_cols(r);
        let cols = group_share(rc.n, col0, group_cols);
        merge_share::<E>(
            prm.out,
            prm.lse,
            prm.o_accum,
            prm.lse_accum,
            counter(prm, r, group),
            n * CONSUMERS,
            prm.n_max(),
            prm.h_q,
            rc.row0,
            rc.lse0,
            rc.lse_head,
            rc.lse_token,
            col0,
            cols,
            first,
            n,
            split,
            bar_id,
        );
    }
}

/// The columns of a request with `n` columns that a group of `group_cols` from `col0` holds (none
/// for a packed request with fewer columns than the group's first).
#[inline(always)]
fn group_share(n: u32, col0: u32, group_cols: u32) -> u32 {
    let left = n.saturating_sub(col0);
    if left < group_cols {
        left
    } else {
        group_cols
    }
}

/// Merge share `k` of a request's `n` splits (partials in slots `first..first + n`, `n_max`
/// columns a slot) for its columns `col0..col0 + cols`, into its rows of out from `row0` and its
/// lse at `lse0 + head * lse_head + token * lse_token` (`contract::ReqCols`), once `counter` has
/// reached `target` (every split published).
/// The `n - 1` sharers then each add 1 as they leave the wait; the last resets it to 0. Not
/// inlined: the decode kernels' main loops keep their registers (inlined, the merge made
/// ptxas spill them); its arguments are plain values, so the call needs no stack frame.
///
/// One pass over the partials: each thread streams its item's splits, loading each split's
/// lse with its 4 features, and keeps an online max, rescaled sum and accumulator (as the
/// softmax does over pages); the lanes of an item then merge their states by shuffles. One
/// round of loads from L2 when `n` is small, and no shared memory.
#[inline(never)]
#[allow(clippy::too_many_arguments)]
unsafe fn merge_share<E: Elem>(
    out: *mut u16,
    lse: *mut f32,
    o_accum: *const f32,
    lse_accum: *const f32,
    counter: *mut u32,
    target: u32,
    n_max: u32,
    h_q: u32,
    row0: u32,
    lse0: u32,
    lse_head: u32,
    lse_token: u32,
    col0: u32,
    cols: u32,
    first: u32,
    n: u32,
    k: u32,
    bar_id: u32,
) {
    // Every split of the request is written. Then leave: the last of the n - 1 sharers to
    // leave (the counter at target + n - 2 before its add) resets the counter for the next call;
    // every other sharer has passed its wait by then.
    if index::thread_x() == 0 {
        global::wait_reached(counter, target);
        global::leave_and_reset(counter, target + n - 2);
    }
    sync::bar_sync(bar_id, THREADS);

    // This share's items. Shares: splits 0..n-1 take one each (the last split merges nothing).
    let items = cols * CHUNKS;
    let sharers = n - 1;
    let lo = k * items / sharers;
    let hi = (k + 1) * items / sharers;
    let count = hi - lo;
    // Few items (many splits): several lanes per item, each taking every `lanes`-th split.
    let mut lanes = 32u32;
    while lanes > 1 && (count * lanes > THREADS || lanes > n) {
        lanes /= 2;
    }
    let sh = ShareItems {
        out,
        lse,
        o_accum,
        lse_accum,
        n_max,
        h_q,
        row0,
        lse0,
        lse_head,
        lse_token,
        col0,
        first,
        n,
        lo,
        count,
    };
    if count <= THREADS {
        sh.merge_items::<E, 1, 8>(lanes);
    } else if count <= 2 * THREADS {
        sh.merge_items::<E, 2, 8>(1);
    } else {
        sh.merge_items::<E, 4, 4>(1);
    }
}

/// A merge state: running max of the lse seen, the sum of exp(lse - max), and the weighted
/// sum of the outputs, for 4 features.
#[derive(Clone, Copy)]
struct State {
    m: f32,
    sum: f32,
    acc: [f32; 4],
}

impl State {
    const EMPTY: State = State {
        m: f32::NEG_INFINITY,
        sum: 0.0,
        acc: [0.0; 4],
    };

    /// Fold in another state (rescaling both to the larger max). Branch-free: the lanes stay
    /// converged for the shuffles around it.
    #[inline(always)]
    fn merge(&mut self, o: &State) {
        let m = math::fmax(self.m, o.m);
        // Both -inf: nothing seen yet; keep the weights finite (0).
        let safe = math::max_base(m);
        let a = math::exp2((self.m - safe) * core::f32::consts::LOG2_E);
        let b = math::exp2((o.m - safe) * core::f32::consts::LOG2_E);
        self.sum = self.sum * a + o.sum * b;
        for d in 0..4 {
            self.acc[d] = self.acc[d] * a + o.acc[d] * b;
        }
        self.m = m;
    }
}

/// One share's items (see `merge_share`).
struct ShareItems {
    out: *mut u16,
    lse: *mut f32,
    o_accum: *const f32,
    lse_accum: *const f32,
    n_max: u32,
    h_q: u32,
    row0: u32,
    lse0: u32,
    lse_head: u32,
    lse_token: u32,
    col0: u32,
    first: u32,
    n: u32,
    lo: u32,
    count: u32,
}

impl ShareItems {
    /// Merge the items `lo..lo + count`: `lanes` threads per item, `P` items per thread at a
    /// time, `U` splits per item loaded before any is used (`P * U` loads in flight).
    ///
    /// No branch around a load or store: the warps must reach the shuffles converged (a
    /// diverged warp takes ptxas's slow WARPSYNC path; docs/perf-notes.md v9). Loads out of
    /// range read a clamped, valid address and are discarded with a select; stores are
    /// predicated instructions.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)] // constant indices keep the arrays in registers
    unsafe fn merge_items<E: Elem, const P: usize, const U: usize>(&self, lanes: u32) {
        let t = index::thread_x();
        let sub = t % lanes;
        // Threads' items in one row of a pass, and the items a pass covers.
        let per_row = THREADS / lanes;
        let per_pass = per_row * P as u32;
        let slot = t / lanes;
        let mut base = 0u32;
        while base < self.count {
            let mut st = [State::EMPTY; P];
            let mut col = [0u32; P];
            let mut chunk = [0u32; P];
            let mut live = [false; P];
            unroll!(p < P, max 4 => {
                let at = base + p as u32 * per_row + slot;
                live[p] = at < self.count;
                let item = self.lo + if live[p] { at } else { 0 };
                col[p] = item / CHUNKS;
                chunk[p] = item % CHUNKS;
            });
            let mut i0 = 0;
            while i0 < self.n {
                let mut x = [[[0f32; 4]; U]; P];
                let mut l = [[0f32; U]; P];
                unroll!(u < U, max 8 => {
                    let j = i0 + sub + u as u32 * lanes;
                    let jc = j.min(self.n - 1);
                    unroll!(p < P, max 4 => {
                        let row = (self.first + jc) * self.n_max + self.col0 + col[p];
                        let v = global::ld_cg_f32(self.lse_accum.add(row as usize));
                        l[p][u] = if j < self.n { v } else { f32::NEG_INFINITY };
                        x[p][u] = global::ld_cg_f32x4(self.o_accum.add((row * D_V as u32 + chunk[p] * CHUNK) as usize));
                    });
                });
                unroll!(p < P, max 4 => {
                    let mut m = st[p].m;
                    unroll!(u < U, max 8 => {
                        m = math::fmax(m, l[p][u]);
                    });
                    let safe = math::max_base(m);
                    let scale = math::exp2((st[p].m - safe) * core::f32::consts::LOG2_E);
                    st[p].sum *= scale;
                    for d in 0..4 {
                        st[p].acc[d] *= scale;
                    }
                    unroll!(u < U, max 8 => {
                        let w = math::exp2((l[p][u] - safe) * core::f32::consts::LOG2_E);
                        st[p].sum += w;
                        for d in 0..4 {
                            st[p].acc[d] += w * x[p][u][d];
                        }
                    });
                    st[p].m = m;
                });
                i0 += U as u32 * lanes;
            }
            unroll!(p < P, max 4 => {
                let mut s = lanes / 2;
                while s > 0 {
                    let o = State {
                        m: sync::shfl_xor_f32(st[p].m, s),
                        sum: sync::shfl_xor_f32(st[p].sum, s),
                        acc: [
                            sync::shfl_xor_f32(st[p].acc[0], s),
                            sync::shfl_xor_f32(st[p].acc[1], s),
                            sync::shfl_xor_f32(st[p].acc[2], s),
                            sync::shfl_xor_f32(st[p].acc[3], s),
                        ],
                    };
                    st[p].merge(&o);
                    s /= 2;
                }
                let inv = if st[p].sum > 0.0 { 1.0 / st[p].sum } else { 0.0 };
                let n_col = self.col0 + col[p];
                let at = (self.row0 + n_col) * D_V as u32 + chunk[p] * CHUNK;
                let head = live[p] && sub == 0;
                global::st_u32x2_if(
                    head,
                    self.out.add(at as usize) as *mut u32,
                    [
                        math::pack2_out::<E>(st[p].acc[0] * inv, st[p].acc[1] * inv),
                        math::pack2_out::<E>(st[p].acc[2] * inv, st[p].acc[3] * inv),
                    ],
                );
                // The lse, once per column: by the item of its first chunk.
                let (tok, h) = (n_col / self.h_q, n_col % self.h_q);
                let lse = if st[p].sum > 0.0 {
                    st[p].m + math::ln(st[p].sum)
                } else {
                    f32::NEG_INFINITY
                };
                global::st_f32_if(
                    head && chunk[p] == 0,
                    self.lse.add((self.lse0 + h * self.lse_head + tok * self.lse_token) as usize),
                    lse,
                );
            });
            base += per_pass;
        }
    }
}

/// With a stale plan (seqlens shrunk since planning): the splits of the plan in this CTA's
/// range that the current seqlens leave without pages, which the consumers skip, get an empty
/// partial for the CTA's columns `group * cols ..` (O = 0, lse = -inf: the merge weighs it as
/// nothing) and are published for both consumer warpgroups, so that no merge waits for them.
/// Only the range's first and last request can be split (every request between lies whole in
/// the range). Run by the producer warpgroup's idle warps (`rank` of `threads`, `bar_id` their
/// own barrier), outside the consumers' register budget.
///
/// # Safety
/// `prm` holds the plan's buffers; every one of the `threads` threads calls it.
#[inline(always)]
pub unsafe fn publish_empty_splits(prm: &DecodeParams, group: u32, cols: u32, rank: u32, threads: u32, bar_id: u32) {
    let range = &core::ptr::read_volatile(prm.ranges.add(index::part() as usize));
    let mut r = range.begin_req;
    loop {
        let seqlen = *prm.seqlens.add(r as usize);
        let first = *prm.split_offsets.add(r as usize);
        let n = *prm.split_offsets.add(r as usize + 1) - first;
        let (lo, hi) = range.segment(r, tiles_of(seqlen, prm.max_tiles));
        if lo == hi && n > 1 {
            let slot = first + range.split_of(r);
            write_empty_partial(
                prm.o_accum,
                prm.lse_accum,
                slot,
                prm.n_max(),
                group * cols,
                cols,
                rank,
                threads,
            );
            sync::bar_sync(bar_id, threads);
            global::release_add_if(rank == 0, counter(prm, r, group), CONSUMERS);
        }
        if r == range.end_req {
            break;
        }
        r = range.end_req;
    }
}

/// Write split slot `slot`'s partial empty (O = 0, lse = -inf) for the columns `c0..c0 + nc`
/// below `n_max`; `rank` of `threads` threads share the work.
///
/// # Safety
/// `slot` is a split slot of the plan; the accumulators have `n_max` columns per slot.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn write_empty_partial(
    o_accum: *mut f32,
    lse_accum: *mut f32,
    slot: u32,
    n_max: u32,
    c0: u32,
    nc: u32,
    rank: u32,
    threads: u32,
) {
    let cols = if n_max > c0 { (n_max - c0).min(nc) } else { 0 };
    let base = o_accum.add(((slot * n_max + c0) * D_V as u32) as usize);
    let mut i = rank;
    while i < cols * D_V as u32 {
        *base.add(i as usize) = 0.0;
        i += threads;
    }
    let mut c = rank;
    while c < cols {
        *lse_accum.add((slot * n_max + c0 + c) as usize) = f32::NEG_INFINITY;
        c += threads;
    }
}

/// Write the requests with no rows (out = 0, lse = -inf) that fall to this CTA: those whose
/// index is this part's modulo the parts, in this CTA's column group. `rank` and `threads`:
/// this thread's index among the `threads` that call it.
///
/// # Safety
/// `prm` holds the batch's buffers.
#[inline(always)]
pub unsafe fn write_empty(prm: &DecodeParams, group: u32, group_cols: u32, rank: u32, threads: u32) {
    let col0 = group * group_cols;
    let mut r = index::part();
    while r < prm.batch {
        // No split in the plan (the request was empty when planned), or one split and no rows
        // now. (A request with several splits is always written by its merge.)
        let n = prm.splits(r);
        if n == 0 || (n == 1 && rows_of(*prm.seqlens.add(r as usize), prm.max_rows) == 0) {
            let rc = prm.req_cols(r);
            let cols = group_share(rc.n, col0, group_cols);
            let out = prm.out.add(((rc.row0 + col0) * D_V as u32) as usize) as *mut u32;
            let mut i = rank;
            while i < cols * D_V as u32 / 2 {
                *out.add(i as usize) = 0;
                i += threads;
            }
            let mut c = rank;
            while c < cols {
                let n_col = col0 + c;
                *prm.lse.add(rc.lse_at(n_col, prm.h_q) as usize) = f32::NEG_INFINITY;
                c += threads;
            }
        }
        r += index::parts();
    }
}

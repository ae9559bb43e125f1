//! A CPU emulation (f64) of what the GPU does: the split-KV decode kernel, which writes one
//! partial result per (request, split), and the combine kernel, which merges them. It exists to
//! property-test the scheduler's work assignment and the split/combine math against
//! [`crate::reference`]; it is not meant to be fast.
//!
//! Partial-buffer layout (f64 here; the GPU's accumulation buffers hold the same values): slot
//! `s = split_offsets[r] + split_index` holds, for each column `n = token * h_q + head` of
//! request `r`, the output `out[s][n][0..512]` normalized by the segment's own softmax sum and
//! the natural-log `lse[s][n]` (`-inf`, with a zero output, when the column sees no row of the
//! segment).
use crate::dtype::Element;
use crate::error::{EtapError, Result};
use crate::reference::{attend, run_units, to_f32};
use crate::shape::DecodeShape;
use crate::validate::validate_all;
use etap_core::{pages_of, schedule, WorkRange, D_QK, D_V, PAGE_ROWS};

/// The split kernel's results: the schedule it ran and the partial out / lse per split slot.
#[derive(Clone, Debug, PartialEq)]
pub struct SplitPartials {
    /// One work range per part (CTA), as [`etap_core::schedule`] wrote them.
    pub ranges: Vec<WorkRange>,
    /// `batch + 1` prefix offsets: request `r`'s splits are slots
    /// `split_offsets[r]..split_offsets[r + 1]`.
    pub split_offsets: Vec<u32>,
    /// Partial outputs, `[num_splits][s_q * h_q][512]`.
    pub out: Vec<f64>,
    /// Partial lse (natural log), `[num_splits][s_q * h_q]`.
    pub lse: Vec<f64>,
}

impl SplitPartials {
    /// Total number of split slots.
    pub fn num_splits(&self) -> usize {
        self.split_offsets.last().copied().unwrap_or(0) as usize
    }
}

/// Emulate the split-KV kernel over `num_parts` parts: schedule with
/// [`etap_core::schedule`], then for each part and each of its segments (one per request it
/// touches, see [`WorkRange::segment`]) compute the partial softmax of every column over the
/// segment's pages. A part's first segment has split index `first_split`, every later one 0.
///
/// Validates the inputs like [`crate::reference::mla_decode`]; `num_parts == 0` is
/// [`EtapError::Zero`]. Panics if the schedule is inconsistent (a segment whose slot is outside
/// its request's range, or written twice): that is a scheduler bug, which is what this
/// emulation is for finding.
pub fn split_partials<T: Element>(
    shape: &DecodeShape,
    q: &[T],
    cache: &[T],
    block_table: &[i32],
    seqlens: &[i32],
    softmax_scale: f32,
    num_parts: usize,
) -> Result<SplitPartials> {
    validate_all(shape, q, cache, block_table, seqlens, shape.out_len(), shape.lse_len())?;
    if num_parts == 0 {
        return Err(EtapError::Zero { arg: "num_parts" });
    }
    let max_pages = shape.max_pages as u32;
    let mut ranges = vec![WorkRange::EMPTY; num_parts];
    let mut split_offsets = vec![0u32; shape.batch + 1];
    let num_splits = schedule(seqlens, max_pages, &mut ranges, &mut split_offsets) as usize;
    assert_eq!(num_splits, split_offsets[shape.batch] as usize);

    // Every (request, page range, slot) segment, in part order.
    let mut segments: Vec<(usize, u32, u32, usize)> = Vec::new();
    for range in &ranges {
        if range.empty != 0 {
            continue;
        }
        for r in range.begin_req..=range.end_req {
            let pages = pages_of(seqlens[r as usize], max_pages);
            let (lo, hi) = range.segment(r, pages);
            if lo == hi {
                continue;
            }
            let split = if r == range.begin_req { range.first_split } else { 0 };
            let (s0, s1) = (
                split_offsets[r as usize] as usize,
                split_offsets[r as usize + 1] as usize,
            );
            let slot = s0 + split as usize;
            assert!(
                slot < s1,
                "scheduler bug: request {r} split {split} outside its {} splits",
                s1 - s0
            );
            segments.push((r as usize, lo, hi, slot));
        }
    }
    let mut written = vec![false; num_splits];
    for &(r, _, _, slot) in &segments {
        assert!(
            !written[slot],
            "scheduler bug: slot {slot} of request {r} written twice"
        );
        written[slot] = true;
    }

    let cols = shape.cols();
    let work: u64 = segments
        .iter()
        .map(|&(_, lo, hi, _)| (hi - lo) as u64 * (PAGE_ROWS * cols * (D_QK + D_V)) as u64)
        .sum();
    let states = run_units(segments.len(), work, |i| {
        let (r, lo, hi, _) = segments[i];
        attend(
            shape,
            q,
            cache,
            block_table,
            seqlens,
            softmax_scale as f64,
            r,
            0..cols,
            lo as usize..hi as usize,
        )
    });
    // Slots never written (impossible for a consistent schedule) stay as "no rows".
    let mut out = vec![0f64; num_splits * cols * D_V];
    let mut lse = vec![f64::NEG_INFINITY; num_splits * cols];
    for (&(_, _, _, slot), st) in segments.iter().zip(&states) {
        for n in 0..cols {
            lse[slot * cols + n] = st.finish(n, &mut out[(slot * cols + n) * D_V..][..D_V]);
        }
    }
    Ok(SplitPartials {
        ranges,
        split_offsets,
        out,
        lse,
    })
}

/// Emulate the combine kernel: per request and column, `lse = log(sum_i exp(lse_i))` over the
/// request's splits (ignoring `-inf` ones) and `out = sum_i exp(lse_i - lse) * out_i`. A request
/// with no splits, or a column whose partials are all `-inf`, gets zeros and `-inf`. Returns
/// out `[batch, s_q, h_q, 512]` and lse `[batch, h_q, s_q]`.
///
/// Errors with [`EtapError::Length`] when the partials do not fit the shape.
pub fn combine(shape: &DecodeShape, partials: &SplitPartials) -> Result<(Vec<f32>, Vec<f32>)> {
    let (out, lse) = combine_f64(shape, partials)?;
    Ok((to_f32(&out), to_f32(&lse)))
}

/// [`combine`] before the final rounding to f32.
pub fn combine_f64(shape: &DecodeShape, partials: &SplitPartials) -> Result<(Vec<f64>, Vec<f64>)> {
    let cols = shape.cols();
    let check = |arg, expected, got| {
        if expected == got {
            Ok(())
        } else {
            Err(EtapError::Length { arg, expected, got })
        }
    };
    check("split_offsets", shape.batch + 1, partials.split_offsets.len())?;
    let ns = partials.num_splits();
    check("partial out", ns * cols * D_V, partials.out.len())?;
    check("partial lse", ns * cols, partials.lse.len())?;
    let mut out = vec![0f64; shape.out_len()];
    let mut lse = vec![f64::NEG_INFINITY; shape.lse_len()];
    for r in 0..shape.batch {
        let (s0, s1) = (
            partials.split_offsets[r] as usize,
            partials.split_offsets[r + 1] as usize,
        );
        for n in 0..cols {
            let (t, h) = (n / shape.h_q, n % shape.h_q);
            let li = (r * shape.h_q + h) * shape.s_q + t;
            let parts = s0..s1.max(s0);
            let max = parts
                .clone()
                .map(|s| partials.lse[s * cols + n])
                .fold(f64::NEG_INFINITY, f64::max);
            if max == f64::NEG_INFINITY {
                continue; // zeros, -inf
            }
            let sum: f64 = parts.clone().map(|s| (partials.lse[s * cols + n] - max).exp()).sum();
            let total = max + sum.ln();
            let acc = &mut out[(r * cols + n) * D_V..][..D_V];
            for s in parts {
                let w = (partials.lse[s * cols + n] - total).exp();
                if w == 0.0 {
                    continue;
                }
                for (a, &o) in acc.iter_mut().zip(&partials.out[(s * cols + n) * D_V..][..D_V]) {
                    *a += w * o;
                }
            }
            lse[li] = total;
        }
    }
    Ok((out, lse))
}

/// The whole split-KV path on the CPU: [`split_partials`] over `num_parts` parts, then
/// [`combine`]. Must agree with [`crate::reference::mla_decode`] to f64 rounding.
pub fn mla_decode_split<T: Element>(
    shape: &DecodeShape,
    q: &[T],
    cache: &[T],
    block_table: &[i32],
    seqlens: &[i32],
    softmax_scale: f32,
    num_parts: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let partials = split_partials(shape, q, cache, block_table, seqlens, softmax_scale, num_parts)?;
    combine(shape, &partials)
}

/// [`mla_decode_split`] before the final rounding to f32.
pub fn mla_decode_split_f64<T: Element>(
    shape: &DecodeShape,
    q: &[T],
    cache: &[T],
    block_table: &[i32],
    seqlens: &[i32],
    softmax_scale: f32,
    num_parts: usize,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let partials = split_partials(shape, q, cache, block_table, seqlens, softmax_scale, num_parts)?;
    combine_f64(shape, &partials)
}

//! The correctness check: the GPU's output for sampled requests against the CPU reference.
use crate::gen::{HostInputs, SplitMix};
use etap::{Dtype, Element, Result};
use etap_core::{D_QK, D_V};

/// Upper bound on the reference's work for one check, in multiply-adds (a 64K-row request
/// with 128 heads is about 9e9; a few such run in parallel in seconds).
pub const REFERENCE_BUDGET: f64 = 6e10;

/// Multiply-adds of the reference for request `r`.
pub fn request_work(seqlens: &[i32], s_q: usize, h_q: usize, r: usize) -> f64 {
    seqlens[r].max(0) as f64 * (s_q * h_q) as f64 * (D_QK + D_V) as f64
}

/// The requests to check: the first, the last, the longest and one random (from `seed`),
/// without repeats, in that order, while their reference work fits [`REFERENCE_BUDGET`] (the
/// first pick always stays).
pub fn pick_requests(seqlens: &[i32], s_q: usize, h_q: usize, seed: u64) -> Vec<usize> {
    let b = seqlens.len();
    if b == 0 {
        return vec![];
    }
    let longest = (0..b).max_by_key(|&r| (seqlens[r], std::cmp::Reverse(r))).unwrap_or(0);
    let random = SplitMix::new(seed).below(b as u64) as usize;
    let mut picks: Vec<usize> = Vec::new();
    let mut work = 0.0;
    for r in [0, b - 1, longest, random] {
        if picks.contains(&r) {
            continue;
        }
        let w = request_work(seqlens, s_q, h_q, r);
        if !picks.is_empty() && work + w > REFERENCE_BUDGET {
            continue;
        }
        work += w;
        picks.push(r);
    }
    picks
}

/// The reference's out and lse of the picked requests, with what the check needs of the batch.
pub struct Reference {
    pub picks: Vec<usize>,
    pub out: Vec<Vec<f32>>,
    pub lse: Vec<Vec<f32>>,
    /// The dtype of the decode checked against it (its bound, `etap::check::max_rel_err`).
    pub dtype: Dtype,
    pub s_q: usize,
    pub h_q: usize,
    /// Every request's length, for the whole-batch written/finite check.
    pub seqlens: Vec<i32>,
}

/// Compute the reference for `picks`, one thread per request (the reference itself spreads a
/// request over threads only when it has more than 64 columns).
pub fn reference<T: Element>(x: &HostInputs<T>, picks: &[usize], kv_scale: Option<f32>) -> Result<Reference> {
    // A per-tensor FP8 cache's scale (`x.cache` its stored values) is folded as in
    // `etap::reference::mla_decode_fp8`.
    let scale = etap::reference::default_softmax_scale();
    let results: Vec<Result<(Vec<f32>, Vec<f32>)>> = std::thread::scope(|s| {
        let handles: Vec<_> = picks
            .iter()
            .map(|&r| {
                s.spawn(move || {
                    etap::reference::mla_decode_request_fp8(
                        &x.shape,
                        &x.q,
                        &x.cache,
                        kv_scale,
                        &x.block_table,
                        &x.seqlens,
                        scale,
                        r,
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("reference thread panicked"))
            .collect()
    });
    let mut out = Vec::new();
    let mut lse = Vec::new();
    for res in results {
        let (o, l) = res?;
        out.push(o);
        lse.push(l);
    }
    Ok(Reference {
        picks: picks.to_vec(),
        out,
        lse,
        dtype: T::DTYPE,
        s_q: x.shape.s_q,
        h_q: x.shape.h_q,
        seqlens: x.seqlens.clone(),
    })
}

/// The outcome of one comparison (`etap::check`).
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    /// The worst (request, token) row's relative error against the reference, over the picked
    /// requests, each row relative to its own reference norm.
    pub rel_err: f64,
    /// Largest |lse - reference| over the picked requests.
    pub lse_diff: f64,
    /// Whether any row of the whole out or lse, picked or not, is unwritten (NaN, as the
    /// benchmark poisons them), not finite, or not zeros and -inf where the token sees no row.
    pub nan: bool,
    /// Why the check fails (`etap::check::Outcome::failure`), `None` when it passes.
    pub failure: Option<String>,
}

impl Outcome {
    pub fn passes(&self) -> bool {
        self.failure.is_none()
    }
}

/// Compare the GPU's full `out` `[b, s_q, h_q, 512]` and `lse` `[b, h_q, s_q]` (as f32) with the
/// reference on its picked requests, row by row against the dtype's bound, and check every
/// request's rows for being written and finite.
pub fn compare(reference: &Reference, cols: usize, out: &[f32], lse: &[f32]) -> Outcome {
    debug_assert_eq!(cols, reference.s_q * reference.h_q);
    let refs: Vec<(usize, &[f32], &[f32])> = reference
        .picks
        .iter()
        .zip(reference.out.iter().zip(&reference.lse))
        .map(|(&r, (o, l))| (r, &o[..], &l[..]))
        .collect();
    let o = etap::check::compare(
        reference.dtype,
        reference.s_q,
        reference.h_q,
        &reference.seqlens,
        out,
        lse,
        &refs,
    );
    Outcome {
        rel_err: o.row_err,
        lse_diff: o.lse_diff,
        nan: o.unwritten.is_some(),
        failure: o.failure(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gen::generate;
    use etap::F16;

    #[test]
    fn picks() {
        assert_eq!(pick_requests(&[5, 9, 9, 1], 1, 16, 1)[..3], [0, 3, 1]);
        assert_eq!(pick_requests(&[7], 1, 16, 1), vec![0]);
        assert!(pick_requests(&[], 1, 16, 1).is_empty());
        // Four 64K requests with 128 heads: the budget keeps some, always the first.
        let big = vec![65536; 16];
        let p = pick_requests(&big, 1, 128, 2);
        assert!(!p.is_empty() && p[0] == 0);
        let w: f64 = p.iter().map(|&r| request_work(&big, 1, 128, r)).sum();
        assert!(w <= REFERENCE_BUDGET);
        let huge = vec![1 << 24; 2];
        assert_eq!(pick_requests(&huge, 4, 128, 2), vec![0]);
    }

    #[test]
    fn compare_against_the_reference() {
        let seqlens = [70, 3, 129];
        let x = generate::<F16>(3, 2, 16, &seqlens, 64, 9);
        let picks = pick_requests(&seqlens, 2, 16, 4);
        let reference = reference(&x, &picks, None).unwrap();
        assert_eq!(reference.dtype, Dtype::F16);
        let (out, lse) = etap::reference::mla_decode(
            &x.shape,
            &x.q,
            &x.cache,
            &x.block_table,
            &x.seqlens,
            etap::reference::default_softmax_scale(),
        )
        .unwrap();
        let cols = x.shape.cols();
        let ok = compare(&reference, cols, &out, &lse);
        assert!(ok.passes() && ok.rel_err == 0.0 && ok.lse_diff == 0.0, "{ok:?}");
        // A perturbed request fails; a NaN anywhere fails, even outside the picks.
        let mut bad = out.clone();
        let r = picks[0];
        for v in &mut bad[r * cols * D_V..(r + 1) * cols * D_V] {
            *v *= 1.1;
        }
        assert!(!compare(&reference, cols, &bad, &lse).passes());
        let unpicked = (0..3).find(|r| !picks.contains(r));
        let mut nan = out.clone();
        nan[unpicked.unwrap_or(1) * cols * D_V] = f32::NAN;
        let o = compare(&reference, cols, &nan, &lse);
        assert!(o.nan && !o.passes());
        let mut lse_bad = lse.clone();
        lse_bad[picks[0] * cols] += 1e-3;
        assert!(!compare(&reference, cols, &out, &lse_bad).passes());
        // fp16's own bound: an error of 1e-3 in one token's row (under the old shared 3e-3)
        // fails.
        let mut small = out.clone();
        for v in &mut small[r * cols * D_V..][..16 * D_V] {
            *v *= 1.001;
        }
        let o = compare(&reference, cols, &small, &lse);
        assert!(!o.passes() && o.rel_err < 3e-3, "{o:?}");
    }
}

//! Checking a decode's output against the CPU reference ([`crate::reference`]), as the GPU tests
//! and the benchmark do, request by request and row by row:
//!
//! - every (request, token) row of `out` (its `h_q * 512` values) is compared with the
//!   reference's row, relative to that row's own norm ([`compare`]): a pooled error over the
//!   batch lets a request with a small output norm (a long one: its output averages many V
//!   rows) be wrong by 5% unnoticed;
//! - the bound depends on the dtype ([`max_rel_err`]), derived from its rounding;
//! - every row of `out` and `lse` of the whole batch, compared or not, must be written and
//!   finite ([`check_written`]; `-inf` and zeros exactly where the token sees no row), so an
//!   unwritten row in an unsampled request fails when the caller poisoned the buffers with NaN.
//!
//! Public so deployments can run the same checks.
use crate::dtype::Dtype;
use crate::metrics::{max_abs_diff_lse, rel_err};
use etap_core::{visible_rows, D_V};

/// bf16's unit roundoff, `2^-8` (8 significant bits): the largest relative error of one
/// rounding to nearest.
pub const BF16_UNIT_ROUNDOFF: f64 = 1.0 / 256.0;

/// fp16's unit roundoff, `2^-11` (11 significant bits).
pub const F16_UNIT_ROUNDOFF: f64 = 1.0 / 2048.0;

/// Largest relative error of a (request, token) row of a bf16 output against the reference:
/// `0.75 u` with `u` = [`BF16_UNIT_ROUNDOFF`], 2.93e-3.
///
/// Derivation: the kernels round two things (docs/design.md §6): each softmax probability `p`
/// to the element type before it multiplies V (a wgmma operand), and the output once. q and the
/// cache are used exactly as given, the products are summed in f32 (relative error ~2^-24,
/// negligible), and the row sum `l` adds the unrounded `p`. Rounding to nearest moves a value
/// by at most `u` relative, about `u / 2` in the norm of a row of thousands of values (the
/// error is spread over the binade); P's rounding adds a smaller, data-dependent part. A CPU
/// model of exactly these roundings (`etap_tests::kernel_model`; the test
/// `cpu_props::tolerances_hold_a_correct_kernel` with `ETAP_TOL_CASES=40`: 440 requests of 1
/// to 2,000 rows, every `h_q`, `s_q` 1 to 4) gives a worst row of 0.58 u (2.25e-3; per request
/// about 2.1e-3, as the pooled 2.0e-3 measured on the GPU); short requests do not stand out,
/// as each row has `h_q * 512 >= 4096` values. The bound is 1.3x that worst row, 17x below a
/// request scaled by 1.05, and below the old pooled bound, 3e-3.
pub const MAX_REL_ERR_BF16: f64 = 0.75 * BF16_UNIT_ROUNDOFF;

/// Largest relative error of a (request, token) row of an fp16 output against the reference:
/// `0.75 u` with `u` = [`F16_UNIT_ROUNDOFF`], 3.66e-4.
///
/// Derivation: as [`MAX_REL_ERR_BF16`], with fp16's rounding: the model's worst row is 0.59 u
/// (2.91e-4; the GPU's pooled error is 2.6e-4). An fp16 kernel that rounds P or its output
/// through bf16 lands at 1.3e-3 to 1.9e-3 (4-5x this bound) and fails
/// (`cpu_props::f16_bound_catches_a_bf16_rounding`); the old shared 3e-3 let it pass.
pub const MAX_REL_ERR_F16: f64 = 0.75 * F16_UNIT_ROUNDOFF;

/// Largest absolute difference of lse (natural log) from the reference, for both dtypes: lse is
/// f32 throughout, so this holds the SFU approximations (`ex2`/`lg2.approx`), not the dtype.
pub const MAX_LSE_DIFF: f64 = 1e-4;

/// The bound on a (request, token) row's relative error for `dtype`.
pub fn max_rel_err(dtype: Dtype) -> f64 {
    match dtype {
        Dtype::Bf16 => MAX_REL_ERR_BF16,
        Dtype::F16 => MAX_REL_ERR_F16,
    }
}

/// One request's comparison with the reference.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RequestErr {
    pub request: usize,
    /// Relative error of the request's whole output against its own reference norm.
    pub rel_err: f64,
    /// The worst (request, token) row's relative error, against that row's reference norm,
    /// and its token.
    pub row_err: f64,
    pub worst_token: usize,
    /// Largest |lse - reference| of the request.
    pub lse_diff: f64,
}

/// Compare request `request`'s `out` (`[s_q, h_q, 512]`) and `lse` (`[h_q, s_q]`) with the
/// reference's (the same layouts, as [`crate::reference::mla_decode_request`] gives them).
/// Lengths that do not match count as infinite errors.
pub fn compare_request(
    s_q: usize,
    h_q: usize,
    request: usize,
    out: &[f32],
    lse: &[f32],
    ref_out: &[f32],
    ref_lse: &[f32],
) -> RequestErr {
    let row = h_q * D_V;
    let mut r = RequestErr {
        request,
        rel_err: rel_err(out, ref_out),
        row_err: 0.0,
        worst_token: 0,
        lse_diff: max_abs_diff_lse(lse, ref_lse),
    };
    if out.len() != s_q * row || ref_out.len() != s_q * row {
        r.row_err = f64::INFINITY;
        return r;
    }
    for t in 0..s_q {
        let e = rel_err(&out[t * row..][..row], &ref_out[t * row..][..row]);
        if e.is_nan() || e > r.row_err {
            r.row_err = e;
            r.worst_token = t;
        }
    }
    r
}

/// Whether the whole batch's output is written and finite: every value of `out`
/// (`[b, s_q, h_q, 512]`) finite; every `lse` (`[b, h_q, s_q]`) finite where the token sees at
/// least one row, and `-inf` with an all-zero output where it sees none (`seqlens[r] = 0`, or
/// an early token of `s_q > 1`). Needs no reference, so it covers the requests a big check does
/// not compare. `Err` names the first bad value.
pub fn check_written(s_q: usize, h_q: usize, seqlens: &[i32], out: &[f32], lse: &[f32]) -> Result<(), String> {
    let b = seqlens.len();
    if out.len() != b * s_q * h_q * D_V || lse.len() != b * h_q * s_q {
        return Err(format!(
            "out has {} values and lse {}; b = {b}, s_q = {s_q}, h_q = {h_q} needs {} and {}",
            out.len(),
            lse.len(),
            b * s_q * h_q * D_V,
            b * h_q * s_q
        ));
    }
    for (r, &seqlen) in seqlens.iter().enumerate() {
        for t in 0..s_q {
            let sees = visible_rows(seqlen.max(0) as u32, s_q as u32, t as u32) > 0;
            for h in 0..h_q {
                let o = &out[((r * s_q + t) * h_q + h) * D_V..][..D_V];
                let l = lse[(r * h_q + h) * s_q + t];
                let at = format!("request {r} token {t} head {h}");
                if let Some(d) = o.iter().position(|x| !x.is_finite()) {
                    return Err(format!("{at}: out[{d}] = {} (unwritten or NaN leaked)", o[d]));
                }
                if sees && !l.is_finite() {
                    return Err(format!("{at}: lse = {l}, but the token sees rows"));
                }
                if !sees {
                    if l != f32::NEG_INFINITY {
                        return Err(format!("{at}: lse = {l}, but the token sees no row (want -inf)"));
                    }
                    if let Some(d) = o.iter().position(|&x| x != 0.0) {
                        return Err(format!("{at}: out[{d}] = {}, but the token sees no row (want 0)", o[d]));
                    }
                }
            }
        }
    }
    Ok(())
}

/// The outcome of checking a batch: the worst request and row against the reference on the
/// compared requests, and whether the whole output is written and finite.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    pub dtype: Dtype,
    /// The worst compared request's [`RequestErr::rel_err`] (0 when none was compared).
    pub request_err: f64,
    /// The worst compared (request, token) row's relative error, and where.
    pub row_err: f64,
    pub worst_row: (usize, usize),
    /// Largest |lse - reference| over the compared requests.
    pub lse_diff: f64,
    /// [`check_written`]'s complaint about the whole batch, if any.
    pub unwritten: Option<String>,
}

impl Outcome {
    /// Within the dtype's bound on every compared row, lse within [`MAX_LSE_DIFF`], and the
    /// whole output written and finite.
    pub fn passes(&self) -> bool {
        self.failure().is_none()
    }

    /// Why the check fails, `None` when it passes.
    pub fn failure(&self) -> Option<String> {
        let mut why = Vec::new();
        if let Some(u) = &self.unwritten {
            why.push(u.clone());
        }
        let bound = max_rel_err(self.dtype);
        if self.row_err.is_nan() || self.row_err > bound {
            let (r, t) = self.worst_row;
            why.push(format!(
                "request {r} token {t}: rel err {:.3e} > {bound:.1e} ({})",
                self.row_err, self.dtype
            ));
        }
        if self.lse_diff.is_nan() || self.lse_diff > MAX_LSE_DIFF {
            why.push(format!("lse diff {:.3e} > {MAX_LSE_DIFF:.0e}", self.lse_diff));
        }
        if why.is_empty() {
            None
        } else {
            Some(why.join("; "))
        }
    }
}

/// Check a whole batch's `out` (`[b, s_q, h_q, 512]`) and `lse` (`[b, h_q, s_q]`), as f32, of
/// `dtype` against the reference on the requests in `references` (`(request, reference out,
/// reference lse)`, per request as [`crate::reference::mla_decode_request`] gives them; all of
/// them, or a sample of a big batch), and every request for [`check_written`].
pub fn compare(
    dtype: Dtype,
    s_q: usize,
    h_q: usize,
    seqlens: &[i32],
    out: &[f32],
    lse: &[f32],
    references: &[(usize, &[f32], &[f32])],
) -> Outcome {
    let mut o = Outcome {
        dtype,
        request_err: 0.0,
        row_err: 0.0,
        worst_row: (0, 0),
        lse_diff: 0.0,
        unwritten: check_written(s_q, h_q, seqlens, out, lse).err(),
    };
    let (per_out, per_lse) = (s_q * h_q * D_V, s_q * h_q);
    for &(r, ref_out, ref_lse) in references {
        let e = if (r + 1) * per_out <= out.len() && (r + 1) * per_lse <= lse.len() {
            compare_request(
                s_q,
                h_q,
                r,
                &out[r * per_out..][..per_out],
                &lse[r * per_lse..][..per_lse],
                ref_out,
                ref_lse,
            )
        } else {
            RequestErr {
                request: r,
                rel_err: f64::INFINITY,
                row_err: f64::INFINITY,
                worst_token: 0,
                lse_diff: f64::INFINITY,
            }
        };
        o.request_err = o.request_err.max(e.rel_err);
        if e.row_err.is_nan() || e.row_err > o.row_err {
            o.row_err = e.row_err;
            o.worst_row = (r, e.worst_token);
        }
        o.lse_diff = o.lse_diff.max(e.lse_diff);
    }
    o
}

/// The old, pooled check's error: one norm-wise relative error over the concatenated outputs
/// of `requests`. Kept only to show, in tests, what it misses; do not check with it.
pub fn pooled_rel_err(s_q: usize, h_q: usize, out: &[f32], references: &[(usize, &[f32], &[f32])]) -> f64 {
    let per_out = s_q * h_q * D_V;
    let (mut got, mut want) = (Vec::new(), Vec::new());
    for &(r, ref_out, _) in references {
        got.extend_from_slice(&out[r * per_out..][..per_out]);
        want.extend_from_slice(ref_out);
    }
    rel_err(&got, &want)
}

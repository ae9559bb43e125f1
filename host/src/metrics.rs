//! Error metrics for comparing decode outputs with the reference ([`crate::reference`]), as
//! the tests and the benchmark use them: norm-wise relative error of `out`, largest absolute
//! difference of `lse` with matching infinities. Public so deployments can run the same checks.

/// Norm-wise relative error `|a - b| / |b|` (Euclidean norms). Infinity when the lengths
/// differ, or when `a` is NaN or infinite where `b` is finite; when `b` is all zeros it is
/// `|a|`. Non-finite reference entries must be matched exactly.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    let mut num = 0f64;
    let mut den = 0f64;
    for (&x, &y) in a.iter().zip(b) {
        if !y.is_finite() {
            if x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()) {
                continue;
            }
            return f64::INFINITY;
        }
        if !x.is_finite() {
            return f64::INFINITY;
        }
        let d = x as f64 - y as f64;
        num += d * d;
        den += y as f64 * y as f64;
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// [`rel_err`] for f64 buffers.
pub fn rel_err_f64(a: &[f64], b: &[f64]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    let mut num = 0f64;
    let mut den = 0f64;
    for (&x, &y) in a.iter().zip(b) {
        if !y.is_finite() {
            if x == y || (x.is_nan() && y.is_nan()) {
                continue;
            }
            return f64::INFINITY;
        }
        if !x.is_finite() {
            return f64::INFINITY;
        }
        num += (x - y) * (x - y);
        den += y * y;
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// Largest `|a - b|` over two lse buffers, where equal infinities (`-inf == -inf`) count as 0
/// and a NaN, a length mismatch, or an infinity on one side only counts as infinity.
pub fn max_abs_diff_lse(a: &[f32], b: &[f32]) -> f64 {
    let a: Vec<f64> = a.iter().map(|&x| x as f64).collect();
    let b: Vec<f64> = b.iter().map(|&x| x as f64).collect();
    max_abs_diff_lse_f64(&a, &b)
}

/// [`max_abs_diff_lse`] for f64 buffers.
pub fn max_abs_diff_lse_f64(a: &[f64], b: &[f64]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    let mut worst = 0f64;
    for (&x, &y) in a.iter().zip(b) {
        let d = if x.is_nan() || y.is_nan() {
            f64::INFINITY
        } else if x.is_infinite() || y.is_infinite() {
            if x == y {
                0.0
            } else {
                f64::INFINITY
            }
        } else {
            (x - y).abs()
        };
        worst = worst.max(d);
    }
    worst
}

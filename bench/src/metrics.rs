//! The figures the benchmark reports, with the formulas of `/work/shared/anchors.md` (the peer
//! numbers use them, so ours compare): bytes = (sum(seqlens)*576 + b*s_q*h*(576+512))*2 and
//! FLOPs = 2*s_q*h*sum(seqlens)*(576+512). Both dtypes are 2 bytes an element.
use etap_core::{D_QK, D_V};

/// Bytes of one element of q, the cache and out (bf16 and fp16 alike).
pub const ELEM_BYTES: f64 = 2.0;

/// Rows of the cache the batch attends to: `sum(seqlens)` (negative lengths count as 0).
pub fn total_rows(seqlens: &[i32]) -> u64 {
    seqlens.iter().map(|&s| s.max(0) as u64).sum()
}

/// Bytes a decode step must move at least: every cache row once, q in and out out.
pub fn bytes_moved(seqlens: &[i32], batch: usize, s_q: usize, h_q: usize) -> f64 {
    bytes_moved_kv(seqlens, batch, s_q, h_q, D_QK as f64 * ELEM_BYTES)
}

/// [`bytes_moved`] with cache rows of `kv_row_bytes` (an FP8 cache: 656 or 576).
pub fn bytes_moved_kv(seqlens: &[i32], batch: usize, s_q: usize, h_q: usize, kv_row_bytes: f64) -> f64 {
    let rows = total_rows(seqlens) as f64;
    rows * kv_row_bytes + (batch * s_q * h_q) as f64 * (D_QK + D_V) as f64 * ELEM_BYTES
}

/// FLOPs of a decode step: Q·K^T over 576 and P·V over 512, two per multiply-add.
pub fn flops(seqlens: &[i32], s_q: usize, h_q: usize) -> f64 {
    2.0 * (s_q * h_q) as f64 * total_rows(seqlens) as f64 * (D_QK + D_V) as f64
}

/// GB/s (1e9 bytes a second) of `bytes` in `us` microseconds.
pub fn gbps(bytes: f64, us: f64) -> f64 {
    bytes / (us * 1e-6) / 1e9
}

/// TFLOP/s of `flops` in `us` microseconds.
pub fn tflops(flops: f64, us: f64) -> f64 {
    flops / (us * 1e-6) / 1e12
}

/// The bandwidth of a copy of `bytes` bytes (read once and written once) in `us`: GB/s.
pub fn copy_gbps(bytes: u64, us: f64) -> f64 {
    gbps(2.0 * bytes as f64, us)
}

/// The median (mean of the middle two for an even count); NaN for an empty slice.
pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        0.5 * (s[n / 2 - 1] + s[n / 2])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etap::metrics::{max_abs_diff_lse as lse_diff, rel_err};

    #[test]
    fn bytes_and_flops_match_the_anchor_formulas() {
        // b=16, s_q=1, h=16, s_k=64K: (16*65536*576 + 16*16*1088) * 2.
        let sl = vec![65536; 16];
        assert_eq!(bytes_moved(&sl, 16, 1, 16), 1_208_516_608.0);
        assert_eq!(flops(&sl, 1, 16), 2.0 * 16.0 * (16.0 * 65536.0) * 1088.0);
        // The anchors' H100 row: 418.8 us is 96% of a 3003 GB/s copy.
        let pct = gbps(bytes_moved(&sl, 16, 1, 16), 418.8) / 3003.0 * 100.0;
        assert!((pct - 96.1).abs() < 0.1, "{pct}");
        // s_q and h scale the q/out term and the FLOPs, not the cache term.
        let sl = vec![4641, 45118, 1730, 1696];
        let rows = (4641 + 45118 + 1730 + 1696) as f64;
        assert_eq!(
            bytes_moved(&sl, 4, 4, 16),
            (rows * 576.0 + 4.0 * 4.0 * 16.0 * 1088.0) * 2.0
        );
        assert_eq!(flops(&sl, 4, 16), 2.0 * 64.0 * rows * 1088.0);
        assert_eq!(total_rows(&[-5, 3]), 3);
    }

    #[test]
    fn rates() {
        assert!((gbps(3e9, 1000.0) - 3000.0).abs() < 1e-9);
        assert!((tflops(5e11, 1000.0) - 500.0).abs() < 1e-9);
        // 1 GiB read + written in 1 ms.
        assert!((copy_gbps(1 << 30, 1000.0) - 2.0 * (1u64 << 30) as f64 / 1e6).abs() < 1e-6);
    }

    #[test]
    fn median_odd_even_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn errors() {
        assert_eq!(rel_err(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert!((rel_err(&[3.0, 4.0 * 1.001], &[3.0, 4.0]) - 0.004 / 5.0).abs() < 1e-6);
        assert_eq!(rel_err(&[f32::NAN], &[1.0]), f64::INFINITY);
        assert_eq!(rel_err(&[1.0], &[1.0, 2.0]), f64::INFINITY);
        assert_eq!(lse_diff(&[f32::NEG_INFINITY, 1.0], &[f32::NEG_INFINITY, 1.5]), 0.5);
        assert_eq!(lse_diff(&[f32::NAN], &[1.0]), f64::INFINITY);
    }
}

//! FP8 KV-cache formats (issue 14): their layouts, quantizers and dequantizers, used by the
//! tests, the benchmark and the reference; the FP8 kernel (`kernels/src/decode/fp8.rs`) reads them.
//!
//! - **FlashMLA's "FP8 with scale"** (its layout V32): per token 656 bytes, the 512 latent
//!   values as `float8_e4m3fn`, then 4 `f32` scales (one per 128 values: the power of two at or
//!   above `amax / 448`, as FlashMLA's quantizer makes them), then the 64 RoPE values in bf16.
//!   The bytes equal FlashMLA's quantizer's except on a 128-value tile holding a NaN: there
//!   `amax` skips the NaN, where FlashMLA's scale (and the whole tile) becomes NaN.
//!   Pages of 64 tokens lie [`FP8_656_PAGE_STRIDE`] bytes apart: FlashMLA's quantizer allocates
//!   65 tokens a page and uses 64. Dequantized value = e4m3 x scale (exact in bf16: an e4m3 has
//!   4 significant bits and the scale is a power of two).
//! - **Per-tensor e4m3** (vLLM's fp8 MLA cache): 576 `float8_e4m3fn` values a token, one `f32`
//!   scale for the whole cache; dequantized value = e4m3 x scale.
//!
//! `float8_e4m3fn`: 1 sign, 4 exponent (bias 7) and 3 mantissa bits, no infinities, NaN =
//! `S.1111.111`, largest finite 448. Conversion from f32 rounds to nearest even; magnitudes
//! above 464 (which would round to 480, NaN's code) and NaN become NaN (PyTorch's
//! `.to(torch.float8_e4m3fn)` differs between versions there: some saturate to 448). The
//! quantizers' scales keep every value within 448.
use crate::dtype::{Bf16, Element};
use etap_core::{D_QK, D_V, TILE_ROWS};

/// The largest finite e4m3 value.
pub const E4M3_MAX: f32 = 448.0;
/// Values per scale of the 656-byte format.
pub const FP8_656_TILE: usize = 128;
/// Scales per token of the 656-byte format (512 / 128).
pub const FP8_656_SCALES: usize = D_V / FP8_656_TILE;
/// Bytes per token of the 656-byte format: 512 e4m3, 4 f32 scales, 64 bf16.
pub const FP8_656_TOKEN_BYTES: usize = D_V + 4 * FP8_656_SCALES + 2 * (D_QK - D_V);
/// Bytes between pages of the 656-byte format: FlashMLA's quantizer lays out 65 tokens a page.
pub const FP8_656_PAGE_STRIDE: usize = (TILE_ROWS + 1) * FP8_656_TOKEN_BYTES;
/// Bytes per token of the per-tensor format.
pub const FP8_TENSOR_TOKEN_BYTES: usize = D_QK;

const _: () = assert!(FP8_656_TOKEN_BYTES == 656);

/// `x` as `float8_e4m3fn`, rounded to nearest even; NaN above 464 in magnitude and for NaN.
pub fn e4m3_from_f32(x: f32) -> u8 {
    let sign = ((x.to_bits() >> 24) & 0x80) as u8;
    let a = x.abs();
    if a.is_nan() || a >= 480.0 {
        return sign | 0x7F;
    }
    // The e4m3 exponent of `a`'s binade, clamped to the subnormal range's (e = -6, spacing 2^-9).
    let bits = a.to_bits();
    let e = ((bits >> 23) as i32 - 127).max(-6);
    // Quantum of that binade: 2^(e - 3). `a / quantum` is exact (a power-of-two division).
    let q = a / f32::from_bits(((e - 3 + 127) as u32) << 23);
    // Round half to even, exactly: q < 2^4, so its fraction is exact in f32.
    let fl = q.floor();
    let frac = q - fl;
    let mut m = fl as u32;
    if frac > 0.5 || (frac == 0.5 && m % 2 == 1) {
        m += 1;
    }
    // m in 0..=16: m = 16 carries into the next binade.
    let (e, m) = if m == 16 { (e + 1, 8) } else { (e, m) };
    if m < 8 {
        // Subnormal (only when e == -6) or zero.
        return sign | m as u8;
    }
    sign | (((e + 7) as u8) << 3) | (m - 8) as u8
}

/// A `float8_e4m3fn` as f32 (exact).
pub fn e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let e = ((b >> 3) & 0xF) as i32;
    let m = (b & 7) as f32;
    if e == 15 && b & 7 == 7 {
        return f32::NAN;
    }
    let v = if e == 0 {
        m / 8.0 * 2f32.powi(-6)
    } else {
        (1.0 + m / 8.0) * 2f32.powi(e - 7)
    };
    sign * v
}

/// The scale of a 128-value tile of the 656-byte format whose largest magnitude is `amax`:
/// `2^ceil(log2(max(amax / 448, 1e-4)))`, in f32 as FlashMLA's quantizer computes it.
pub fn fp8_656_scale(amax: f32) -> f32 {
    2f32.powf((amax / E4M3_MAX).max(1e-4).log2().ceil())
}

/// Quantize a bf16 cache of `num_pages` pages (`[num_pages, 64, 576]`) to FlashMLA's 656-byte
/// format: `num_pages * FP8_656_PAGE_STRIDE` bytes, token `t` of page `p` at
/// `p * FP8_656_PAGE_STRIDE + t * 656` (each page's 65th token slot zero).
pub fn quantize_fp8_656(cache: &[Bf16], num_pages: usize) -> Vec<u8> {
    assert_eq!(cache.len(), num_pages * TILE_ROWS * D_QK, "cache: [num_pages, 64, 576]");
    let mut out = vec![0u8; num_pages * FP8_656_PAGE_STRIDE];
    for p in 0..num_pages {
        for t in 0..TILE_ROWS {
            let row = &cache[(p * TILE_ROWS + t) * D_QK..][..D_QK];
            let dst = &mut out[p * FP8_656_PAGE_STRIDE + t * FP8_656_TOKEN_BYTES..][..FP8_656_TOKEN_BYTES];
            for tile in 0..FP8_656_SCALES {
                let vals = &row[tile * FP8_656_TILE..][..FP8_656_TILE];
                let amax = vals.iter().fold(0f32, |m, v| m.max(v.to_f32().abs()));
                let scale = fp8_656_scale(amax);
                for (i, v) in vals.iter().enumerate() {
                    dst[tile * FP8_656_TILE + i] = e4m3_from_f32(v.to_f32() / scale);
                }
                dst[D_V + 4 * tile..][..4].copy_from_slice(&scale.to_le_bytes());
            }
            for (i, v) in row[D_V..].iter().enumerate() {
                let at = D_V + 4 * FP8_656_SCALES + 2 * i;
                dst[at..at + 2].copy_from_slice(&bytemuck::cast::<Bf16, u16>(*v).to_le_bytes());
            }
        }
    }
    out
}

/// The bf16 cache a 656-byte-format cache stands for (`[num_pages, 64, 576]`): e4m3 x scale for
/// the latent part (exact in bf16), the RoPE part as stored.
pub fn dequantize_fp8_656(bytes: &[u8], num_pages: usize) -> Vec<Bf16> {
    assert_eq!(
        bytes.len(),
        num_pages * FP8_656_PAGE_STRIDE,
        "bytes: num_pages pages of the 656-byte format"
    );
    let mut out = vec![Bf16::default(); num_pages * TILE_ROWS * D_QK];
    for p in 0..num_pages {
        for t in 0..TILE_ROWS {
            let src = &bytes[p * FP8_656_PAGE_STRIDE + t * FP8_656_TOKEN_BYTES..][..FP8_656_TOKEN_BYTES];
            let row = &mut out[(p * TILE_ROWS + t) * D_QK..][..D_QK];
            for tile in 0..FP8_656_SCALES {
                let scale = f32::from_le_bytes(src[D_V + 4 * tile..][..4].try_into().expect("4 bytes"));
                for i in 0..FP8_656_TILE {
                    let d = tile * FP8_656_TILE + i;
                    row[d] = Bf16::from_f32(e4m3_to_f32(src[d]) * scale);
                }
            }
            for i in 0..D_QK - D_V {
                let at = D_V + 4 * FP8_656_SCALES + 2 * i;
                row[D_V + i] = bytemuck::cast::<u16, Bf16>(u16::from_le_bytes([src[at], src[at + 1]]));
            }
        }
    }
    out
}

/// An FP8 cache's pages (64 rows of `row_bytes` each) moved from `from_rows` rows apart to
/// `to_rows` rows apart (both at least 64), the rows between pages zero: e.g. FlashMLA's
/// quantizer's 656-byte layout (65 rows a page) to a contiguous one (64, vLLM's), for
/// `DecodeShape::with_kv_page_stride`.
pub fn relayout_pages(bytes: &[u8], num_pages: usize, row_bytes: usize, from_rows: usize, to_rows: usize) -> Vec<u8> {
    assert!(
        from_rows >= TILE_ROWS && to_rows >= TILE_ROWS,
        "pages of {TILE_ROWS} rows are {from_rows} and {to_rows} rows apart"
    );
    assert_eq!(
        bytes.len(),
        num_pages * from_rows * row_bytes,
        "bytes: num_pages pages {from_rows} rows of {row_bytes} bytes apart"
    );
    let page = TILE_ROWS * row_bytes;
    let mut out = vec![0u8; num_pages * to_rows * row_bytes];
    for p in 0..num_pages {
        out[p * to_rows * row_bytes..][..page].copy_from_slice(&bytes[p * from_rows * row_bytes..][..page]);
    }
    out
}

/// The per-tensor scale that maps a cache's largest magnitude to e4m3's largest: `amax / 448`
/// (1 for an all-zero cache).
pub fn per_tensor_scale(cache: &[Bf16]) -> f32 {
    let amax = cache.iter().fold(0f32, |m, v| m.max(v.to_f32().abs()));
    if amax > 0.0 {
        amax / E4M3_MAX
    } else {
        1.0
    }
}

/// Quantize a bf16 cache to per-tensor e4m3 with `scale` (finite, > 0): `e4m3(x / scale)`, one
/// byte per value, in the cache's order.
pub fn quantize_e4m3_per_tensor(cache: &[Bf16], scale: f32) -> Vec<u8> {
    assert!(
        scale.is_finite() && scale > 0.0,
        "scale must be finite and positive, got {scale}"
    );
    cache.iter().map(|v| e4m3_from_f32(v.to_f32() / scale)).collect()
}

/// A per-tensor e4m3 cache's stored values, exactly (every e4m3 value is a bf16): with its
/// scale applied to the scores and the output, the exact reference's inputs
/// (`reference::mla_decode_fp8`), since e4m3 x scale is rarely a bf16.
pub fn e4m3_values(bytes: &[u8]) -> Vec<Bf16> {
    bytes.iter().map(|&b| Bf16::from_f32(e4m3_to_f32(b))).collect()
}

/// The cache a per-tensor e4m3 cache stands for: e4m3 x scale, as bf16 (exact unless the
/// scale has more significant bits than bf16 keeps; the f32 product is rounded once).
pub fn dequantize_e4m3_per_tensor(bytes: &[u8], scale: f32) -> Vec<Bf16> {
    bytes.iter().map(|&b| Bf16::from_f32(e4m3_to_f32(b) * scale)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips_and_the_grid_is_e4m3fn() {
        for b in 0..=255u8 {
            let v = e4m3_to_f32(b);
            if b & 0x7F == 0x7F {
                assert!(v.is_nan(), "{b:#x}");
                continue;
            }
            // -0 and +0 are distinct codes of the same value.
            assert_eq!(e4m3_from_f32(v), b, "code {b:#04x} = {v}");
        }
        assert_eq!(e4m3_to_f32(0x7E), 448.0);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(e4m3_to_f32(0x08), 2f32.powi(-6));
        assert_eq!(e4m3_to_f32(0x38), 1.0);
    }

    #[test]
    fn rounding_is_to_nearest_even_and_overflow_is_nan() {
        // Between 1 (0x38) and 1.125 (0x39): the midpoint goes to the even mantissa (1).
        assert_eq!(e4m3_from_f32(1.0625), 0x38);
        assert_eq!(e4m3_from_f32(1.0626), 0x39);
        // Between 1.125 (0x39) and 1.25 (0x3A): the midpoint goes up, to 0x3A.
        assert_eq!(e4m3_from_f32(1.1875), 0x3A);
        // Subnormals: half the smallest rounds to zero (even), just over it to the smallest.
        assert_eq!(e4m3_from_f32(2f32.powi(-10)), 0);
        assert_eq!(e4m3_from_f32(2f32.powi(-10) * 1.01), 1);
        // Up to 464 (the midpoint to the 480 e4m3fn lacks, a tie to even) rounds to 448; above
        // it to NaN.
        assert_eq!(e4m3_from_f32(460.0), 0x7E);
        assert_eq!(e4m3_from_f32(-464.0), 0xFE);
        assert_eq!(e4m3_from_f32(470.0), 0x7F);
        assert_eq!(e4m3_from_f32(480.0), 0x7F);
        assert_eq!(e4m3_from_f32(-1e9), 0xFF);
        assert_eq!(e4m3_from_f32(f32::NAN) & 0x7F, 0x7F);
        // The carry out of the top mantissa into the next binade.
        assert_eq!(e4m3_from_f32(1.96), 0x40);
    }

    #[test]
    fn scales_are_the_power_of_two_at_or_above_amax_over_448() {
        assert_eq!(fp8_656_scale(448.0), 1.0);
        assert_eq!(fp8_656_scale(449.0), 2.0);
        assert_eq!(fp8_656_scale(224.0), 0.5);
        assert_eq!(fp8_656_scale(0.0), 2f32.powi(-13)); // max(0, 1e-4) -> 2^ceil(log2 1e-4)
    }
}

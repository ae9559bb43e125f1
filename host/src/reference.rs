//! The CPU reference of `flash_mla_with_kvcache`: the same semantics as the GPU path, computed
//! with f64 accumulation. It is public so that deployments can check the kernels on their own
//! shapes, and cheap enough per request ([`mla_decode_request`]) to check sampled requests of a
//! large batch.
//!
//! The reference never reads a cache row at or past a request's sequence length, nor a
//! block-table slot past its used pages: tests poison both with NaN or junk.
use crate::dtype::Element;
use crate::error::{EtapError, Result};
use crate::shape::DecodeShape;
use crate::validate::validate_all;
use etap_core::{visible_rows, COLS_PER_CTA, D_QK, D_V};
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

/// FlashMLA's default softmax scale, `1 / sqrt(576)`.
pub fn default_softmax_scale() -> f32 {
    1.0 / (D_QK as f32).sqrt()
}

/// Online-softmax state of a range of columns of one request, after some pages: per column the
/// running max `m` of the scaled scores, the sum `l` of `exp(score - m)`, and the unnormalized
/// output `acc` (`d_v` values), plus whether the column saw any row at all.
pub(crate) struct ColState {
    pub cols: Range<usize>,
    pub m: Vec<f64>,
    pub l: Vec<f64>,
    pub acc: Vec<f64>,
    pub seen: Vec<bool>,
}

impl ColState {
    /// The (normalized out, lse) of column `i` (an index into `cols`): `out = acc / l`,
    /// `lse = m + ln l`; zeros and `-inf` for a column that saw no row.
    pub fn finish(&self, i: usize, out: &mut [f64]) -> f64 {
        let acc = &self.acc[i * D_V..][..D_V];
        if !self.seen[i] {
            out.fill(0.0);
            return f64::NEG_INFINITY;
        }
        let inv = 1.0 / self.l[i];
        for (o, a) in out.iter_mut().zip(acc) {
            *o = a * inv;
        }
        self.m[i] + self.l[i].ln()
    }
}

#[inline]
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut s = [0f64; 8];
    for (ca, cb) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for k in 0..8 {
            s[k] += ca[k] * cb[k];
        }
    }
    let mut t = 0.0;
    for v in s {
        t += v;
    }
    t
}

/// Attention of columns `cols` of request `r` over its pages `pages` (page indices into the
/// request's block-table row), masked causally. Inputs must have been validated.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend<T: Element>(
    shape: &DecodeShape,
    q: &[T],
    cache: &[T],
    block_table: &[i32],
    seqlens: &[i32],
    scale: f64,
    r: usize,
    cols: Range<usize>,
    pages: Range<usize>,
) -> ColState {
    let ncols = cols.len();
    let seqlen = seqlens[r].max(0) as usize;
    let mut st = ColState {
        cols: cols.clone(),
        m: vec![f64::NEG_INFINITY; ncols],
        l: vec![0.0; ncols],
        acc: vec![0.0; ncols * D_V],
        seen: vec![false; ncols],
    };
    // Visible-row bound of each column.
    let vis: Vec<usize> = cols
        .clone()
        .map(|n| visible_rows(seqlen as u32, shape.s_q as u32, (n / shape.h_q) as u32) as usize)
        .collect();
    let max_vis = vis.iter().copied().max().unwrap_or(0).min(seqlen);
    let ps = shape.page_size;
    let first_row = pages.start * ps;
    if max_vis <= first_row || ncols == 0 {
        return st;
    }
    // Query rows, in f64.
    let mut qf = vec![0f64; ncols * D_QK];
    for (i, n) in cols.clone().enumerate() {
        let src = &q[(r * shape.cols() + n) * D_QK..][..D_QK];
        for (d, s) in qf[i * D_QK..][..D_QK].iter_mut().zip(src) {
            *d = s.to_f32() as f64;
        }
    }
    let mut kbuf = vec![0f64; ps * D_QK];
    let mut scores = vec![0f64; ps];
    for pi in pages {
        let row0 = pi * ps;
        if row0 >= max_vis {
            break;
        }
        let nrows = (max_vis - row0).min(ps);
        let page = block_table[r * shape.max_pages + pi] as usize;
        // Only rows < max_vis <= seqlen of the page are read.
        let src = &cache[page * ps * D_QK..][..nrows * D_QK];
        for (d, s) in kbuf[..nrows * D_QK].iter_mut().zip(src) {
            *d = s.to_f32() as f64;
        }
        for i in 0..ncols {
            let nv = vis[i].saturating_sub(row0).min(nrows);
            if nv == 0 {
                continue;
            }
            let qi = &qf[i * D_QK..][..D_QK];
            let mut bm = f64::NEG_INFINITY;
            for (k, s) in scores[..nv].iter_mut().enumerate() {
                *s = scale * dot(qi, &kbuf[k * D_QK..][..D_QK]);
                if *s > bm {
                    bm = *s;
                }
            }
            let acc = &mut st.acc[i * D_V..][..D_V];
            if bm > st.m[i] {
                let f = (st.m[i] - bm).exp();
                st.l[i] *= f;
                for a in acc.iter_mut() {
                    *a *= f;
                }
                st.m[i] = bm;
            }
            st.seen[i] = true;
            let m = st.m[i];
            for (k, &s) in scores[..nv].iter().enumerate() {
                let p = (s - m).exp();
                st.l[i] += p;
                let v = &kbuf[k * D_QK..][..D_V];
                for (a, &x) in acc.iter_mut().zip(v) {
                    *a += p * x;
                }
            }
        }
    }
    st
}

/// Run `f(0..n)` on all cores when `work` (a rough count of multiply-adds) is large enough to
/// pay for threads; results come back in index order.
pub(crate) fn run_units<R: Send, F: Fn(usize) -> R + Sync>(n: usize, work: u64, f: F) -> Vec<R> {
    let threads = std::thread::available_parallelism()
        .map(|t| t.get())
        .unwrap_or(1)
        .min(n);
    if threads <= 1 || work < (1 << 26) {
        return (0..n).map(f).collect();
    }
    let next = AtomicUsize::new(0);
    let mut done: Vec<(usize, R)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            break;
                        }
                        mine.push((i, f(i)));
                    }
                    mine
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("reference worker panicked"))
            .collect()
    });
    done.sort_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, r)| r).collect()
}

/// Column chunks of a request, the unit of parallel work.
fn col_chunks(cols: usize) -> impl Iterator<Item = Range<usize>> {
    (0..cols)
        .step_by(COLS_PER_CTA)
        .map(move |c| c..(c + COLS_PER_CTA).min(cols))
}

/// Compute the requests `reqs` into `out` / `lse` (full-batch buffers, or one request's
/// buffers when `base` is that request). Inputs must have been validated.
#[allow(clippy::too_many_arguments)]
fn compute<T: Element>(
    shape: &DecodeShape,
    q: &[T],
    cache: &[T],
    block_table: &[i32],
    seqlens: &[i32],
    softmax_scale: f32,
    reqs: Range<usize>,
    out: &mut [f64],
    lse: &mut [f64],
) {
    let cols = shape.cols();
    let base = reqs.start;
    let units: Vec<(usize, Range<usize>)> = reqs
        .clone()
        .flat_map(|r| col_chunks(cols).map(move |c| (r, c)))
        .collect();
    let work: u64 = units
        .iter()
        .map(|(r, c)| seqlens[*r].max(0) as u64 * c.len() as u64 * (D_QK + D_V) as u64)
        .sum();
    let states = run_units(units.len(), work, |u| {
        let (r, c) = units[u].clone();
        let pages = (seqlens[r].max(0) as usize).div_ceil(shape.page_size);
        attend(
            shape,
            q,
            cache,
            block_table,
            seqlens,
            softmax_scale as f64,
            r,
            c,
            0..pages,
        )
    });
    for ((r, _), st) in units.iter().zip(&states) {
        let lr = r - base;
        for (i, n) in st.cols.clone().enumerate() {
            let l = st.finish(i, &mut out[(lr * cols + n) * D_V..][..D_V]);
            let (t, h) = (n / shape.h_q, n % shape.h_q);
            lse[(lr * shape.h_q + h) * shape.s_q + t] = l;
        }
    }
}

pub(crate) fn to_f32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// MLA decode on the CPU: `(out, lse)` with out `[batch, s_q, h_q, 512]` and lse
/// `[batch, h_q, s_q]` (natural log). Validates every input first (see [`crate::validate`]).
pub fn mla_decode<T: Element>(
    shape: &DecodeShape,
    q: &[T],
    cache: &[T],
    block_table: &[i32],
    seqlens: &[i32],
    softmax_scale: f32,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let (out, lse) = mla_decode_f64(shape, q, cache, block_table, seqlens, softmax_scale)?;
    Ok((to_f32(&out), to_f32(&lse)))
}

/// [`mla_decode`] before the final rounding to f32: for comparisons tighter than f32 allows
/// (the split merge's test in `tests/cpu_props.rs`, say).
pub fn mla_decode_f64<T: Element>(
    shape: &DecodeShape,
    q: &[T],
    cache: &[T],
    block_table: &[i32],
    seqlens: &[i32],
    softmax_scale: f32,
) -> Result<(Vec<f64>, Vec<f64>)> {
    validate_all(shape, q, cache, block_table, seqlens, shape.out_len(), shape.lse_len())?;
    let mut out = vec![0f64; shape.out_len()];
    let mut lse = vec![0f64; shape.lse_len()];
    compute(
        shape,
        q,
        cache,
        block_table,
        seqlens,
        softmax_scale,
        0..shape.batch,
        &mut out,
        &mut lse,
    );
    Ok((out, lse))
}

/// [`mla_decode`] into caller buffers. On error nothing is written.
#[allow(clippy::too_many_arguments)]
pub fn mla_decode_into<T: Element>(
    shape: &DecodeShape,
    q: &[T],
    cache: &[T],
    block_table: &[i32],
    seqlens: &[i32],
    softmax_scale: f32,
    out: &mut [f32],
    lse: &mut [f32],
) -> Result<()> {
    validate_all(shape, q, cache, block_table, seqlens, out.len(), lse.len())?;
    let (o, l) = mla_decode_f64(shape, q, cache, block_table, seqlens, softmax_scale)?;
    for (d, s) in out.iter_mut().zip(&o) {
        *d = *s as f32;
    }
    for (d, s) in lse.iter_mut().zip(&l) {
        *d = *s as f32;
    }
    Ok(())
}

/// MLA decode on the CPU in the packed query layout ([`DecodeShape::with_packed_q`]): request `r`'s
/// tokens are rows `q_offsets[r]..q_offsets[r + 1]`; `(out, lse)` with out `[total_q, h_q, 512]`
/// and lse `[total_q, h_q]`. Each request is the uniform reference of its own token count (token
/// `i` of `n` sees `seqlen - n + i + 1` rows). Validates every input first, `q_offsets` included.
#[allow(clippy::too_many_arguments)]
pub fn mla_decode_packed<T: Element>(
    shape: &DecodeShape,
    q: &[T],
    q_offsets: &[i32],
    cache: &[T],
    block_table: &[i32],
    seqlens: &[i32],
    softmax_scale: f32,
) -> Result<(Vec<f32>, Vec<f32>)> {
    packed_scaled(shape, q, q_offsets, cache, block_table, seqlens, softmax_scale, 1.0)
}

/// [`mla_decode_packed`] with every output value times `out_factor` before its rounding to f32
/// (a per-tensor FP8 cache's scale, [`fold_kv_scale`]; exact at 1).
#[allow(clippy::too_many_arguments)]
fn packed_scaled<T: Element>(
    shape: &DecodeShape,
    q: &[T],
    q_offsets: &[i32],
    cache: &[T],
    block_table: &[i32],
    seqlens: &[i32],
    softmax_scale: f32,
    out_factor: f64,
) -> Result<(Vec<f32>, Vec<f32>)> {
    validate_all(shape, q, cache, block_table, seqlens, shape.out_len(), shape.lse_len())?;
    crate::validate::validate_q_offsets(shape, q_offsets)?;
    let h = shape.h_q;
    let mut out = vec![0f32; shape.out_len()];
    let mut lse = vec![0f32; shape.lse_len()];
    for r in 0..shape.batch {
        let (first, n) = (q_offsets[r] as usize, (q_offsets[r + 1] - q_offsets[r]) as usize);
        if n == 0 {
            continue;
        }
        let one = DecodeShape {
            batch: 1,
            s_q: n,
            packed_q: None,
            ..*shape
        };
        let (o, l) = mla_decode_f64(
            &one,
            &q[first * h * D_QK..(first + n) * h * D_QK],
            cache,
            &block_table[r * shape.max_pages..(r + 1) * shape.max_pages],
            &seqlens[r..r + 1],
            softmax_scale,
        )?;
        for (d, s) in out[first * h * D_V..(first + n) * h * D_V].iter_mut().zip(&o) {
            *d = (*s * out_factor) as f32;
        }
        // [head][token] -> [token][head].
        for t in 0..n {
            for hd in 0..h {
                lse[(first + t) * h + hd] = l[hd * n + t] as f32;
            }
        }
    }
    Ok((out, lse))
}

/// MLA decode on the CPU over an FP8 cache (`shape.kv_format` one of the FP8 formats, `cache`
/// its bytes, `kv_scale` the per-tensor format's scale): the reference over the dequantized
/// cache, exactly. FlashMLA's format dequantizes to bf16 exactly (e4m3 x a power-of-two scale,
/// `crate::fp8::dequantize_fp8_656`). The per-tensor format's e4m3 x scale is rarely a bf16, so
/// the reference reads the stored values (`crate::fp8::e4m3_values`) with `softmax_scale x
/// kv_scale` for the scores (rounded to f32 once) and multiplies the output by `kv_scale`, as
/// the kernel folds the scale. With fp16 q (`T`) the cache's values are taken as fp16 too, as
/// the kernel computes in f16 (exact for the dequantized values in f16's range).
#[allow(clippy::too_many_arguments)]
pub fn mla_decode_fp8<T: Element>(
    shape: &DecodeShape,
    q: &[T],
    cache: &[u8],
    kv_scale: Option<f32>,
    block_table: &[i32],
    seqlens: &[i32],
    softmax_scale: f32,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let (shape16, values) = fp8_values::<T>(shape, cache, kv_scale)?;
    let (scores, out_factor) = fold_kv_scale(softmax_scale, kv_scale);
    let (out, lse) = mla_decode_f64(&shape16, q, &values, block_table, seqlens, scores)?;
    Ok((out.iter().map(|&o| (o * out_factor) as f32).collect(), to_f32(&lse)))
}

/// [`mla_decode_fp8`] in the packed query layout (`shape` made `with_packed_q`, request `r`'s
/// tokens rows `q_offsets[r]..q_offsets[r + 1]` of q, out and lse, as in
/// [`mla_decode_packed`]): the packed reference over the dequantized cache, the per-tensor scale
/// folded as there.
#[allow(clippy::too_many_arguments)]
pub fn mla_decode_fp8_packed<T: Element>(
    shape: &DecodeShape,
    q: &[T],
    q_offsets: &[i32],
    cache: &[u8],
    kv_scale: Option<f32>,
    block_table: &[i32],
    seqlens: &[i32],
    softmax_scale: f32,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let (shape16, values) = fp8_values::<T>(shape, cache, kv_scale)?;
    let (scores, out_factor) = fold_kv_scale(softmax_scale, kv_scale);
    packed_scaled(
        &shape16,
        q,
        q_offsets,
        &values,
        block_table,
        seqlens,
        scores,
        out_factor,
    )
}

/// An FP8 cache (`shape.kv_format`'s bytes) as the reference reads it, in `T` (exact: see
/// [`mla_decode_fp8`]), with the 16-bit shape it has then: FlashMLA's format dequantized, the
/// per-tensor format's stored values (its scale, checked here, folded by the caller).
fn fp8_values<T: Element>(shape: &DecodeShape, cache: &[u8], kv_scale: Option<f32>) -> Result<(DecodeShape, Vec<T>)> {
    crate::validate::validate_shape(shape)?;
    if cache.len() != shape.cache_len() {
        return Err(EtapError::Length {
            arg: "kv_cache",
            expected: shape.cache_len(),
            got: cache.len(),
        });
    }
    // Pages laid out `shape.kv_page_stride` rows apart: read in the format's own layout.
    let own = shape.kv_format.page_stride_rows(shape.page_size);
    let relaid;
    let cache = match (shape.kv_format.fp8_row_bytes(), shape.kv_page_stride_rows()) {
        (Some(row), rows) if rows != own => {
            relaid = crate::fp8::relayout_pages(cache, shape.num_pages, row as usize, rows, own);
            &relaid[..]
        }
        _ => cache,
    };
    let values = match (shape.kv_format, kv_scale) {
        (crate::KvFormat::Fp8Flashmla656, None) => crate::fp8::dequantize_fp8_656(cache, shape.num_pages),
        (crate::KvFormat::Fp8PerTensor, Some(s)) if s.is_finite() && s > 0.0 => crate::fp8::e4m3_values(cache),
        (f, s) => {
            return Err(EtapError::Invalid {
                arg: "kv_scale",
                why: format!("{s:?} does not go with a cache of {f:?}"),
            })
        }
    };
    let shape16 = DecodeShape {
        kv_page_stride: None,
        ..shape.with_kv_format(crate::KvFormat::Elem16)
    };
    Ok((shape16, values.iter().map(|v| T::from_f32(v.to_f32())).collect()))
}

/// A per-tensor FP8 cache's scale as the reference applies it, where the kernel folds it: the
/// scores' scale `softmax_scale x kv_scale` (rounded to f32 once) and the output's factor
/// `kv_scale`; without one, `softmax_scale` and 1.
fn fold_kv_scale(softmax_scale: f32, kv_scale: Option<f32>) -> (f32, f64) {
    match kv_scale {
        Some(s) => (softmax_scale * s, s as f64),
        None => (softmax_scale, 1.0),
    }
}

/// [`mla_decode_request`] over a cache as the FP8 reference reads it (`cache`: FlashMLA's
/// format dequantized, [`crate::fp8::dequantize_fp8_656`], with `kv_scale` `None`; or the
/// per-tensor format's stored values, [`crate::fp8::e4m3_values`], with its scale), the scale
/// folded as in [`mla_decode_fp8`]: request `r` of that batch's reference, for checks that
/// sample requests. `shape` is the 16-bit shape of `cache`; with `kv_scale` `None` this is
/// [`mla_decode_request`].
#[allow(clippy::too_many_arguments)]
pub fn mla_decode_request_fp8<T: Element>(
    shape: &DecodeShape,
    q: &[T],
    cache: &[T],
    kv_scale: Option<f32>,
    block_table: &[i32],
    seqlens: &[i32],
    softmax_scale: f32,
    r: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let (scores, out_factor) = fold_kv_scale(softmax_scale, kv_scale);
    let (mut out, lse) = request_f64(shape, q, cache, block_table, seqlens, scores, r)?;
    out.iter_mut().for_each(|o| *o *= out_factor);
    Ok((to_f32(&out), to_f32(&lse)))
}

/// The reference for request `r` alone: out `[s_q * h_q * 512]` (column order
/// `n = token * h_q + head`, i.e. `out[r]` of the full result) and lse `[h_q * s_q]` (`[head][token]`,
/// i.e. `lse[r]`). Validates the whole batch's inputs, and `r < batch`
/// ([`EtapError::RequestIndex`]).
pub fn mla_decode_request<T: Element>(
    shape: &DecodeShape,
    q: &[T],
    cache: &[T],
    block_table: &[i32],
    seqlens: &[i32],
    softmax_scale: f32,
    r: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let (out, lse) = request_f64(shape, q, cache, block_table, seqlens, softmax_scale, r)?;
    Ok((to_f32(&out), to_f32(&lse)))
}

/// [`mla_decode_request`] in f64, before the outputs' rounding.
fn request_f64<T: Element>(
    shape: &DecodeShape,
    q: &[T],
    cache: &[T],
    block_table: &[i32],
    seqlens: &[i32],
    softmax_scale: f32,
    r: usize,
) -> Result<(Vec<f64>, Vec<f64>)> {
    validate_all(shape, q, cache, block_table, seqlens, shape.out_len(), shape.lse_len())?;
    if r >= shape.batch {
        return Err(EtapError::RequestIndex {
            request: r,
            batch: shape.batch,
        });
    }
    let mut out = vec![0f64; shape.cols() * D_V];
    let mut lse = vec![0f64; shape.cols()];
    compute(
        shape,
        q,
        cache,
        block_table,
        seqlens,
        softmax_scale,
        r..r + 1,
        &mut out,
        &mut lse,
    );
    Ok((out, lse))
}

//! Shared test support for etap: seeded random decode cases with a poisoned paged cache and a
//! shuffled block table, and error metrics. Used by the CPU property tests and the GPU tests.
use etap::{DecodeShape, Element};
use etap_core::TILE_ROWS;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// How to build a [`Case`]. [`CaseSpec::new`] gives the defaults; change fields as needed.
#[derive(Clone, Debug)]
pub struct CaseSpec {
    pub batch: usize,
    pub s_q: usize,
    pub h_q: usize,
    /// Rows of a cache page (`etap_core::PAGE_SIZES`; 64 by default).
    pub page_size: usize,
    /// One length per request (`batch` of them).
    pub seqlens: Vec<i32>,
    pub seed: u64,
    /// Pages in the cache that no request uses (filled with NaN when `poison`).
    pub extra_pages: usize,
    /// Block-table slots per request beyond the longest request's pages (filled with junk).
    pub extra_slots: usize,
    /// Standard deviation of q's and of the cache's values.
    pub q_std: f32,
    pub kv_std: f32,
    /// Fill cache rows past each seqlen and unused pages with NaN, and unused block-table slots
    /// with -1 or out-of-range junk. On by default: nothing may read them.
    pub poison: bool,
    /// Softmax scale; `None` = `1 / sqrt(576)`.
    pub softmax_scale: Option<f32>,
}

impl CaseSpec {
    pub fn new(s_q: usize, h_q: usize, seqlens: &[i32], seed: u64) -> Self {
        CaseSpec {
            batch: seqlens.len(),
            s_q,
            h_q,
            page_size: etap::DEFAULT_PAGE_SIZE,
            seqlens: seqlens.to_vec(),
            seed,
            extra_pages: 3,
            extra_slots: 1,
            q_std: 1.0,
            kv_std: 1.0,
            poison: true,
            softmax_scale: None,
        }
    }
}

/// One decode step's inputs, in FlashMLA's layouts (see [`DecodeShape`]).
#[derive(Clone, Debug)]
pub struct Case<T: Element> {
    pub shape: DecodeShape,
    pub q: Vec<T>,
    pub cache: Vec<T>,
    pub block_table: Vec<i32>,
    pub seqlens: Vec<i32>,
    pub softmax_scale: f32,
    pub seed: u64,
}

/// A normal-ish sample (Box-Muller) that is not zero once rounded to `T`.
pub fn nonzero_normal<T: Element>(rng: &mut StdRng, std: f32) -> T {
    loop {
        let u1: f64 = rng.gen_range(f64::MIN_POSITIVE..1.0);
        let u2: f64 = rng.gen();
        let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
        let v = T::from_f32(z as f32 * std);
        let f = v.to_f32();
        if f != 0.0 && f.is_finite() {
            return v;
        }
    }
}

/// A block-table entry for a slot no request uses: -1 or junk outside the cache.
fn junk_entry(rng: &mut StdRng, num_pages: usize) -> i32 {
    match rng.gen_range(0..4) {
        0 => -1,
        1 => i32::MAX,
        2 => i32::MIN,
        _ => num_pages as i32 + rng.gen_range(0..1000),
    }
}

impl<T: Element> Case<T> {
    /// The default case for these sizes (see [`CaseSpec::new`]).
    pub fn new(s_q: usize, h_q: usize, seqlens: &[i32], seed: u64) -> Self {
        Self::from_spec(&CaseSpec::new(s_q, h_q, seqlens, seed))
    }

    /// Build a case: random q, a cache of `used pages + extra_pages` pages holding each
    /// request's rows on randomly permuted (non-contiguous) pages, poisoned leftovers.
    pub fn from_spec(spec: &CaseSpec) -> Self {
        assert_eq!(spec.batch, spec.seqlens.len(), "one seqlen per request");
        let mut rng = StdRng::seed_from_u64(spec.seed);
        let ps = spec.page_size;
        let pages_of = |s: i32| (s.max(0) as usize).div_ceil(ps);
        let needed = spec.seqlens.iter().map(|&s| pages_of(s)).max().unwrap_or(0);
        let max_pages = (needed + spec.extra_slots).max(1);
        let used: Vec<usize> = spec.seqlens.iter().map(|&s| pages_of(s)).collect();
        let total_used: usize = used.iter().sum();
        let num_pages = (total_used + spec.extra_pages).max(1);
        let shape = DecodeShape::new(spec.batch, spec.s_q, spec.h_q, num_pages, max_pages).with_page_size(ps);

        let q: Vec<T> = (0..shape.q_len())
            .map(|_| nonzero_normal(&mut rng, spec.q_std))
            .collect();
        let mut cache: Vec<T> = (0..shape.cache_len())
            .map(|_| nonzero_normal(&mut rng, spec.kv_std))
            .collect();

        let mut perm: Vec<usize> = (0..num_pages).collect();
        perm.shuffle(&mut rng);
        let mut block_table = vec![0i32; shape.block_table_len()];
        let mut next = 0usize;
        let row_len = shape.d_qk;
        for (r, &np) in used.iter().enumerate() {
            let seqlen = spec.seqlens[r].max(0) as usize;
            for slot in 0..max_pages {
                let e = &mut block_table[r * max_pages + slot];
                if slot < np {
                    let page = perm[next];
                    next += 1;
                    *e = page as i32;
                    if spec.poison {
                        // Rows of the last page past seqlen.
                        let first_dead = seqlen.saturating_sub(slot * ps).min(ps);
                        let start = (page * ps + first_dead) * row_len;
                        let end = (page + 1) * ps * row_len;
                        cache[start..end].fill(T::nan());
                    }
                } else {
                    *e = if spec.poison {
                        junk_entry(&mut rng, num_pages)
                    } else {
                        0
                    };
                }
            }
        }
        if spec.poison {
            for &page in &perm[next..] {
                cache[page * ps * row_len..(page + 1) * ps * row_len].fill(T::nan());
            }
        }
        Case {
            shape,
            q,
            cache,
            block_table,
            seqlens: spec.seqlens.clone(),
            softmax_scale: spec
                .softmax_scale
                .unwrap_or_else(etap::reference::default_softmax_scale),
            seed: spec.seed,
        }
    }

    /// The CPU reference's (out, lse) for this case.
    pub fn reference(&self) -> (Vec<f32>, Vec<f32>) {
        etap::reference::mla_decode(
            &self.shape,
            &self.q,
            &self.cache,
            &self.block_table,
            &self.seqlens,
            self.softmax_scale,
        )
        .expect("a generated case is valid")
    }

    /// The CPU reference for request `r` only (out `[s_q*h_q*512]`, lse `[h_q*s_q]`).
    pub fn reference_request(&self, r: usize) -> (Vec<f32>, Vec<f32>) {
        etap::reference::mla_decode_request(
            &self.shape,
            &self.q,
            &self.cache,
            &self.block_table,
            &self.seqlens,
            self.softmax_scale,
            r,
        )
        .expect("a generated case is valid")
    }

    /// Pages the requests use in all.
    pub fn used_pages(&self) -> usize {
        let ps = self.shape.page_size;
        self.seqlens.iter().map(|&s| (s.max(0) as usize).div_ceil(ps)).sum()
    }

    /// Request `r`'s row `row` of the cache, through its block table.
    pub fn kv_row(&self, r: usize, row: usize) -> &[T] {
        let (ps, d) = (self.shape.page_size, self.shape.d_qk);
        let page = self.block_table[r * self.shape.max_pages + row / ps] as usize;
        &self.cache[(page * ps + row % ps) * d..][..d]
    }
}

/// `batch` random sequence lengths in `0..=max`, with some zeros and page-boundary lengths mixed
/// in (when `max` allows).
pub fn random_seqlens(rng: &mut StdRng, batch: usize, max: i32) -> Vec<i32> {
    (0..batch)
        .map(|_| {
            let pick = match rng.gen_range(0..8) {
                0 => 0,
                1 => 1,
                2 => TILE_ROWS as i32 * rng.gen_range(1..=4),
                3 => TILE_ROWS as i32 * rng.gen_range(1..=4) + 1,
                _ => rng.gen_range(0..=max),
            };
            pick.min(max)
        })
        .collect()
}

pub use etap::metrics::{max_abs_diff_lse, max_abs_diff_lse_f64, rel_err, rel_err_f64};

/// A decode's `out` and `lse` on the host, once `stream` is done (the GPU tests' read-back).
pub fn read_back<T: Element>(
    stream: &cust::stream::Stream,
    out: &cust::memory::DeviceBuffer<T>,
    lse: &cust::memory::DeviceBuffer<f32>,
) -> (Vec<T>, Vec<f32>) {
    use cust::memory::CopyDestination;
    stream.synchronize().unwrap();
    let mut o = vec![T::default(); out.len()];
    let mut l = vec![0f32; lse.len()];
    out.copy_to(&mut o[..]).unwrap();
    lse.copy_to(&mut l[..]).unwrap();
    (o, l)
}

/// `case`'s cache in an FP8 `format` (etap's quantizers), with the per-tensor scale where the
/// format has one.
pub fn quantize_case(case: &Case<etap::Bf16>, format: etap::KvFormat) -> (Vec<u8>, Option<f32>) {
    use etap::{fp8, KvFormat};
    match format {
        KvFormat::Fp8Flashmla656 => (fp8::quantize_fp8_656(&case.cache, case.shape.num_pages), None),
        KvFormat::Fp8PerTensor => {
            let scale = fp8::per_tensor_scale(&case.cache);
            (fp8::quantize_e4m3_per_tensor(&case.cache, scale), Some(scale))
        }
        KvFormat::Elem16 => panic!("quantize_case: {format:?} is not an FP8 format"),
    }
}

/// An FP8 cache of `shape` (in its format's own layout) with its pages moved `rows` rows apart
/// (`etap::fp8::relayout_pages`), every byte of the rows between pages 0xFF (an e4m3 NaN, and
/// NaN scales and RoPE values in the 656-byte format): a kernel or reference that read them
/// would give NaN. Returns the shape `with_kv_page_stride(rows)` and its bytes.
pub fn spread_pages(shape: &DecodeShape, bytes: &[u8], rows: usize) -> (DecodeShape, Vec<u8>) {
    let row = shape.kv_format.fp8_row_bytes().expect("spread_pages: an FP8 cache") as usize;
    let own = shape.kv_format.page_stride_rows(shape.page_size);
    let mut spread = etap::fp8::relayout_pages(bytes, shape.num_pages, row, own, rows);
    for p in 0..shape.num_pages {
        spread[(p * rows + shape.page_size) * row..(p + 1) * rows * row].fill(0xFF);
    }
    (shape.with_kv_page_stride(rows), spread)
}

/// The packed query layout of a uniform case's q (`[b, s_q, h_q, 576]`): request `r` keeps its
/// last `lens[r]` tokens (so each token keeps its causal bounds). Returns the offsets
/// (`[b + 1]`, from 0) and the packed q (`[total_q, h_q, 576]`).
pub fn pack_q<T: Copy>(q: &[T], s_q: usize, h_q: usize, lens: &[usize]) -> (Vec<i32>, Vec<T>) {
    use etap_core::D_QK;
    let mut offsets = vec![0i32];
    let mut packed = Vec::new();
    for (r, &n) in lens.iter().enumerate() {
        offsets.push(offsets[r] + n as i32);
        packed.extend_from_slice(&q[(r * s_q + s_q - n) * h_q * D_QK..(r + 1) * s_q * h_q * D_QK]);
    }
    (offsets, packed)
}

/// Check a packed-layout decode (`o`, `l`: out `[total_q, h_q, 512]` and lse `[total_q, h_q]`)
/// against the packed reference (`ro`, `rl`, the same layout) request by request, with
/// `etap::check::compare`'s bound for `dtype`; requests of 0 tokens are skipped. The worst row
/// error, or the first failing request's description.
#[allow(clippy::too_many_arguments)]
pub fn compare_packed(
    dtype: etap::Dtype,
    h_q: usize,
    offsets: &[i32],
    seqlens: &[i32],
    o: &[f32],
    l: &[f32],
    ro: &[f32],
    rl: &[f32],
) -> Result<f64, String> {
    use etap_core::D_V;
    let mut worst = 0f64;
    for r in 0..seqlens.len() {
        let (first, n) = (offsets[r] as usize, (offsets[r + 1] - offsets[r]) as usize);
        if n == 0 {
            continue;
        }
        let rows = first * h_q..(first + n) * h_q;
        let pick = |v: &[f32]| v[rows.start * D_V..rows.end * D_V].to_vec();
        // lse [token][head] -> [head][token], the layout `compare` reads.
        let by_head = |v: &[f32]| -> Vec<f32> {
            (0..h_q)
                .flat_map(|h| (0..n).map(move |t| (h, t)))
                .map(|(h, t)| v[(first + t) * h_q + h])
                .collect()
        };
        let (ref_o, ref_l) = (pick(ro), by_head(rl));
        let outcome = etap::check::compare(
            dtype,
            n,
            h_q,
            &seqlens[r..r + 1],
            &pick(o),
            &by_head(l),
            &[(0, &ref_o[..], &ref_l[..])],
        );
        if let Some(why) = outcome.failure() {
            return Err(format!("request {r} ({n} tokens, seqlen {}): {why}", seqlens[r]));
        }
        worst = worst.max(outcome.row_err);
    }
    Ok(worst)
}

/// Round `x` to `T` and back: the rounding a 16-bit kernel operand or output goes through.
pub fn round_to<T: Element>(x: f32) -> f32 {
    T::from_f32(x).to_f32()
}

/// A CPU model of what the decode kernels compute, with the kernels' roundings and nothing
/// else (docs/design.md §6): q and the cache are used exactly as given (16-bit values, products
/// accumulated exactly enough: the f32 tensor-core sums are far below the roundings below);
/// the online softmax runs page by page with a running max; each probability `p` is rounded by
/// `round_p` before it multiplies V (the wgmma operand), while the row sum `l` adds the
/// unrounded `p`; the output `acc / l` is rounded once by `round_out`. With `round_to::<T>` for
/// both it is a correct kernel's result up to f32 noise; other roundings model faulty kernels
/// (an fp16 path that rounds through bf16, say). Returns out and lse as the reference lays
/// them out.
pub fn kernel_model<T: Element>(
    c: &Case<T>,
    round_p: impl Fn(f32) -> f32,
    round_out: impl Fn(f32) -> f32,
) -> (Vec<f32>, Vec<f32>) {
    use etap_core::{visible_rows, D_QK, D_V};
    let sh = c.shape;
    let scale = c.softmax_scale as f64;
    let mut out = vec![0f32; sh.out_len()];
    let mut lse = vec![f32::NEG_INFINITY; sh.lse_len()];
    let mut acc = vec![0f64; D_V];
    for r in 0..sh.batch {
        let seqlen = c.seqlens[r].max(0) as u32;
        for t in 0..sh.s_q {
            let vis = visible_rows(seqlen, sh.s_q as u32, t as u32) as usize;
            for h in 0..sh.h_q {
                if vis == 0 {
                    continue; // zeros and -inf
                }
                let q: Vec<f64> = c.q[((r * sh.s_q + t) * sh.h_q + h) * D_QK..][..D_QK]
                    .iter()
                    .map(|x| x.to_f32() as f64)
                    .collect();
                let (mut m, mut l) = (f64::NEG_INFINITY, 0f64);
                acc.fill(0.0);
                // The kernels' tiles of 64 rows, whatever the page size.
                for row0 in (0..vis).step_by(TILE_ROWS) {
                    let rows = (vis - row0).min(TILE_ROWS);
                    let kv = |k: usize| c.kv_row(r, row0 + k);
                    let s: Vec<f64> = (0..rows)
                        .map(|k| scale * q.iter().zip(kv(k)).map(|(a, b)| a * b.to_f32() as f64).sum::<f64>())
                        .collect();
                    let tile_max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    if tile_max > m {
                        let f = (m - tile_max).exp();
                        l *= f;
                        acc.iter_mut().for_each(|a| *a *= f);
                        m = tile_max;
                    }
                    for (k, &sk) in s.iter().enumerate() {
                        let p = (sk - m).exp() as f32;
                        l += p as f64;
                        let pr = round_p(p) as f64;
                        for (a, v) in acc.iter_mut().zip(kv(k)) {
                            *a += pr * v.to_f32() as f64;
                        }
                    }
                }
                let o = &mut out[((r * sh.s_q + t) * sh.h_q + h) * D_V..][..D_V];
                for (o, a) in o.iter_mut().zip(&acc) {
                    *o = round_out((a / l) as f32);
                }
                lse[(r * sh.h_q + h) * sh.s_q + t] = (m + l.ln()) as f32;
            }
        }
    }
    (out, lse)
}

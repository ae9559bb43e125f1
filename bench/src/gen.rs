//! Fast input generation: q and a paged cache of up to a few GB, filled in parallel with a
//! per-row splitmix64 stream (deterministic whatever the thread count), values roughly normal
//! (a sum of four uniforms) and never zero. Cache rows past each request's length and the
//! unused pages hold NaN; the block table maps each request to shuffled, non-contiguous pages.
use etap::{DecodeShape, Element};
use etap_core::D_QK;

/// Pages in the cache that no request uses (all NaN).
pub const EXTRA_PAGES: usize = 16;

/// splitmix64: a tiny, fast generator with good enough statistics for test data.
#[derive(Clone, Debug)]
pub struct SplitMix(u64);

/// splitmix64's output function, also used to derive independent per-row seeds.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl SplitMix {
    pub fn new(seed: u64) -> Self {
        SplitMix(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
    /// A standard normal sample (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // (0, 1]
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

/// A roughly standard-normal value from 64 random bits: the sum of four 16-bit uniforms,
/// centred and scaled to unit variance (range about +-3.46).
pub fn normalish(bits: u64) -> f32 {
    let s = (bits & 0xffff) + ((bits >> 16) & 0xffff) + ((bits >> 32) & 0xffff) + (bits >> 48);
    // Mean 4 * 65535 / 2; standard deviation 2 * sqrt((65536^2 - 1) / 12).
    (s as f32 - 131_070.0) * (1.0 / 37_837.23)
}

/// [`normalish`] rounded to `T`, never zero (a zero becomes +-0.5).
pub fn value<T: Element>(bits: u64) -> T {
    let t = T::from_f32(normalish(bits));
    if t.to_f32() == 0.0 {
        T::from_f32(if bits & 1 == 0 { 0.5 } else { -0.5 })
    } else {
        t
    }
}

fn threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Fill `buf` (rows of `row_len`) in parallel: row `r` gets random values from its own stream
/// (seeded from `seed` and `r`) when `live(r)`, NaN otherwise.
pub fn fill_rows<T: Element>(buf: &mut [T], row_len: usize, seed: u64, live: &(dyn Fn(usize) -> bool + Sync)) {
    assert!(row_len > 0 && buf.len().is_multiple_of(row_len));
    let rows = buf.len() / row_len;
    if rows == 0 {
        return;
    }
    let per = rows.div_ceil(threads().min(rows));
    std::thread::scope(|s| {
        for (t, chunk) in buf.chunks_mut(per * row_len).enumerate() {
            s.spawn(move || {
                for (i, row) in chunk.chunks_mut(row_len).enumerate() {
                    let r = t * per + i;
                    if live(r) {
                        let mut rng = SplitMix::new(mix(seed ^ mix(r as u64 ^ 0x5851_F42D_4C95_7F2D)));
                        for x in row.iter_mut() {
                            *x = value(rng.next_u64());
                        }
                    } else {
                        row.fill(T::nan());
                    }
                }
            });
        }
    });
}

/// Pages of `page_size` rows of a request of `seqlen` rows.
pub fn pages_for(seqlen: i32, page_size: usize) -> usize {
    (seqlen.max(0) as usize).div_ceil(page_size)
}

/// The block table of a batch: `(shape, block_table, live rows of each page)`. Each request
/// gets its pages from a shuffled permutation of all pages (so they are not contiguous); slots
/// past a request's pages hold -1; [`EXTRA_PAGES`] pages stay unused.
pub fn block_table(
    batch: usize,
    s_q: usize,
    h_q: usize,
    seqlens: &[i32],
    page_size: usize,
    seed: u64,
) -> (DecodeShape, Vec<i32>, Vec<u8>) {
    assert_eq!(seqlens.len(), batch, "one seqlen per request");
    let used: Vec<usize> = seqlens.iter().map(|&s| pages_for(s, page_size)).collect();
    let max_pages = used.iter().copied().max().unwrap_or(0).max(1);
    let num_pages = used.iter().sum::<usize>() + EXTRA_PAGES;
    let shape = DecodeShape::new(batch, s_q, h_q, num_pages, max_pages).with_page_size(page_size);
    let mut perm: Vec<u32> = (0..num_pages as u32).collect();
    let mut rng = SplitMix::new(mix(seed ^ 0xB10C_7AB1E));
    for i in (1..perm.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        perm.swap(i, j);
    }
    let mut table = vec![-1i32; batch * max_pages];
    let mut live = vec![0u8; num_pages];
    let mut next = 0;
    for (r, (&np, &len)) in used.iter().zip(seqlens).enumerate() {
        for slot in 0..np {
            let page = perm[next] as usize;
            next += 1;
            table[r * max_pages + slot] = page as i32;
            live[page] = (len as usize - slot * page_size).min(page_size) as u8;
        }
    }
    (shape, table, live)
}

/// One decode step's host inputs.
pub struct HostInputs<T> {
    pub shape: DecodeShape,
    pub q: Vec<T>,
    pub cache: Vec<T>,
    pub block_table: Vec<i32>,
    pub seqlens: Vec<i32>,
}

/// Generate the inputs of a batch (see the module docs), its cache in pages of `page_size` rows.
pub fn generate<T: Element>(
    batch: usize,
    s_q: usize,
    h_q: usize,
    seqlens: &[i32],
    page_size: usize,
    seed: u64,
) -> HostInputs<T> {
    let (shape, table, live) = block_table(batch, s_q, h_q, seqlens, page_size, seed);
    let mut q = vec![T::default(); shape.q_len()];
    fill_rows(&mut q, D_QK, mix(seed ^ 0x0051), &|_| true);
    let mut cache = vec![T::default(); shape.cache_len()];
    fill_rows(&mut cache, D_QK, mix(seed ^ 0xCAC4E), &|row| {
        row % page_size < live[row / page_size] as usize
    });
    HostInputs {
        shape,
        q,
        cache,
        block_table: table,
        seqlens: seqlens.to_vec(),
    }
}

/// `batch` lengths from a normal distribution (`mean`, `sd`), rounded and clamped to
/// `[lo, hi]`; deterministic for a seed.
pub fn varlen_seqlens(batch: usize, mean: f64, sd: f64, lo: i32, hi: i32, seed: u64) -> Vec<i32> {
    let mut rng = SplitMix::new(seed);
    (0..batch)
        .map(|_| {
            let v = (mean + sd * rng.normal()).round();
            v.clamp(lo as f64, hi as f64) as i32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use etap::Bf16;

    #[test]
    fn varlen_is_deterministic_and_clamped() {
        let a = varlen_seqlens(1000, 8192.0, 4096.0, 1, 32768, 7);
        let b = varlen_seqlens(1000, 8192.0, 4096.0, 1, 32768, 7);
        assert_eq!(a, b);
        assert_ne!(a, varlen_seqlens(1000, 8192.0, 4096.0, 1, 32768, 8));
        assert!(a.iter().all(|&s| (1..=32768).contains(&s)));
        let mean = a.iter().map(|&s| s as f64).sum::<f64>() / a.len() as f64;
        assert!((mean - 8192.0).abs() < 500.0, "mean {mean}");
        // A wide distribution hits both clamps.
        let w = varlen_seqlens(1000, 100.0, 1000.0, 1, 500, 1);
        assert!(w.contains(&1) && w.contains(&500));
    }

    #[test]
    fn normalish_is_roughly_standard_and_values_are_never_zero() {
        let mut rng = SplitMix::new(1);
        let n = 200_000;
        let v: Vec<f64> = (0..n).map(|_| normalish(rng.next_u64()) as f64).collect();
        let mean = v.iter().sum::<f64>() / n as f64;
        let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.01 && (var - 1.0).abs() < 0.02, "mean {mean} var {var}");
        // The exact centre of the sum maps to zero; value() avoids it.
        let centre = 0x7fff_u64 | (0x7fff << 16) | (0x8000 << 32) | (0x8000 << 48);
        assert_eq!(normalish(centre), 0.0);
        assert_ne!(value::<Bf16>(centre).to_f32(), 0.0);
    }

    #[test]
    fn inputs_are_poisoned_past_seqlen_and_pages_shuffled() {
        let seqlens = [65, 1, 200, 128];
        for ps in [16, 64, 128] {
            let x = generate::<Bf16>(4, 2, 8, &seqlens, ps, 3);
            let s = x.shape;
            let pages: Vec<usize> = seqlens.iter().map(|&l| (l as usize).div_ceil(ps)).collect();
            assert_eq!(s.page_size, ps);
            assert_eq!(s.max_pages, *pages.iter().max().unwrap());
            assert_eq!(s.num_pages, pages.iter().sum::<usize>() + EXTRA_PAGES);
            assert!(x.q.iter().all(|v| v.to_f32().is_finite() && v.to_f32() != 0.0));
            let mut seen = vec![false; s.num_pages];
            for (r, &len) in seqlens.iter().enumerate() {
                let np = pages_for(len, ps);
                for slot in 0..s.max_pages {
                    let e = x.block_table[r * s.max_pages + slot];
                    if slot >= np {
                        assert_eq!(e, -1);
                        continue;
                    }
                    let page = e as usize;
                    assert!(!seen[page], "page {page} used twice");
                    seen[page] = true;
                    for row in 0..ps {
                        let v = x.cache[(page * ps + row) * D_QK].to_f32();
                        let live = slot * ps + row < len as usize;
                        assert_eq!(live, v.is_finite(), "page size {ps}: request {r} slot {slot} row {row}");
                        assert!(v != 0.0);
                    }
                }
            }
            // Unused pages are NaN throughout.
            for (page, _) in seen.iter().enumerate().filter(|(_, &u)| !u) {
                let p = &x.cache[page * ps * D_QK..(page + 1) * ps * D_QK];
                assert!(p.iter().all(|v| v.to_f32().is_nan()));
            }
            // Not the identity mapping, and the same for the same seed.
            let first: Vec<i32> = (0..4).map(|r| x.block_table[r * s.max_pages]).collect();
            let identity: Vec<i32> = (0..4).map(|r| pages[..r].iter().sum::<usize>() as i32).collect();
            assert_ne!(first, identity);
            let y = generate::<Bf16>(4, 2, 8, &seqlens, ps, 3);
            assert_eq!(x.block_table, y.block_table);
            assert!(x
                .cache
                .iter()
                .zip(&y.cache)
                .all(|(a, b)| a.0.to_bits() == b.0.to_bits()));
        }
    }
}

//! The benchmark's configurations: the shapes of `/work/shared/anchors.md` (DeepSeek-style decode
//! with 16 to 128 heads per GPU), each with a name for `--only`.
use crate::gen::varlen_seqlens;

/// How a configuration's lengths were made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Every request has the same length.
    Uniform,
    /// Normal lengths (mean, sd), clamped.
    Varlen,
    /// A fixed list of unequal lengths.
    Imbalanced,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub name: String,
    pub batch: usize,
    pub s_q: usize,
    pub h_q: usize,
    pub seqlens: Vec<i32>,
    pub kind: Kind,
    /// Rows of a cache page (64 unless `--pages` says otherwise).
    pub page_size: usize,
    /// Run in the packed query layout, every request at `s_q` tokens (`--packed`).
    pub packed: bool,
    /// The cache's format (`--kv`): 16-bit, or an FP8 one quantized from the 16-bit cache.
    pub kv: etap::KvFormat,
}

/// Seed of the varlen lengths (fixed: the same batch every run).
pub const VARLEN_SEED: u64 = 0x5EED_8192;
/// The imbalanced batch published with ThunderKittens' fused MLA decode.
pub const IMBALANCED: [i32; 4] = [4641, 45118, 1730, 1696];

/// `4096` -> `4k`, `1000` -> `1000`.
pub fn len_label(s_k: usize) -> String {
    if s_k >= 1024 && s_k.is_multiple_of(1024) {
        format!("{}k", s_k / 1024)
    } else {
        s_k.to_string()
    }
}

impl Config {
    /// All requests of length `s_k`; named `b{b}-sq{s_q}-h{h}-sk{s_k}`.
    pub fn uniform(batch: usize, s_q: usize, h_q: usize, s_k: usize) -> Config {
        Config {
            name: format!("b{batch}-sq{s_q}-h{h_q}-sk{}", len_label(s_k)),
            batch,
            s_q,
            h_q,
            seqlens: vec![s_k as i32; batch],
            kind: Kind::Uniform,
            page_size: etap::DEFAULT_PAGE_SIZE,
            packed: false,
            kv: etap::KvFormat::Elem16,
        }
    }

    /// b=32 with normal lengths (mean 8192, sd 4096, clamped to [1, 32768]).
    pub fn varlen() -> Config {
        let batch = 32;
        Config {
            name: "b32-sq1-h16-varlen8k".into(),
            batch,
            s_q: 1,
            h_q: 16,
            seqlens: varlen_seqlens(batch, 8192.0, 4096.0, 1, 32768, VARLEN_SEED),
            kind: Kind::Varlen,
            page_size: etap::DEFAULT_PAGE_SIZE,
            packed: false,
            kv: etap::KvFormat::Elem16,
        }
    }

    /// The imbalanced batch [4641, 45118, 1730, 1696], h=16.
    pub fn imbalanced(s_q: usize) -> Config {
        Config {
            name: format!("imbalanced-sq{s_q}-h16"),
            batch: IMBALANCED.len(),
            s_q,
            h_q: 16,
            seqlens: IMBALANCED.to_vec(),
            kind: Kind::Imbalanced,
            page_size: etap::DEFAULT_PAGE_SIZE,
            packed: false,
            kv: etap::KvFormat::Elem16,
        }
    }

    /// The same configuration with its cache in `kv`, named with `-fp8-656` or `-fp8-tensor`.
    pub fn with_kv(mut self, kv: etap::KvFormat) -> Config {
        if kv != self.kv {
            assert_eq!(self.kv, etap::KvFormat::Elem16, "one format a configuration");
            self.name.push_str(match kv {
                etap::KvFormat::Fp8Flashmla656 => "-fp8-656",
                etap::KvFormat::Fp8PerTensor => "-fp8-tensor",
                etap::KvFormat::Elem16 => "",
            });
            self.kv = kv;
        }
        self
    }

    /// The same configuration in the packed query layout, named with `-packed`.
    pub fn packed(mut self) -> Config {
        if !self.packed {
            self.name.push_str("-packed");
            self.packed = true;
        }
        self
    }

    /// The same configuration with pages of `page_size` rows, named with `-p{page_size}` unless
    /// it is the default 64.
    pub fn with_page_size(mut self, page_size: usize) -> Config {
        if page_size != self.page_size {
            if self.page_size != etap::DEFAULT_PAGE_SIZE {
                let cut = self.name.rfind("-p").expect("a page-size suffix");
                self.name.truncate(cut);
            }
            if page_size != etap::DEFAULT_PAGE_SIZE {
                self.name.push_str(&format!("-p{page_size}"));
            }
            self.page_size = page_size;
        }
        self
    }

    /// The longest request's length.
    pub fn max_len(&self) -> i32 {
        self.seqlens.iter().copied().max().unwrap_or(0)
    }

    /// Whether this is a point of the b=16, s_q=1, h=16 length sweep (the chart).
    pub fn in_sweep(&self) -> bool {
        self.kind == Kind::Uniform
            && self.batch == 16
            && self.s_q == 1
            && self.h_q == 16
            && self.page_size == etap::DEFAULT_PAGE_SIZE
    }
}

/// Every configuration, in the order they run.
pub fn all() -> Vec<Config> {
    let mut v: Vec<Config> = [1, 2, 4, 8, 16, 32, 64]
        .iter()
        .map(|k| Config::uniform(16, 1, 16, k * 1024))
        .collect();
    v.push(Config::uniform(16, 2, 16, 65536));
    for h in [32, 64, 128] {
        v.push(Config::uniform(16, 1, h, 65536));
    }
    v.push(Config::uniform(64, 1, 16, 8192));
    v.push(Config::uniform(128, 1, 16, 4096));
    // The serving-mode shapes of the speed issue (anchors.md) not above.
    v.push(Config::uniform(128, 1, 16, 1024));
    v.push(Config::uniform(32, 2, 16, 8192));
    v.push(Config::uniform(16, 2, 16, 16384));
    v.push(Config::uniform(16, 2, 64, 4096));
    v.push(Config::uniform(64, 1, 128, 4096));
    v.push(Config::uniform(16, 1, 128, 16384));
    v.push(Config::varlen());
    for s_q in [1, 2, 4] {
        v.push(Config::imbalanced(s_q));
    }
    v
}

/// The `--quick` set: b=16 at 4K and 64K, and the imbalanced batch at s_q=1.
pub fn quick() -> Vec<Config> {
    vec![
        Config::uniform(16, 1, 16, 4096),
        Config::uniform(16, 1, 16, 65536),
        Config::imbalanced(1),
    ]
}

/// The configurations whose name contains any of `patterns` (all of them when empty).
pub fn filter(configs: Vec<Config>, patterns: &[String]) -> Vec<Config> {
    if patterns.is_empty() {
        return configs;
    }
    configs
        .into_iter()
        .filter(|c| patterns.iter().any(|p| c.name.contains(p.as_str())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_filterable() {
        let all = all();
        assert_eq!(all.len(), 7 + 4 + 2 + 6 + 1 + 3);
        let mut names: Vec<&str> = all.iter().map(|c| c.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), all.len());
        assert_eq!(all[2].name, "b16-sq1-h16-sk4k");
        // `sk4k` does not match `sk64k`.
        let f = filter(all.clone(), &["sk4k".into()]);
        assert_eq!(
            f.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
            [
                "b16-sq1-h16-sk4k",
                "b128-sq1-h16-sk4k",
                "b16-sq2-h64-sk4k",
                "b64-sq1-h128-sk4k"
            ]
        );
        assert_eq!(filter(all.clone(), &["imbalanced".into(), "h128".into()]).len(), 6);
        assert_eq!(filter(all.clone(), &[]).len(), all.len());
        assert_eq!(all.iter().filter(|c| c.in_sweep()).count(), 7);
        for q in quick() {
            assert!(all.contains(&q), "{}", q.name);
        }
    }

    #[test]
    fn shapes() {
        let v = Config::varlen();
        assert_eq!(v.seqlens.len(), 32);
        assert_eq!(v, Config::varlen());
        let i = Config::imbalanced(4);
        assert_eq!((i.batch, i.s_q, i.h_q, i.max_len()), (4, 4, 16, 45118));
        assert_eq!(len_label(65536), "64k");
        assert_eq!(len_label(1000), "1000");
        assert_eq!(Config::uniform(1, 1, 16, 1000).name, "b1-sq1-h16-sk1000");
        let p = Config::uniform(1, 1, 16, 1000).with_page_size(16);
        assert_eq!((p.name.as_str(), p.page_size), ("b1-sq1-h16-sk1000-p16", 16));
        let p = p.with_page_size(128).with_page_size(64);
        assert_eq!((p.name.as_str(), p.page_size), ("b1-sq1-h16-sk1000", 64));
    }
}

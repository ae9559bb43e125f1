//! Command-line options.
use crate::configs::{self, Config};
use etap::{Dtype, Layout};
use std::path::PathBuf;

pub const USAGE: &str = "usage: etap-bench [OPTIONS]   (or: cargo xtask bench [OPTIONS])

Benchmarks etap's MLA decode on an H100/H200: a 1 GiB device-to-device copy first (the roof),
then for each configuration a correctness check against the CPU reference and the median time
of decode_into (one decode kernel, split merge included; the plan is made once per configuration, outside the
timed region). Writes results.csv, results.json and results.svg.

options:
  --only A,B,...     only configurations whose name contains one of these substrings
  --shape B,SQ,H,SK  a custom configuration (batch, s_q, heads, KV length), repeatable;
                     replaces the default list
  --quick            fewer iterations (30) and, without --only/--shape, only
                     b16-sq1-h16-sk4k, b16-sq1-h16-sk64k and imbalanced-sq1-h16
  --iters N          timed iterations per configuration (default 100; 30 with --quick)
  --dtype D          bf16 (default, to keep the run short), f16 or both
  --layout L         auto (default: the plan's choice), kv (ETAP, KV rows on M), heads (the
                     wide heads-on-M kernel) or both (every configuration twice)
  --pages P,Q,...    cache page sizes (rows; 16, 32, 64 or 128): every configuration runs once
                     per size, named with -p<size> unless 64 (default 64)
  --kv F,G,...       cache formats: 16 (the dtype's, default), fp8-656 (FlashMLA's FP8 with
                     scale), fp8-tensor (per-tensor e4m3): every configuration once per format;
                     FP8 runs serving mode, KV on M up to 32 columns (CTAs of 16 or 32
                     columns), heads on M past that (the wide FP8 kernel, 64 columns a CTA);
                     --layout kv runs column groups of 32 there, --layout heads the wide
                     FP8 kernel at every count
  --packed           every configuration also in the packed query layout (q_offsets, each
                     request at s_q tokens), named with -packed: the layout's cost
  --layers N         layers of the serving-mode CUDA graph, each with its own cache
                     (default 61; 0 skips serving mode)
  --shared-cache     serving mode with one cache for every layer (a diagnostic of what
                     distinct caches cost; engines have one per layer)
  --out DIR          where the results go (default target/bench)
  --list             print the configuration names and exit
  -h, --help         this text

exit status: 0 all checks passed, 1 a check failed or an error, 2 no CUDA device.
";

#[derive(Clone, Debug, PartialEq)]
pub struct Options {
    pub only: Vec<String>,
    pub shapes: Vec<(usize, usize, usize, usize)>,
    /// Cache page sizes; every configuration runs once per size.
    pub pages: Vec<usize>,
    /// Every configuration also in the packed query layout.
    pub packed: bool,
    /// Cache formats; every configuration runs once per format.
    pub kv: Vec<etap::KvFormat>,
    pub quick: bool,
    pub iters: usize,
    pub warmup: usize,
    pub dtypes: Vec<Dtype>,
    /// Layouts to run; `None` = the plan's own choice.
    pub layouts: Vec<Option<Layout>>,
    pub out: PathBuf,
    /// Layers of the serving-mode graph (0: no serving-mode timing).
    pub layers: usize,
    /// Serving mode with one cache read by every layer (a diagnostic; not how engines run).
    pub shared_cache: bool,
    pub list: bool,
    pub help: bool,
}

pub const DEFAULT_ITERS: usize = 100;
pub const QUICK_ITERS: usize = 30;
pub const WARMUP: usize = 10;
/// Layers of the serving-mode graph: DeepSeek-V3's 61.
pub const DEFAULT_LAYERS: usize = 61;

fn parse_usize(opt: &str, s: &str) -> Result<usize, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("{opt}: `{s}` is not a non-negative integer"))
}

/// Parse the arguments (without the program name).
pub fn parse(args: &[String]) -> Result<Options, String> {
    let mut o = Options {
        only: vec![],
        shapes: vec![],
        pages: vec![etap::DEFAULT_PAGE_SIZE],
        packed: false,
        kv: vec![etap::KvFormat::Elem16],
        quick: false,
        iters: 0,
        warmup: WARMUP,
        dtypes: vec![Dtype::Bf16],
        layouts: vec![None],
        out: PathBuf::from("target/bench"),
        layers: DEFAULT_LAYERS,
        shared_cache: false,
        list: false,
        help: false,
    };
    let mut iters = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        let takes_value = matches!(
            name,
            "--only" | "--shape" | "--iters" | "--dtype" | "--layout" | "--out" | "--layers" | "--pages" | "--kv"
        );
        let value = if takes_value {
            match inline {
                Some(v) => v,
                None => it.next().ok_or_else(|| format!("{name} needs a value"))?.clone(),
            }
        } else {
            if inline.is_some() {
                return Err(format!("{name} takes no value"));
            }
            String::new()
        };
        match name {
            "--only" => o.only.extend(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from),
            ),
            "--shape" => {
                let f: Vec<&str> = value.split(',').collect();
                if f.len() != 4 {
                    return Err(format!("--shape: expected b,s_q,h,s_k, got `{value}`"));
                }
                let n: Vec<usize> = f.iter().map(|s| parse_usize("--shape", s)).collect::<Result<_, _>>()?;
                if n[0] == 0 {
                    return Err("--shape: the batch must be at least 1".into());
                }
                o.shapes.push((n[0], n[1], n[2], n[3]));
            }
            "--layers" => o.layers = parse_usize("--layers", &value)?,
            "--pages" => {
                o.pages = value
                    .split(',')
                    .map(|s| parse_usize("--pages", s))
                    .collect::<Result<_, _>>()?;
                if let Some(p) = o.pages.iter().find(|p| !etap_core::PAGE_SIZES.contains(p)) {
                    return Err(format!("--pages: {p} is not a page size etap takes (16, 32, 64, 128)"));
                }
            }
            "--iters" => {
                let n = parse_usize("--iters", &value)?;
                if n == 0 {
                    return Err("--iters must be at least 1".into());
                }
                iters = Some(n);
            }
            "--dtype" => {
                o.dtypes = match value.as_str() {
                    "bf16" => vec![Dtype::Bf16],
                    "f16" | "fp16" => vec![Dtype::F16],
                    "both" => vec![Dtype::Bf16, Dtype::F16],
                    _ => return Err(format!("--dtype: expected bf16, f16 or both, got `{value}`")),
                }
            }
            "--layout" => {
                o.layouts = match value.as_str() {
                    "auto" => vec![None],
                    "kv" => vec![Some(Layout::KvOnM)],
                    "heads" => vec![Some(Layout::HeadsOnM)],
                    "both" => vec![Some(Layout::KvOnM), Some(Layout::HeadsOnM)],
                    _ => return Err(format!("--layout: expected auto, kv, heads or both, got `{value}`")),
                }
            }
            "--out" => o.out = PathBuf::from(value),
            "--quick" => o.quick = true,
            "--shared-cache" => o.shared_cache = true,
            "--packed" => o.packed = true,
            "--kv" => {
                o.kv = value
                    .split(',')
                    .map(|f| match f.trim() {
                        "16" => Ok(etap::KvFormat::Elem16),
                        "fp8-656" => Ok(etap::KvFormat::Fp8Flashmla656),
                        "fp8-tensor" => Ok(etap::KvFormat::Fp8PerTensor),
                        other => Err(format!("--kv: expected 16, fp8-656 or fp8-tensor, got `{other}`")),
                    })
                    .collect::<Result<_, _>>()?;
            }
            "--list" => o.list = true,
            "-h" | "--help" => o.help = true,
            _ => return Err(format!("unknown argument `{arg}`")),
        }
    }
    o.iters = iters.unwrap_or(if o.quick { QUICK_ITERS } else { DEFAULT_ITERS });
    if o.quick {
        o.warmup = 5;
    }
    Ok(o)
}

impl Options {
    /// The configurations to run: the `--shape` ones if any, else the quick set (with
    /// `--quick` and no `--only`) or all of them; then filtered by `--only`.
    pub fn configs(&self) -> Vec<Config> {
        let base = if !self.shapes.is_empty() {
            self.shapes
                .iter()
                .map(|&(b, s_q, h, s_k)| Config::uniform(b, s_q, h, s_k))
                .collect()
        } else if self.quick && self.only.is_empty() {
            configs::quick()
        } else {
            configs::all()
        };
        let base: Vec<Config> = base
            .into_iter()
            .flat_map(|c| self.pages.iter().map(move |&p| c.clone().with_page_size(p)))
            .flat_map(|c| {
                let packed = self.packed.then(|| c.clone().packed());
                std::iter::once(c).chain(packed)
            })
            .flat_map(|c| self.kv.iter().map(move |&f| c.clone().with_kv(f)))
            .collect();
        configs::filter(base, &self.only)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Options, String> {
        parse(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn defaults() {
        let o = p(&[]).unwrap();
        assert_eq!(o.iters, 100);
        assert_eq!(o.warmup, 10);
        assert_eq!(o.dtypes, vec![Dtype::Bf16]);
        assert_eq!(o.out, PathBuf::from("target/bench"));
        assert_eq!(o.configs().len(), configs::all().len());
    }

    #[test]
    fn quick_only_shape_dtype() {
        let o = p(&["--quick"]).unwrap();
        assert_eq!(o.iters, QUICK_ITERS);
        let names: Vec<String> = o.configs().into_iter().map(|c| c.name).collect();
        assert_eq!(names, ["b16-sq1-h16-sk4k", "b16-sq1-h16-sk64k", "imbalanced-sq1-h16"]);
        // --only selects from the full list, even with --quick.
        let o = p(&["--quick", "--only", "h128,varlen", "--iters=7"]).unwrap();
        assert_eq!(o.iters, 7);
        let names: Vec<String> = o.configs().into_iter().map(|c| c.name).collect();
        assert_eq!(
            names,
            [
                "b16-sq1-h128-sk64k",
                "b64-sq1-h128-sk4k",
                "b16-sq1-h128-sk16k",
                "b32-sq1-h16-varlen8k"
            ]
        );
        let o = p(&[
            "--shape",
            "2,1,16,1000",
            "--shape=1,4,128,65536",
            "--dtype",
            "both",
            "--out",
            "/tmp/x",
        ])
        .unwrap();
        assert_eq!(o.shapes, vec![(2, 1, 16, 1000), (1, 4, 128, 65536)]);
        assert_eq!(o.dtypes, vec![Dtype::Bf16, Dtype::F16]);
        assert_eq!(o.out, PathBuf::from("/tmp/x"));
        let c = o.configs();
        assert_eq!(c[0].name, "b2-sq1-h16-sk1000");
        assert_eq!(c[0].seqlens, vec![1000, 1000]);
        assert_eq!(p(&["--dtype=f16"]).unwrap().dtypes, vec![Dtype::F16]);
        let o = p(&["--shape", "16,1,16,1024", "--pages", "16,64,128"]).unwrap();
        let names: Vec<String> = o.configs().into_iter().map(|c| c.name).collect();
        assert_eq!(
            names,
            ["b16-sq1-h16-sk1k-p16", "b16-sq1-h16-sk1k", "b16-sq1-h16-sk1k-p128"]
        );
        let o = p(&["--shape", "16,2,16,1024", "--packed"]).unwrap();
        let names: Vec<String> = o.configs().into_iter().map(|c| c.name).collect();
        assert_eq!(names, ["b16-sq2-h16-sk1k", "b16-sq2-h16-sk1k-packed"]);
    }

    #[test]
    fn errors() {
        assert!(p(&["--iters"]).is_err());
        assert!(p(&["--iters", "0"]).is_err());
        assert!(p(&["--iters", "x"]).is_err());
        assert!(p(&["--shape", "1,2,3"]).is_err());
        assert!(p(&["--shape", "0,1,16,10"]).is_err());
        assert!(p(&["--dtype", "fp8"]).is_err());
        assert!(p(&["--pages", "8"]).is_err());
        assert!(p(&["--pages", "16,x"]).is_err());
        assert!(p(&["--bogus"]).is_err());
        assert!(p(&["--quick=1"]).is_err());
        assert!(p(&["-h"]).unwrap().help);
    }
}

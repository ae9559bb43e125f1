//! # etap: ETAP MLA decode for NVIDIA Hopper, in Rust
//!
//! Multi-head latent attention decode (DeepSeek-V3/R1) with the Efficient Transpose Attention
//! Pipeline: KV rows on the wgmma M dimension, (token, head) pairs on N, so 16 heads waste
//! nothing. Kernels are Rust compiled to PTX (embedded at build time, see [`PTX`]).
//!
//! The API is FlashMLA's two calls: [`Decoder::plan`] splits the KV of every request over the
//! SMs (on the GPU, from the device seqlens), then [`Decoder::decode`] runs the split-KV kernel,
//! which also merges each request's splits. [`reference::mla_decode`] is the CPU reference with the same
//! semantics, public so deployments can validate themselves.
//!
//! # Example
//!
//! Two requests of one query token and 16 heads over a paged bf16 cache (pages of 64 rows), one
//! plan for the step, a decode call per layer, each request checked against the reference:
//!
//! ```no_run
//! use cust::memory::{CopyDestination, DeviceBuffer};
//! use cust::stream::{Stream, StreamFlags};
//! use etap::{check, reference, Bf16, DecodeShape, Decoder, Dtype, Element};
//!
//! # fn main() -> etap::Result<()> {
//! let dec = Decoder::new()?; // device 0: an error unless it is a Hopper GPU
//! let stream = Stream::new(StreamFlags::NON_BLOCKING, None)?;
//! // (batch, s_q, h_q, num_pages, max_pages): 8 pages in the cache, at most 4 a request.
//! let shape = DecodeShape::new(2, 1, 16, 8, 4);
//! let (q_len, kv_len) = (shape.q_len(), shape.cache_len());
//! let q: Vec<Bf16> = (0..q_len).map(|i| Bf16::from_f32((i % 13) as f32 / 13.0 - 0.5)).collect();
//! let kv: Vec<Bf16> = (0..kv_len).map(|i| Bf16::from_f32((i % 7) as f32 / 7.0 - 0.5)).collect();
//! let block_table: Vec<i32> = vec![3, 0, 5, 1, /* request 1: */ 7, 2, 6, 4];
//! let seqlens: Vec<i32> = vec![200, 64];
//!
//! let (q_d, kv_d) = (DeviceBuffer::from_slice(&q)?, DeviceBuffer::from_slice(&kv)?);
//! let bt_d = DeviceBuffer::from_slice(&block_table)?;
//! let sl_d = DeviceBuffer::from_slice(&seqlens)?;
//! let mut out = DeviceBuffer::from_slice(&vec![Bf16::nan(); shape.out_len()])?;
//! let mut lse = DeviceBuffer::from_slice(&vec![f32::NAN; shape.lse_len()])?;
//!
//! dec.check_tables(&shape, &bt_d, &sl_d)?; // optional: reads the tables back (a sync)
//! let plan = dec.plan(&shape, &sl_d, &stream)?; // once a step, on the GPU, no sync
//! for _layer in 0..3 {
//!     // Each layer its own q and cache in a model; None: the softmax scale 1/sqrt(576).
//!     dec.decode_into(&plan, &q_d, &kv_d, &bt_d, &sl_d, None, &mut out, &mut lse, &stream)?;
//! }
//! stream.synchronize()?;
//!
//! let mut got = vec![Bf16::default(); shape.out_len()];
//! let mut got_lse = vec![0f32; shape.lse_len()];
//! out.copy_to(&mut got[..])?;
//! lse.copy_to(&mut got_lse[..])?;
//! let got: Vec<f32> = got.iter().map(|x| x.to_f32()).collect();
//! let scale = reference::default_softmax_scale();
//! let refs: Vec<(Vec<f32>, Vec<f32>)> = (0..shape.batch)
//!     .map(|r| reference::mla_decode_request(&shape, &q, &kv, &block_table, &seqlens, scale, r))
//!     .collect::<etap::Result<_>>()?;
//! let refs: Vec<(usize, &[f32], &[f32])> =
//!     refs.iter().enumerate().map(|(r, (o, l))| (r, &o[..], &l[..])).collect();
//! let outcome = check::compare(Dtype::Bf16, 1, 16, &seqlens, &got, &got_lse, &refs);
//! assert!(outcome.passes(), "{:?}", outcome.failure());
//! # Ok(())
//! # }
//! ```
//!
//! A new step re-plans into the same plan ([`Decoder::replan`]: no allocation, capturable in
//! a CUDA graph with the decode calls, [`driver::Graph`]); FP8 caches ([`KvFormat`],
//! [`Decoder::decode_fp8_into`]) and the packed query layout ([`Decoder::decode_packed_into`])
//! follow the same two calls. docs/design.md §8 has the whole API.
pub mod check;
pub mod decoder;
pub mod driver;
pub mod dtype;
pub mod error;
pub mod fp8;
pub mod gpu;
pub mod interop;
pub mod metrics;
pub mod plan;
pub mod reference;
pub mod shape;
pub mod tma;
pub mod validate;

pub use decoder::Decoder;
pub use dtype::{Bf16, Dtype, Element, F16};
pub use error::{EtapError, Result};
pub use plan::{Layout, Plan, RawBuffers};
pub use shape::{DecodeShape, KvFormat, DEFAULT_PAGE_SIZE};

/// The kernels' PTX for sm_90a, built from `kernels/` by `build.rs`.
pub const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/etap_kernels.ptx"));

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

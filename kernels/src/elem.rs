//! The 16-bit element types of the decode kernels, as types (FlashMLA keeps one
//! `Traits<InputT>` per element type): every kernel and tile operation is generic over them, so
//! a new cache type is a new implementation, not a new flag threaded through every file.
//!
//! Two types can differ: the tensor cores' operands (the staged K/V tiles, Q as the consumers
//! read it, P) and the caller's q and output in global memory. The 16-bit caches' kernels have
//! them equal; the FP8 caches' kernels compute in f16 under bf16 or fp16 q and output, since e4m3
//! goes to f16 in one conversion (`cvt.rn.f16x2.e4m3x2`, exact) where bf16 takes an f32 round
//! trip.

/// An element type of the decode kernels' 16-bit operands.
pub trait Elem {
    /// The tensor cores' operands are IEEE half precision (`true`) or bfloat16: which wgmma
    /// and which conversion P takes.
    const F16: bool;
    /// q and the output, in global memory, are IEEE half precision (`true`) or bfloat16. When
    /// it differs from [`Elem::F16`] the consumers convert each request's Q tile in shared
    /// memory before their first product.
    const IO_F16: bool = Self::F16;
    /// The cache's values are its stored ones times `DecodeParams::kv_scale` (the per-tensor
    /// FP8 cache): the consumers fold the scale into the scores' scale and the output's
    /// normalizer instead of multiplying every element.
    const FOLD_KV_SCALE: bool = false;
}

/// bfloat16 (DeepSeek's KV cache).
pub struct Bf16;
/// IEEE half precision.
pub struct F16;
/// FlashMLA's 656-byte FP8 cache: f16 operands (each 128-value block times its power-of-two
/// scale in f16, the RoPE part converted from bf16), under fp16 q and output when `IO_F16`,
/// else bf16.
pub struct Fp8Blocks<const IO_F16: bool>;
/// The per-tensor e4m3 cache: f16 operands holding the stored e4m3 values, the scale folded,
/// under fp16 q and output when `IO_F16`, else bf16.
pub struct Fp8Tensor<const IO_F16: bool>;

impl Elem for Bf16 {
    const F16: bool = false;
}

impl Elem for F16 {
    const F16: bool = true;
}

impl<const IO: bool> Elem for Fp8Blocks<IO> {
    const F16: bool = true;
    const IO_F16: bool = IO;
}

impl<const IO: bool> Elem for Fp8Tensor<IO> {
    const F16: bool = true;
    const IO_F16: bool = IO;
    const FOLD_KV_SCALE: bool = true;
}

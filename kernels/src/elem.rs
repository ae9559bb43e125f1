//! The 16-bit element type of q, the cache and the output, as a type (FlashMLA keeps one
//! `Traits<InputT>` per element type): every kernel and tile operation is generic over it, so a
//! new cache type (an 8-bit one dequantized on load, say) is a new implementation, not a new
//! flag threaded through every file.

/// An element type of the decode kernels' 16-bit operands.
pub trait Elem {
    /// IEEE half precision (`true`) or bfloat16: which wgmma and which conversions to use.
    const F16: bool;
}

/// bfloat16 (DeepSeek's KV cache).
pub struct Bf16;
/// IEEE half precision.
pub struct F16;

impl Elem for Bf16 {
    const F16: bool = false;
}

impl Elem for F16 {
    const F16: bool = true;
}

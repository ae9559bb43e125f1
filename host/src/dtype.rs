//! Element types of q, the cache and out: bf16 and fp16, as `#[repr(transparent)]` newtypes of
//! `half`'s types so that cust can move them (cust 0.3.2's own half support is for half 1.x).
use bytemuck::{Pod, Zeroable};
use cust::memory::DeviceCopy;

/// Which 16-bit float a buffer holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    Bf16,
    F16,
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
        })
    }
}

/// bfloat16 element.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, PartialOrd, Pod, Zeroable)]
pub struct Bf16(pub half::bf16);

/// IEEE half-precision element.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, PartialOrd, Pod, Zeroable)]
pub struct F16(pub half::f16);

// SAFETY: both are plain 16-bit values with no pointers or invariants; any bit pattern is valid.
unsafe impl DeviceCopy for Bf16 {}
// SAFETY: as for Bf16.
unsafe impl DeviceCopy for F16 {}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::Bf16 {}
    impl Sealed for super::F16 {}
}

/// A 16-bit float the kernels take (sealed: bf16 and fp16 only).
pub trait Element: sealed::Sealed + DeviceCopy + Pod + Default + Send + Sync + 'static {
    const DTYPE: Dtype;
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
    /// A quiet NaN, for poisoning.
    fn nan() -> Self {
        Self::from_f32(f32::NAN)
    }
}

impl Element for Bf16 {
    const DTYPE: Dtype = Dtype::Bf16;
    fn from_f32(v: f32) -> Self {
        Bf16(half::bf16::from_f32(v))
    }
    fn to_f32(self) -> f32 {
        self.0.to_f32()
    }
}

impl Element for F16 {
    const DTYPE: Dtype = Dtype::F16;
    fn from_f32(v: f32) -> Self {
        F16(half::f16::from_f32(v))
    }
    fn to_f32(self) -> f32 {
        self.0.to_f32()
    }
}

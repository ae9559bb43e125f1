//! Fast math and conversions.
use crate::elem::Elem;
use core::arch::asm;

/// What an online softmax subtracts for a running maximum `m`: `m`, or 0 while `m` is -inf
/// (nothing seen yet), so that `exp2(-inf - base)` is 0, not NaN. The ETAP and the heads-on-M
/// softmax and the split merge all use it.
#[inline(always)]
pub fn max_base(m: f32) -> f32 {
    if m == f32::NEG_INFINITY {
        0.0
    } else {
        m
    }
}

/// 2^x, the SFU's approximation (max relative error 2^-22), as the softmax uses it.
#[inline(always)]
pub fn exp2(x: f32) -> f32 {
    let r: f32;
    // SAFETY: pure arithmetic.
    unsafe { asm!("ex2.approx.ftz.f32 {0}, {1};", out(reg32) r, in(reg32) x, options(pure, nomem, nostack)) };
    r
}

/// a * b + c, rounded once (`fma.rn.f32`).
#[inline(always)]
pub fn fma(a: f32, b: f32, c: f32) -> f32 {
    let r: f32;
    // SAFETY: pure arithmetic.
    unsafe {
        asm!("fma.rn.f32 {0}, {1}, {2}, {3};", out(reg32) r, in(reg32) a, in(reg32) b, in(reg32) c, options(pure, nomem, nostack))
    };
    r
}

/// Natural logarithm through `lg2.approx` (the lse output).
#[inline(always)]
pub fn ln(x: f32) -> f32 {
    let r: f32;
    // SAFETY: pure arithmetic.
    unsafe { asm!("lg2.approx.ftz.f32 {0}, {1};", out(reg32) r, in(reg32) x, options(pure, nomem, nostack)) };
    r * core::f32::consts::LN_2
}

/// Round `lo`, `hi` to bf16 (nearest even) and pack them, `lo` in the low half.
#[inline(always)]
pub fn pack_bf16x2(lo: f32, hi: f32) -> u32 {
    let r: u32;
    // SAFETY: pure arithmetic.
    unsafe {
        asm!("cvt.rn.bf16x2.f32 {0}, {1}, {2};", out(reg32) r, in(reg32) hi, in(reg32) lo, options(pure, nomem, nostack))
    };
    r
}

/// Round `lo`, `hi` to fp16 (nearest even) and pack them, `lo` in the low half.
#[inline(always)]
pub fn pack_f16x2(lo: f32, hi: f32) -> u32 {
    let r: u32;
    // SAFETY: pure arithmetic.
    unsafe {
        asm!("cvt.rn.f16x2.f32 {0}, {1}, {2};", out(reg32) r, in(reg32) hi, in(reg32) lo, options(pure, nomem, nostack))
    };
    r
}

/// Pack a pair in the operand type of `E` (fp16 or bf16): P for the tensor cores.
#[inline(always)]
pub fn pack2<E: Elem>(lo: f32, hi: f32) -> u32 {
    if E::F16 {
        pack_f16x2(lo, hi)
    } else {
        pack_bf16x2(lo, hi)
    }
}

/// Pack a pair in the output type of `E` (fp16 or bf16): what the kernels store in `out`.
#[inline(always)]
pub fn pack2_out<E: Elem>(lo: f32, hi: f32) -> u32 {
    if E::IO_F16 {
        pack_f16x2(lo, hi)
    } else {
        pack_bf16x2(lo, hi)
    }
}

/// The two `float8_e4m3fn` values in `x` (its low byte first) as an f16 pair (the first in the
/// low half), exactly: every e4m3 value is an f16.
#[inline(always)]
pub fn e4m3x2_to_f16x2(x: u16) -> u32 {
    let r: u32;
    // SAFETY: a register conversion only.
    unsafe { asm!("cvt.rn.f16x2.e4m3x2 {0}, {1};", out(reg32) r, in(reg16) x, options(pure, nomem, nostack)) };
    r
}

/// A bf16 pair (the first in the low half) as an f16 pair, each rounded to nearest even:
/// exact for values in f16's normal range, infinite beyond 65504.
#[inline(always)]
pub fn bf16x2_to_f16x2(x: u32) -> u32 {
    // A bf16 is the high half of the f32 of the same value.
    pack_f16x2(f32::from_bits(x << 16), f32::from_bits(x & 0xFFFF_0000))
}

/// The f16 pair product `a * b`, each half rounded to nearest even.
#[inline(always)]
pub fn mul_f16x2(a: u32, b: u32) -> u32 {
    let r: u32;
    // SAFETY: pure arithmetic.
    unsafe {
        asm!("mul.rn.f16x2 {0}, {1}, {2};", out(reg32) r, in(reg32) a, in(reg32) b, options(pure, nomem, nostack))
    };
    r
}

/// Larger of two floats (`max.f32`; NaN-aware like `fmaxf`).
#[inline(always)]
pub fn fmax(a: f32, b: f32) -> f32 {
    let r: f32;
    // SAFETY: pure arithmetic.
    unsafe { asm!("max.f32 {0}, {1}, {2};", out(reg32) r, in(reg32) a, in(reg32) b, options(pure, nomem, nostack)) };
    r
}

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

/// The two `float8_e4m3fn` values in `x` (its low byte first) as f32, exactly (through the
/// f16 pair that `cvt.rn.f16x2.e4m3x2` makes: every e4m3 value is an f16).
#[inline(always)]
pub fn e4m3x2_to_f32(x: u16) -> (f32, f32) {
    let (lo, hi): (f32, f32);
    // SAFETY: register conversions only.
    unsafe {
        asm!(
            "{{ .reg .b32 h2; .reg .b16 l16, h16;",
            "cvt.rn.f16x2.e4m3x2 h2, {x};",
            "mov.b32 {{l16, h16}}, h2;",
            "cvt.f32.f16 {lo}, l16;",
            "cvt.f32.f16 {hi}, h16; }}",
            x = in(reg16) x,
            lo = out(reg32) lo,
            hi = out(reg32) hi,
            options(pure, nomem, nostack)
        )
    };
    (lo, hi)
}

/// Pack a pair in the element type `E`: fp16 or bf16.
#[inline(always)]
pub fn pack2<E: Elem>(lo: f32, hi: f32) -> u32 {
    if E::F16 {
        pack_f16x2(lo, hi)
    } else {
        pack_bf16x2(lo, hi)
    }
}

/// Larger of two floats (`max.f32`; NaN-aware like `fmaxf`).
#[inline(always)]
pub fn fmax(a: f32, b: f32) -> f32 {
    let r: f32;
    // SAFETY: pure arithmetic.
    unsafe { asm!("max.f32 {0}, {1}, {2};", out(reg32) r, in(reg32) a, in(reg32) b, options(pure, nomem, nostack)) };
    r
}

//! Philox words to normals (Box-Muller), written once over `Lanes`: the scalar reference is
//! these functions at `f32`, and the vector generators (`x86.rs`) are the same functions at
//! 8 or 16 lanes, so every width computes the same operations in the same order and gives the
//! same bits. `csrc/philox.cuh` mirrors them operation for operation.
//!
//! Every float operation is a correctly rounded IEEE operation or a fused multiply-add, and
//! the transcendental functions are our own polynomials (libm's and CUDA's `logf`/`sincosf`
//! differ in the last place). The polynomials are least-maximum-error fits on their reduced
//! ranges (`tools/fixtures/fit_normal_polys.py`), at the lowest degree whose error stays below
//! f32 rounding: ln to 1e-9 relative, sin to 4e-9 relative and cos to 1e-10 absolute.

use std::ops::{Add, BitAnd, BitOr, Div, Mul, Neg, Shr, Sub};

/// f32 arithmetic on one value or on a vector of them, with the u32 lanes (`Bits`) and the
/// lane masks (`Mask`) of the same width.
pub(crate) trait Lanes:
    Copy
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
{
    type Bits: Copy
        + BitAnd<Output = Self::Bits>
        + BitOr<Output = Self::Bits>
        + Add<Output = Self::Bits>
        + Shr<u32, Output = Self::Bits>;
    type Mask: Copy;

    fn splat(x: f32) -> Self;
    fn splat_bits(x: u32) -> Self::Bits;
    /// self * a + b, rounded once.
    fn mul_add(self, a: Self, b: Self) -> Self;
    fn sqrt(self) -> Self;
    fn round_ties_even(self) -> Self;
    fn to_bits(self) -> Self::Bits;
    fn from_bits(b: Self::Bits) -> Self;
    /// The lanes as i32 (all below 2^24 in magnitude here), converted exactly.
    fn from_i32_bits(b: Self::Bits) -> Self;
    fn gt(self, b: Self) -> Self::Mask;
    /// Lanes whose bits share a set bit with `bit`.
    fn any_bit(b: Self::Bits, bit: u32) -> Self::Mask;
    /// `if_true` where the mask is set, `if_false` elsewhere.
    fn select(m: Self::Mask, if_true: Self, if_false: Self) -> Self;
}

impl Lanes for f32 {
    type Bits = u32;
    type Mask = bool;

    #[inline(always)]
    fn splat(x: f32) -> f32 {
        x
    }
    #[inline(always)]
    fn splat_bits(x: u32) -> u32 {
        x
    }
    #[inline(always)]
    fn mul_add(self, a: f32, b: f32) -> f32 {
        f32::mul_add(self, a, b)
    }
    #[inline(always)]
    fn sqrt(self) -> f32 {
        f32::sqrt(self)
    }
    #[inline(always)]
    fn round_ties_even(self) -> f32 {
        f32::round_ties_even(self)
    }
    #[inline(always)]
    fn to_bits(self) -> u32 {
        f32::to_bits(self)
    }
    #[inline(always)]
    fn from_bits(b: u32) -> f32 {
        f32::from_bits(b)
    }
    #[inline(always)]
    fn from_i32_bits(b: u32) -> f32 {
        b as i32 as f32
    }
    #[inline(always)]
    fn gt(self, b: f32) -> bool {
        self > b
    }
    #[inline(always)]
    fn any_bit(b: u32, bit: u32) -> bool {
        b & bit != 0
    }
    #[inline(always)]
    fn select(m: bool, if_true: f32, if_false: f32) -> f32 {
        if m {
            if_true
        } else {
            if_false
        }
    }
}

const U24: f32 = 1.0 / 16_777_216.0;

/// Uniform in [0, 1), an exact multiple of 2^-24 (the shifted word is below 2^24, so its i32
/// conversion is exact).
#[inline(always)]
pub(crate) fn u01_half_open<V: Lanes>(w: V::Bits) -> V {
    V::from_i32_bits(w >> 8) * V::splat(U24)
}

/// Bits of a normal pair's word that set its radius (the high ones) and its angle (the rest).
/// One word per pair, not two: Philox, half the cost of a normal at two words a pair, is
/// spread over twice the normals. Each uniform is the midpoint of one of 2^bits equal cells, so
/// neither is ever 0 or 1: the radius never vanishes and no angle lies on an axis, so no normal
/// is exactly zero (a zero z marks an element outside Sparse-MeZO's mask). 20 bits put the
/// largest radius at sqrt(2 ln 2^21) = 5.40 (a standard normal passes it with probability
/// 7e-8), and 4096 angles, 0.09 degrees apart, leave each normal's distribution smooth.
pub(crate) const RADIUS_BITS: u32 = 20;
pub(crate) const ANGLE_BITS: u32 = 32 - RADIUS_BITS;

/// (k + 1/2) / 2^bits for k below 2^bits, bits at most 23: exact, as k converts exactly and
/// the result, (2k + 1) / 2^(bits + 1), fits f32's 24-bit significand, so the fused
/// multiply-add's one rounding has nothing to round.
#[inline(always)]
fn cell_midpoint<V: Lanes>(k: V::Bits, bits: u32) -> V {
    let cell = 1.0 / (1u32 << bits) as f32;
    V::from_i32_bits(k).mul_add(V::splat(cell), V::splat(0.5 * cell))
}

/// The radius's uniform, in (0, 1): from the word's high RADIUS_BITS bits.
#[inline(always)]
pub(crate) fn radius_u01<V: Lanes>(w: V::Bits) -> V {
    cell_midpoint::<V>(w >> ANGLE_BITS, RADIUS_BITS)
}

/// The angle's uniform, in (0, 1): from the word's low ANGLE_BITS bits.
#[inline(always)]
pub(crate) fn angle_u01<V: Lanes>(w: V::Bits) -> V {
    cell_midpoint::<V>(w & V::splat_bits((1 << ANGLE_BITS) - 1), ANGLE_BITS)
}

/// ln(m) = 2 atanh(s) = 2 s (1 + s^2 P(s^2)) with s = (m - 1) / (m + 1), |s| <= 0.1716.
const LN_P: [f32; 3] = [0.149_354_7, 0.199_887_87, 0.333_333_88];
/// sin x = x + x^3 S(x^2) on [-pi/4, pi/4].
const SIN_S: [f32; 3] = [-1.951_528_2e-4, 8.332_16e-3, -0.166_666_55];
/// cos x = 1 - x^2 / 2 + x^4 C(x^2) on [-pi/4, pi/4].
const COS_C: [f32; 3] = [2.443_845_2e-5, -1.388_736_8e-3, 4.166_664_6e-2];

/// Horner's rule over `c`, highest coefficient first, one fused multiply-add a step.
#[inline(always)]
fn horner<V: Lanes>(x: V, c: &[f32]) -> V {
    let mut p = V::splat(c[0]);
    for &k in &c[1..] {
        p = p.mul_add(x, V::splat(k));
    }
    p
}

/// Natural log for x in (0, 1], to ~1 ulp.
#[inline(always)]
pub(crate) fn ln<V: Lanes>(x: V) -> V {
    let bits = x.to_bits();
    let e = V::from_i32_bits((bits >> 23) & V::splat_bits(0xff)) - V::splat(127.0);
    // m in [1, 2), then halved above sqrt(2) (e + 1 is exact: e is a small integer).
    let m = V::from_bits((bits & V::splat_bits(0x007f_ffff)) | V::splat_bits(0x3f80_0000));
    let big = m.gt(V::splat(std::f32::consts::SQRT_2));
    let m = V::select(big, m * V::splat(0.5), m);
    let e = V::select(big, e + V::splat(1.0), e);
    let one = V::splat(1.0);
    let s = (m - one) / (m + one);
    let s2 = s * s;
    let p = horner(s2, &LN_P).mul_add(s2, one);
    let ln_m = V::splat(2.0) * s * p;
    e.mul_add(V::splat(std::f32::consts::LN_2), ln_m)
}

/// (sin, cos) of 2 pi u for u in [0, 1).
#[inline(always)]
pub(crate) fn sincos_2pi<V: Lanes>(u: V) -> (V, V) {
    // u * 4 is exact; the quadrant q and remainder r in [-1/8, 1/8] are exact too.
    let q = (u * V::splat(4.0)).round_ties_even();
    let r = u - q * V::splat(0.25);
    let x = r * V::splat(std::f32::consts::TAU);
    let x2 = x * x;
    let sin_r = (x * x2).mul_add(horner(x2, &SIN_S), x);
    let cos_r = x2.mul_add(
        horner(x2, &COS_C).mul_add(x2, V::splat(-0.5)),
        V::splat(1.0),
    );
    // Quadrant k: (sin, cos) of x + k pi/2 = (s, c), (c, -s), (-s, -c), (-c, s). q is an
    // integer in [0, 4], so q + 2^23 is exact and its low mantissa bits are q's (a float to
    // int conversion would saturate, which compiles to scalar code per lane).
    let k = (q + V::splat(8_388_608.0)).to_bits();
    let odd = V::any_bit(k, 1);
    let a = V::select(odd, cos_r, sin_r);
    let b = V::select(odd, sin_r, cos_r);
    let neg_sin = V::any_bit(k, 2);
    let neg_cos = V::any_bit(k + V::splat_bits(1), 2);
    (V::select(neg_sin, -a, a), V::select(neg_cos, -b, b))
}

/// Box-Muller on one word: the normals r cos(2 pi u2) and r sin(2 pi u2), with
/// r = sqrt(-2 ln u1), u1 from the word's high bits and u2 from its low ones.
#[inline(always)]
pub(crate) fn box_muller<V: Lanes>(w: V::Bits) -> (V, V) {
    let r = (V::splat(-2.0) * ln(radius_u01::<V>(w))).sqrt();
    let (s, c) = sincos_2pi(angle_u01::<V>(w));
    (r * c, r * s)
}

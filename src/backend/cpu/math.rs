//! Elementwise math written so loops over it vectorize: libm's `expf` is a call per element,
//! which kept SwiGLU and the softmax scalar.

/// e^x for f32, within 2 ulp of the correctly rounded value over the range where e^x is a
/// normal f32 (x in [-87.3, 88.7]); 0 below it, +inf above it, NaN for NaN. Branch-free.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n * LN2_HI is exact for |n| < 2^9.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding 1.5 * 2^23 rounds to the nearest integer (ties to even) and leaves that integer
    // in the low mantissa bits. Plain adds and multiplies only: the crate is built for
    // baseline x86-64, where `mul_add` and `round_ties_even` are library calls.
    const SHIFTER: f32 = 12_582_912.0;
    let xc = x.clamp(-87.3, 88.7);
    let shifted = xc * LOG2E + SHIFTER;
    let n = shifted - SHIFTER;
    let ni = shifted.to_bits() as i32 - 0x4b40_0000;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    // e^r on |r| <= ln2 / 2: Taylor to degree 7 by Horner.
    let mut p = 1.0f32 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    // 2^n as 2^a * 2^b with a, b within [-64, 64], so both are normal f32 for every n the
    // clamp allows (-126..=128).
    let a = ni >> 1;
    let pow2 = |e: i32| f32::from_bits(((e + 127) as u32) << 23);
    let y = p * pow2(a) * pow2(ni - a);
    let y = if x > 88.7 { f32::INFINITY } else { y };
    let y = if x < -87.3 { 0.0 } else { y };
    if x.is_nan() {
        x
    } else {
        y
    }
}

/// SiLU(x) = x / (1 + e^-x).
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f32) -> i64 {
        (a.to_bits() as i64 - b.to_bits() as i64).abs()
    }

    #[test]
    fn exp_is_within_two_ulp_of_f64_exp() {
        let mut worst = 0;
        let mut x = -87.3f32;
        while x < 88.7 {
            let want = (x as f64).exp() as f32;
            let got = exp(x);
            worst = worst.max(ulps(got, want));
            x += 0.000_731;
        }
        eprintln!("exp: worst error {worst} ulp");
        assert!(worst <= 2, "worst error {worst} ulp");
    }

    #[test]
    fn exp_edges() {
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        assert!((silu(2.0) - 2.0 / (1.0 + (-2.0f32).exp())).abs() < 1e-6);
        assert_eq!(silu(-200.0), -0.0);
    }
}

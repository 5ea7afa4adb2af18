//! Philox-4x32-10, the one random generator of zoft, and the transforms from its words to
//! uniform, normal and Rademacher values.
//!
//! Keyed by (run seed, step, tensor id) with the element index as counter, so any element's
//! value can be regenerated anywhere, in any order. `csrc/philox.cuh` is the bit-for-bit CUDA
//! mirror: every float operation below is a correctly rounded IEEE op or an explicit fused
//! multiply-add, and the transcendental functions are our own polynomials, so CPU and GPU give
//! identical bits (libm and CUDA's `logf`/`sincosf` differ in the last place).

#[cfg(target_arch = "x86_64")]
mod avx512;

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

#[inline(always)]
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = a as u64 * b as u64;
    ((p >> 32) as u32, p as u32)
}

/// The raw Philox-4x32 block function with 10 rounds.
#[inline]
pub fn philox4x32_10(mut ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let (mut k0, mut k1) = (key[0], key[1]);
    for round in 0..10 {
        if round > 0 {
            k0 = k0.wrapping_add(W0);
            k1 = k1.wrapping_add(W1);
        }
        let (hi0, lo0) = mulhilo(M0, ctr[0]);
        let (hi1, lo1) = mulhilo(M1, ctr[2]);
        ctr = [hi1 ^ ctr[1] ^ k0, lo1, hi0 ^ ctr[3] ^ k1, lo0];
    }
    ctr
}

/// A stream of values addressed by element index, for one (seed, step, tensor) key.
#[derive(Clone, Copy, Debug)]
pub struct Philox {
    key: [u32; 2],
    step: u32,
    tensor: u32,
}

impl Philox {
    pub fn new(seed: u64, step: u32, tensor: u32) -> Self {
        Philox {
            key: [seed as u32, (seed >> 32) as u32],
            step,
            tensor,
        }
    }

    /// The four words of block `block` (elements 4*block .. 4*block+3).
    #[inline]
    pub fn block(&self, block: u64) -> [u32; 4] {
        philox4x32_10(
            [block as u32, (block >> 32) as u32, self.step, self.tensor],
            self.key,
        )
    }

    /// Standard normal value of element `i`.
    #[inline]
    pub fn normal(&self, i: u64) -> f32 {
        let w = self.block(i / 4);
        let lane = (i % 4) as usize;
        let pair = lane & !1;
        let (r, s, c) = box_muller_parts(w[pair], w[pair + 1]);
        if lane & 1 == 0 {
            r * c
        } else {
            r * s
        }
    }

    /// Fills `out` with the normals of elements start.. start+out.len(). Bit-identical to
    /// calling `normal` per element; the bulk runs 64 elements at a time in SIMD-friendly form.
    pub fn fill_normal(&self, start: u64, out: &mut [f32]) {
        let mut i = 0usize;
        while i < out.len() && !(start + i as u64).is_multiple_of(4) {
            out[i] = self.normal(start + i as u64);
            i += 1;
        }
        let bulk = (out.len() - i) / BULK * BULK;
        fill_bulk(self, (start + i as u64) / 4, &mut out[i..i + bulk]);
        i += bulk;
        while i < out.len() {
            out[i] = self.normal(start + i as u64);
            i += 1;
        }
    }

    /// +1 or -1 for element `i` (the top bit of its word).
    #[inline]
    pub fn rademacher(&self, i: u64) -> f32 {
        let w = self.block(i / 4)[(i % 4) as usize];
        if w >> 31 == 0 {
            1.0
        } else {
            -1.0
        }
    }

    /// Uniform in [0, 1) for element `i`, exact multiple of 2^-24.
    #[inline]
    pub fn uniform(&self, i: u64) -> f32 {
        u01_half_open(self.block(i / 4)[(i % 4) as usize])
    }
}

// The shifted words are below 2^24, so the i32 conversion is exact (and vectorizes).
#[inline(always)]
fn u01_half_open(w: u32) -> f32 {
    ((w >> 8) as i32) as f32 * (1.0 / 16_777_216.0)
}

#[inline(always)]
fn u01_open_closed(w: u32) -> f32 {
    (((w >> 8) + 1) as i32) as f32 * (1.0 / 16_777_216.0)
}

/// Box-Muller on two words: radius sqrt(-2 ln u1) and (sin, cos) of 2 pi u2.
#[inline(always)]
fn box_muller_parts(w1: u32, w2: u32) -> (f32, f32, f32) {
    let u1 = u01_open_closed(w1);
    let u2 = u01_half_open(w2);
    let r = (-2.0 * ln_f32(u1)).sqrt();
    let (s, c) = sincos_2pi(u2);
    (r, s, c)
}

/// Natural log for x in (0, 1], to ~1 ulp, from IEEE ops and fma only.
#[inline(always)]
pub fn ln_f32(x: f32) -> f32 {
    let bits = x.to_bits();
    let mut e = ((bits >> 23) & 0xff) as i32 - 127;
    let m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000); // [1, 2)
                                                                // Branch-free so that the bulk path vectorizes.
    let big = m > std::f32::consts::SQRT_2;
    let m = if big { m * 0.5 } else { m };
    e += big as i32;
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let mut p = 1.0f32 / 11.0;
    p = p.mul_add(s2, 1.0 / 9.0);
    p = p.mul_add(s2, 1.0 / 7.0);
    p = p.mul_add(s2, 1.0 / 5.0);
    p = p.mul_add(s2, 1.0 / 3.0);
    p = p.mul_add(s2, 1.0);
    let ln_m = 2.0 * s * p;
    (e as f32).mul_add(std::f32::consts::LN_2, ln_m)
}

/// (sin, cos) of 2 pi u for u in [0, 1), from IEEE ops and fma only.
#[inline(always)]
pub fn sincos_2pi(u: f32) -> (f32, f32) {
    // u * 4 is exact; the quadrant q and remainder r in [-1/8, 1/8] are exact too.
    let q = (u * 4.0).round_ties_even();
    let r = u - q * 0.25;
    let x = r * std::f32::consts::TAU;
    let x2 = x * x;
    let mut sp = -1.0f32 / 39_916_800.0;
    sp = sp.mul_add(x2, 1.0 / 362_880.0);
    sp = sp.mul_add(x2, -1.0 / 5040.0);
    sp = sp.mul_add(x2, 1.0 / 120.0);
    sp = sp.mul_add(x2, -1.0 / 6.0);
    let sin_r = (x * x2).mul_add(sp, x);
    let mut cp = 1.0f32 / 479_001_600.0;
    cp = cp.mul_add(x2, -1.0 / 3_628_800.0);
    cp = cp.mul_add(x2, 1.0 / 40_320.0);
    cp = cp.mul_add(x2, -1.0 / 720.0);
    cp = cp.mul_add(x2, 1.0 / 24.0);
    cp = cp.mul_add(x2, -0.5);
    let cos_r = x2.mul_add(cp, 1.0);
    // Quadrant k: (sin, cos) of x + k pi/2 = (s, c), (c, -s), (-s, -c), (-c, s), branch-free.
    // q is an integer in [0, 4], so q + 2^23 is exact and its low mantissa bits are q's; a
    // float -> int cast would saturate, which compiles to scalar code per lane.
    let k = ((q + 8_388_608.0).to_bits() & 3) as i32;
    let (a, b) = if k & 1 == 1 {
        (cos_r, sin_r)
    } else {
        (sin_r, cos_r)
    };
    let sign_sin = if k & 2 == 2 { -1.0 } else { 1.0 };
    let sign_cos = if (k + 1) & 2 == 2 { -1.0 } else { 1.0 };
    (a * sign_sin, b * sign_cos)
}

/// Elements produced per bulk call (16 Philox blocks).
const BULK: usize = 64;

/// The normals of elements 4*block .. 4*block + 64, in structure-of-arrays form so the
/// compiler vectorizes the rounds and the transforms.
#[inline(always)]
fn normals_bulk_body(p: &Philox, block: u64, out: &mut [f32; BULK]) {
    const L: usize = BULK / 4;
    let mut c0 = [0u32; L];
    let mut c1 = [0u32; L];
    let c2 = [p.step; L];
    let c3 = [p.tensor; L];
    for l in 0..L {
        let b = block + l as u64;
        c0[l] = b as u32;
        c1[l] = (b >> 32) as u32;
    }
    let (mut x0, mut x1, mut x2, mut x3) = (c0, c1, c2, c3);
    let (mut k0, mut k1) = (p.key[0], p.key[1]);
    for round in 0..10 {
        if round > 0 {
            k0 = k0.wrapping_add(W0);
            k1 = k1.wrapping_add(W1);
        }
        for l in 0..L {
            let p0 = M0 as u64 * x0[l] as u64;
            let p1 = M1 as u64 * x2[l] as u64;
            let (hi0, lo0, hi1, lo1) = ((p0 >> 32) as u32, p0 as u32, (p1 >> 32) as u32, p1 as u32);
            let n0 = hi1 ^ x1[l] ^ k0;
            let n2 = hi0 ^ x3[l] ^ k1;
            x0[l] = n0;
            x1[l] = lo1;
            x2[l] = n2;
            x3[l] = lo0;
        }
    }
    for l in 0..L {
        let (r0, s0, co0) = box_muller_parts(x0[l], x1[l]);
        let (r1, s1, co1) = box_muller_parts(x2[l], x3[l]);
        out[4 * l] = r0 * co0;
        out[4 * l + 1] = r0 * s0;
        out[4 * l + 2] = r1 * co1;
        out[4 * l + 3] = r1 * s1;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn normals_bulk_avx2(p: &Philox, block: u64, out: &mut [f32; BULK]) {
    normals_bulk_body(p, block, out)
}

/// The normals of elements 4 * block .. 4 * block + out.len() (a multiple of BULK), on the
/// widest vector unit the CPU has (`backend::cpu::simd::level`, which `ZOFT_SIMD` caps); every
/// variant computes the same bits (the transforms use only correctly rounded ops and fused
/// multiply-adds).
fn fill_bulk(p: &Philox, block: u64, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::backend::cpu::simd::{level, Level};
        match level() {
            // SAFETY: level() detected the features at run time.
            Level::Avx512 => return unsafe { avx512::fill_blocks(p, block, out) },
            Level::Avx2 => {
                for (c, chunk) in out.chunks_exact_mut(BULK).enumerate() {
                    // SAFETY: as above.
                    unsafe {
                        normals_bulk_avx2(p, block + 16 * c as u64, chunk.try_into().unwrap())
                    };
                }
                return;
            }
            Level::Baseline => {}
        }
    }
    for (c, chunk) in out.chunks_exact_mut(BULK).enumerate() {
        normals_bulk_body(p, block + 16 * c as u64, chunk.try_into().unwrap());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known-answer vectors of Philox-4x32-10 published with the Random123 library.
    #[test]
    fn philox_known_answers() {
        assert_eq!(
            philox4x32_10([0, 0, 0, 0], [0, 0]),
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0]
            ),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    fn ln_and_sincos_match_libm() {
        for k in 1..=100_000u32 {
            let x = k as f32 / 100_000.0;
            let err = (ln_f32(x) as f64 - (x as f64).ln()).abs();
            assert!(
                err <= 2e-7 * (x as f64).ln().abs().max(1.0),
                "ln({x}) err {err}"
            );
            let (s, c) = sincos_2pi(x - x.floor());
            let a = std::f64::consts::TAU * (x - x.floor()) as f64;
            assert!((s as f64 - a.sin()).abs() < 3e-7, "sin at {x}");
            assert!((c as f64 - a.cos()).abs() < 3e-7, "cos at {x}");
        }
    }

    /// Every bulk variant the CPU can run (AVX-512, AVX2, portable) gives the scalar path's
    /// bits, for keys with high bits set and across the 2^32-block carry into counter word 1.
    #[test]
    fn bulk_variants_match_scalar_normals() {
        let starts = [0u64, 64, (1 << 32) - 40, 0x1234_5678_9abc];
        for (seed, step, tensor) in [(0u64, 0u32, 0u32), (u64::MAX, 7, 0xFFFF_FF01), (42, 3, 9)] {
            let p = Philox::new(seed, step, tensor);
            for &block in &starts {
                let mut fast = vec![f32::NAN; 4 * BULK];
                fill_bulk(&p, block, &mut fast);
                let mut portable = [f32::NAN; BULK];
                for (c, chunk) in fast.chunks(BULK).enumerate() {
                    normals_bulk_body(&p, block + 16 * c as u64, &mut portable);
                    #[cfg(target_arch = "x86_64")]
                    if std::arch::is_x86_feature_detected!("avx2")
                        && std::arch::is_x86_feature_detected!("fma")
                    {
                        let mut avx2 = [f32::NAN; BULK];
                        // SAFETY: the features were detected at run time.
                        unsafe { normals_bulk_avx2(&p, block + 16 * c as u64, &mut avx2) };
                        assert_eq!(avx2.map(f32::to_bits), portable.map(f32::to_bits));
                    }
                    for (j, x) in chunk.iter().enumerate() {
                        let e = 4 * block + (c * BULK + j) as u64;
                        assert_eq!(x.to_bits(), p.normal(e).to_bits(), "element {e}");
                        assert_eq!(x.to_bits(), portable[j].to_bits(), "element {e}");
                    }
                }
            }
        }
    }

    #[test]
    fn normal_moments_and_fill_agree() {
        let p = Philox::new(42, 3, 7);
        let n = 200_000;
        let mut v = vec![0.0f32; n];
        p.fill_normal(0, &mut v);
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n as f64;
        let kurt = v.iter().map(|&x| (x as f64 - mean).powi(4)).sum::<f64>() / n as f64 / var / var;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.01, "var {var}");
        assert!((kurt - 3.0).abs() < 0.05, "kurtosis {kurt}");
        // Every dispatch variant gives the same bits as the scalar path.
        let mut bulk = [0.0f32; BULK];
        normals_bulk_body(&p, 5, &mut bulk);
        for (j, x) in bulk.iter().enumerate() {
            assert_eq!(x.to_bits(), p.normal(20 + j as u64).to_bits());
            assert_eq!(x.to_bits(), v[20 + j].to_bits());
        }
        // Any element regenerated alone equals the bulk fill, from any offset.
        let mut w = vec![0.0f32; 11];
        p.fill_normal(1001, &mut w);
        for (j, x) in w.iter().enumerate() {
            assert_eq!(x.to_bits(), p.normal(1001 + j as u64).to_bits());
            assert_eq!(x.to_bits(), v[1001 + j].to_bits());
        }
        // Different keys give different streams.
        assert_ne!(Philox::new(42, 4, 7).normal(0), p.normal(0));
        assert_ne!(Philox::new(42, 3, 8).normal(0), p.normal(0));
    }
}

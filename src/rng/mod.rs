//! Philox-4x32-10, the one random generator of zoft, and its uniform, normal and Rademacher
//! values; `transform` turns words into normals, `x86` runs both 8 or 16 lanes at a time.
//!
//! Keyed by (run seed, step, tensor id) with the element index as counter, so any element's
//! value can be regenerated anywhere, in any order. `csrc/philox.cuh` is the bit-for-bit CUDA
//! mirror (`transform` says why the bits agree).

mod transform;
#[cfg(target_arch = "x86_64")]
mod x86;

use transform::{box_muller, u01_half_open};

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

#[inline(always)]
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = a as u64 * b as u64;
    ((p >> 32) as u32, p as u32)
}

/// The key of each of the 10 rounds: `key`, bumped by the Weyl constants every round.
#[inline(always)]
fn round_keys(key: [u32; 2]) -> [(u32, u32); 10] {
    std::array::from_fn(|round| {
        let r = round as u32;
        (
            key[0].wrapping_add(W0.wrapping_mul(r)),
            key[1].wrapping_add(W1.wrapping_mul(r)),
        )
    })
}

/// The raw Philox-4x32 block function with 10 rounds.
#[inline]
pub fn philox4x32_10(mut ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    for (k0, k1) in round_keys(key) {
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

    /// The four words of block `block`: the uniforms and signs of elements 4*block ..
    /// 4*block+3, or the normals of elements 8*block .. 8*block+7.
    #[inline]
    pub fn block(&self, block: u64) -> [u32; 4] {
        philox4x32_10(
            [block as u32, (block >> 32) as u32, self.step, self.tensor],
            self.key,
        )
    }

    /// The eight normals of block `block` (elements 8*block .. 8*block+7): word q gives
    /// the Box-Muller pair (r cos, r sin) of elements 8*block + 2q and 8*block + 2q + 1.
    #[inline]
    pub fn block_normals(&self, block: u64) -> [f32; NORMALS_PER_BLOCK] {
        let w = self.block(block);
        let mut z = [0.0; NORMALS_PER_BLOCK];
        for (q, &word) in w.iter().enumerate() {
            (z[2 * q], z[2 * q + 1]) = box_muller::<f32>(word);
        }
        z
    }

    /// Standard normal value of element `i`.
    #[inline]
    pub fn normal(&self, i: u64) -> f32 {
        let per_block = NORMALS_PER_BLOCK as u64;
        let w = self.block(i / per_block);
        let (c, s) = box_muller::<f32>(w[(i % per_block / 2) as usize]);
        if i.is_multiple_of(2) {
            c
        } else {
            s
        }
    }

    /// Fills `out` with the normals of elements start.. start+out.len(). Bit-identical to
    /// calling `normal` per element; the bulk runs BULK elements at a time in vector form.
    pub fn fill_normal(&self, start: u64, out: &mut [f32]) {
        // Up to the first block boundary, from that block's normals.
        let per_block = NORMALS_PER_BLOCK as u64;
        let lane = (start % per_block) as usize;
        let head = if lane == 0 {
            0
        } else {
            out.len().min(NORMALS_PER_BLOCK - lane)
        };
        if head > 0 {
            let z = self.block_normals(start / per_block);
            out[..head].copy_from_slice(&z[lane..lane + head]);
        }
        let rest = &mut out[head..];
        let first_block = (start + head as u64) / per_block;
        let bulk = rest.len() / BULK * BULK;
        let (body, tail) = rest.split_at_mut(bulk);
        fill_bulk(self, first_block, body);
        if !tail.is_empty() {
            // A whole bulk call is cheaper than a block at a time in scalar code.
            let mut z = [0.0; BULK];
            fill_bulk(
                self,
                first_block + (bulk / NORMALS_PER_BLOCK) as u64,
                &mut z,
            );
            tail.copy_from_slice(&z[..tail.len()]);
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
        u01_half_open::<f32>(self.block(i / 4)[(i % 4) as usize])
    }
}

/// Normals per Philox block: a Box-Muller pair from each of its four words.
const NORMALS_PER_BLOCK: usize = 8;

/// Elements produced per bulk call (8 Philox blocks).
const BULK: usize = 64;

/// The normals of elements 8*block .. 8*block + 64, in structure-of-arrays form so the
/// compiler vectorizes the rounds and the transforms.
#[inline(always)]
fn normals_bulk_body(p: &Philox, block: u64, out: &mut [f32; BULK]) {
    const L: usize = BULK / NORMALS_PER_BLOCK;
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
    for (k0, k1) in round_keys(p.key) {
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
    for (l, pairs) in out.chunks_exact_mut(NORMALS_PER_BLOCK).enumerate() {
        for (q, words) in [x0, x1, x2, x3].iter().enumerate() {
            (pairs[2 * q], pairs[2 * q + 1]) = box_muller::<f32>(words[l]);
        }
    }
}

/// The normals of elements 8 * block .. 8 * block + out.len() (a multiple of BULK), on the
/// widest vector unit the CPU has (`backend::cpu::simd::level`, which `ZOFT_SIMD` caps); every
/// variant computes the same bits (the transforms use only correctly rounded ops and fused
/// multiply-adds).
fn fill_bulk(p: &Philox, block: u64, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::backend::cpu::simd::{level, Level};
        match level() {
            // SAFETY: level() detected the features at run time.
            Level::Avx512 => return unsafe { x86::fill_blocks_avx512(p, block, out) },
            // SAFETY: as above.
            Level::Avx2 => return unsafe { x86::fill_blocks_avx2(p, block, out) },
            Level::Baseline => {}
        }
    }
    fill_blocks_portable(p, block, out)
}

/// `fill_bulk` without vector intrinsics, left to the compiler to vectorize.
fn fill_blocks_portable(p: &Philox, block: u64, out: &mut [f32]) {
    for (c, chunk) in out.chunks_exact_mut(BULK).enumerate() {
        normals_bulk_body(
            p,
            block + (BULK / NORMALS_PER_BLOCK * c) as u64,
            chunk.try_into().unwrap(),
        );
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

    /// Over every input the generator can produce (the 2^20 radius uniforms and the 2^12
    /// angles), the polynomials stay within a few f32 roundings of the f64 functions, and so
    /// does each normal of the Box-Muller pair, over every radius; none is zero.
    #[test]
    fn transforms_match_f64_on_every_uniform() {
        use transform::{angle_u01, ln, radius_u01, sincos_2pi, RADIUS_BITS};
        let (mut ln_err, mut sin_err, mut cos_err, mut normal_err) = (0f64, 0f64, 0f64, 0f64);
        let angle_bits = 32 - RADIUS_BITS;
        for k in 0..1u32 << angle_bits {
            let u2 = angle_u01::<f32>(k);
            assert_eq!(u2 as f64, (k as f64 + 0.5) / (1u64 << angle_bits) as f64);
            let (s, c) = sincos_2pi::<f32>(u2);
            // Off the axes: a normal is never exactly zero.
            assert!(s != 0.0 && c != 0.0, "angle {u2}: sin {s}, cos {c}");
            let a = std::f64::consts::TAU * u2 as f64;
            sin_err = sin_err.max((s as f64 - a.sin()).abs());
            cos_err = cos_err.max((c as f64 - a.cos()).abs());
        }
        for k in 0..1u32 << RADIUS_BITS {
            // Every radius, with an angle scrambled from it so that many angles are met.
            let w = k << angle_bits | (k.wrapping_mul(0x9E37_79B9) >> RADIUS_BITS);
            let u1 = radius_u01::<f32>(w);
            assert_eq!(u1 as f64, (k as f64 + 0.5) / (1u64 << RADIUS_BITS) as f64);
            let l = (u1 as f64).ln();
            // Relative to ln u1, or absolute near u1 = 1 where ln u1 vanishes.
            ln_err = ln_err.max((ln::<f32>(u1) as f64 - l).abs() / l.abs().max(1.0));
            let (zc, zs) = box_muller::<f32>(w);
            assert!(zc != 0.0 && zs != 0.0, "word {w:#x}: normals {zc}, {zs}");
            let r = (-2.0 * l).sqrt();
            let a = std::f64::consts::TAU * angle_u01::<f32>(w) as f64;
            for (z, exact) in [(zc, r * a.cos()), (zs, r * a.sin())] {
                normal_err = normal_err.max((z as f64 - exact).abs() / exact.abs().max(1.0));
            }
        }
        eprintln!(
            "errors: ln {ln_err:e}, sin {sin_err:e}, cos {cos_err:e}, normals {normal_err:e}"
        );
        // f32's unit roundoff is 6e-8; each bound is a few of them.
        assert!(ln_err < 1.5e-7, "ln: error {ln_err:e}");
        assert!(sin_err < 1.5e-7, "sin: error {sin_err:e}");
        assert!(cos_err < 1.5e-7, "cos: error {cos_err:e}");
        assert!(normal_err < 5e-7, "normals: error {normal_err:e}");
    }

    /// Every bulk variant the CPU can run (AVX-512, AVX2, portable) gives the scalar path's
    /// bits, for keys with high bits set and across the 2^32-block carry into counter word 1,
    /// at lengths that end on each variant's group of streams and past it.
    #[test]
    fn bulk_variants_match_scalar_normals() {
        type Fill = fn(&Philox, u64, &mut [f32]);
        let starts = [0u64, 64, (1 << 32) - 40, 0x1234_5678_9abc];
        let mut variants: Vec<(&str, Fill)> = vec![("portable", fill_blocks_portable)];
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") && has!("fma") {
                // SAFETY: the features were detected at run time.
                variants.push(("avx2", |p, b, o| unsafe { x86::fill_blocks_avx2(p, b, o) }));
            }
            if has!("avx512f") && has!("avx2") && has!("fma") {
                // SAFETY: as above.
                variants.push(("avx512", |p, b, o| unsafe {
                    x86::fill_blocks_avx512(p, b, o)
                }));
            }
        }
        for (seed, step, tensor) in [(0u64, 0u32, 0u32), (u64::MAX, 7, 0xFFFF_FF01), (42, 3, 9)] {
            let p = Philox::new(seed, step, tensor);
            for (&block, len) in starts
                .iter()
                .flat_map(|b| [(b, 4 * BULK), (b, 3 * BULK), (b, 5 * BULK)])
            {
                for (name, fill) in &variants {
                    let mut got = vec![f32::NAN; len];
                    fill(&p, block, &mut got);
                    for (j, x) in got.iter().enumerate() {
                        let e = 8 * block + j as u64;
                        let want = p.normal(e);
                        assert_eq!(x.to_bits(), want.to_bits(), "{name}: element {e}");
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
            assert_eq!(x.to_bits(), p.normal(40 + j as u64).to_bits());
            assert_eq!(x.to_bits(), v[40 + j].to_bits());
        }
        // A block's normals are its elements'.
        for (j, x) in p.block_normals(7).iter().enumerate() {
            assert_eq!(x.to_bits(), v[56 + j].to_bits());
        }
        // Any element regenerated alone equals the bulk fill, from any offset and at any
        // length: within one block, across a partial head, the bulk and a partial tail.
        for start in 1000..1010u64 {
            for len in [0, 1, 7, 8, 9, 63, 64, 65, 200] {
                let mut w = vec![f32::NAN; len];
                p.fill_normal(start, &mut w);
                for (j, x) in w.iter().enumerate() {
                    let e = start as usize + j;
                    assert_eq!(x.to_bits(), p.normal(e as u64).to_bits(), "element {e}");
                    assert_eq!(x.to_bits(), v[e].to_bits(), "element {e}");
                }
            }
        }
        // Different keys give different streams.
        assert_ne!(Philox::new(42, 4, 7).normal(0), p.normal(0));
        assert_ne!(Philox::new(42, 3, 8).normal(0), p.normal(0));
    }
}

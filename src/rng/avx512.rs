//! Philox normals written out in AVX-512, 64 at a time: the same operations as the portable
//! `normals_bulk_body` in the same order, so the same bits.
//!
//! The portable loop leaves LLVM to vectorize 32 x 32 -> 64-bit products over 16 lanes, which
//! it does with zero-extensions and narrowing moves around every multiply (36 instructions a
//! round). Here each Philox word lives in the low half of a 64-bit lane, where `vpmuludq`
//! gives the whole product at once: a round is six instructions per 8 blocks. The high halves
//! pick up garbage, which nothing reads: the multiplies and the final word extraction look at
//! the low halves only.

use super::{Philox, BULK, M0, M1, W0, W1};
use std::arch::x86_64::*;

/// The words of 8 consecutive blocks, one per 64-bit lane (low half).
struct Words8 {
    x0: __m512i,
    x1: __m512i,
    x2: __m512i,
    x3: __m512i,
}

#[inline(always)]
unsafe fn f32x16(x: f32) -> __m512 {
    _mm512_set1_ps(x)
}

/// The key of each of the 10 rounds, broadcast.
type RoundKeys = [(__m512i, __m512i); 10];

#[inline(always)]
unsafe fn round_keys(p: &Philox) -> RoundKeys {
    let (mut k0, mut k1) = (p.key[0], p.key[1]);
    let mut keys = [(_mm512_setzero_si512(), _mm512_setzero_si512()); 10];
    for (round, k) in keys.iter_mut().enumerate() {
        if round > 0 {
            k0 = k0.wrapping_add(W0);
            k1 = k1.wrapping_add(W1);
        }
        *k = (_mm512_set1_epi32(k0 as i32), _mm512_set1_epi32(k1 as i32));
    }
    keys
}

/// Philox-4x32-10 over blocks first .. first + 8.
#[inline(always)]
unsafe fn philox8(p: &Philox, keys: &RoundKeys, first: u64) -> Words8 {
    let b = _mm512_add_epi64(
        _mm512_set1_epi64(first as i64),
        _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7),
    );
    let mut w = Words8 {
        x0: b,
        x1: _mm512_srli_epi64::<32>(b),
        x2: _mm512_set1_epi64(p.step as i64),
        x3: _mm512_set1_epi64(p.tensor as i64),
    };
    let m0 = _mm512_set1_epi64(M0 as i64);
    let m1 = _mm512_set1_epi64(M1 as i64);
    for (k0, k1) in keys {
        let p0 = _mm512_mul_epu32(w.x0, m0);
        let p1 = _mm512_mul_epu32(w.x2, m1);
        let hi0 = _mm512_srli_epi64::<32>(p0);
        let hi1 = _mm512_srli_epi64::<32>(p1);
        // 0x96: a ^ b ^ c.
        w.x0 = _mm512_ternarylogic_epi32::<0x96>(hi1, w.x1, *k0);
        w.x2 = _mm512_ternarylogic_epi32::<0x96>(hi0, w.x3, *k1);
        w.x1 = p1;
        w.x3 = p0;
    }
    w
}

/// The low halves of a's 8 lanes, then of b's.
#[inline(always)]
unsafe fn low_halves(a: __m512i, b: __m512i) -> __m512i {
    let idx = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    _mm512_permutex2var_epi32(a, idx, b)
}

/// rng::ln_f32 on 16 lanes.
#[inline(always)]
unsafe fn ln16(x: __m512) -> __m512 {
    let bits = _mm512_castps_si512(x);
    let e = _mm512_sub_epi32(
        _mm512_and_si512(_mm512_srli_epi32::<23>(bits), _mm512_set1_epi32(0xff)),
        _mm512_set1_epi32(127),
    );
    let m = _mm512_castsi512_ps(_mm512_or_si512(
        _mm512_and_si512(bits, _mm512_set1_epi32(0x007f_ffff)),
        _mm512_set1_epi32(0x3f80_0000),
    ));
    let big = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(m, f32x16(std::f32::consts::SQRT_2));
    let m = _mm512_mask_mul_ps(m, big, m, f32x16(0.5));
    let e = _mm512_mask_add_epi32(e, big, e, _mm512_set1_epi32(1));
    let one = f32x16(1.0);
    let s = _mm512_div_ps(_mm512_sub_ps(m, one), _mm512_add_ps(m, one));
    let s2 = _mm512_mul_ps(s, s);
    let mut p = f32x16(1.0f32 / 11.0);
    p = _mm512_fmadd_ps(p, s2, f32x16(1.0 / 9.0));
    p = _mm512_fmadd_ps(p, s2, f32x16(1.0 / 7.0));
    p = _mm512_fmadd_ps(p, s2, f32x16(1.0 / 5.0));
    p = _mm512_fmadd_ps(p, s2, f32x16(1.0 / 3.0));
    p = _mm512_fmadd_ps(p, s2, one);
    let ln_m = _mm512_mul_ps(_mm512_mul_ps(f32x16(2.0), s), p);
    _mm512_fmadd_ps(_mm512_cvtepi32_ps(e), f32x16(std::f32::consts::LN_2), ln_m)
}

/// rng::sincos_2pi on 16 lanes.
#[inline(always)]
unsafe fn sincos16(u: __m512) -> (__m512, __m512) {
    let q = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(u, f32x16(4.0)),
    );
    let r = _mm512_sub_ps(u, _mm512_mul_ps(q, f32x16(0.25)));
    let x = _mm512_mul_ps(r, f32x16(std::f32::consts::TAU));
    let x2 = _mm512_mul_ps(x, x);
    let mut sp = f32x16(-1.0f32 / 39_916_800.0);
    sp = _mm512_fmadd_ps(sp, x2, f32x16(1.0 / 362_880.0));
    sp = _mm512_fmadd_ps(sp, x2, f32x16(-1.0 / 5040.0));
    sp = _mm512_fmadd_ps(sp, x2, f32x16(1.0 / 120.0));
    sp = _mm512_fmadd_ps(sp, x2, f32x16(-1.0 / 6.0));
    let sin_r = _mm512_fmadd_ps(_mm512_mul_ps(x, x2), sp, x);
    let mut cp = f32x16(1.0f32 / 479_001_600.0);
    cp = _mm512_fmadd_ps(cp, x2, f32x16(-1.0 / 3_628_800.0));
    cp = _mm512_fmadd_ps(cp, x2, f32x16(1.0 / 40_320.0));
    cp = _mm512_fmadd_ps(cp, x2, f32x16(-1.0 / 720.0));
    cp = _mm512_fmadd_ps(cp, x2, f32x16(1.0 / 24.0));
    cp = _mm512_fmadd_ps(cp, x2, f32x16(-0.5));
    let cos_r = _mm512_fmadd_ps(x2, cp, f32x16(1.0));
    let k = _mm512_castps_si512(_mm512_add_ps(q, f32x16(8_388_608.0)));
    let odd = _mm512_test_epi32_mask(k, _mm512_set1_epi32(1));
    let a = _mm512_mask_blend_ps(odd, sin_r, cos_r);
    let b = _mm512_mask_blend_ps(odd, cos_r, sin_r);
    // Multiplying by -1 is exact, so flipping the sign bit gives the same bits: sin takes
    // bit 1 of k, cos bit 1 of k + 1.
    let two = _mm512_set1_epi32(2);
    let sign_sin = _mm512_slli_epi32::<30>(_mm512_and_si512(k, two));
    let sign_cos = _mm512_slli_epi32::<30>(_mm512_and_si512(
        _mm512_add_epi32(k, _mm512_set1_epi32(1)),
        two,
    ));
    (
        _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(a), sign_sin)),
        _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(b), sign_cos)),
    )
}

/// Box-Muller over 8 blocks, written as elements 4 * first .. 4 * first + 32 at `out`.
#[inline(always)]
unsafe fn box_muller8(w: &Words8, out: *mut f32) {
    // Lanes 0-7: the (word 0, word 1) pairs of the 8 blocks; lanes 8-15: (word 2, word 3).
    let w1 = low_halves(w.x0, w.x2);
    let w2 = low_halves(w.x1, w.x3);
    let scale = f32x16(1.0 / 16_777_216.0);
    let u1 = _mm512_mul_ps(
        _mm512_cvtepi32_ps(_mm512_add_epi32(
            _mm512_srli_epi32::<8>(w1),
            _mm512_set1_epi32(1),
        )),
        scale,
    );
    let u2 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32::<8>(w2)), scale);
    let r = _mm512_sqrt_ps(_mm512_mul_ps(f32x16(-2.0), ln16(u1)));
    let (s, c) = sincos16(u2);
    let rc = _mm512_mul_ps(r, c);
    let rs = _mm512_mul_ps(r, s);
    // Block b's four elements are rc[b], rs[b], rc[8 + b], rs[8 + b].
    let lo = _mm512_setr_epi32(0, 16, 8, 24, 1, 17, 9, 25, 2, 18, 10, 26, 3, 19, 11, 27);
    let hi = _mm512_setr_epi32(4, 20, 12, 28, 5, 21, 13, 29, 6, 22, 14, 30, 7, 23, 15, 31);
    _mm512_storeu_ps(out, _mm512_permutex2var_ps(rc, lo, rs));
    _mm512_storeu_ps(out.add(16), _mm512_permutex2var_ps(rc, hi, rs));
}

/// Fills `out` (a multiple of BULK = 64 long, 16 Philox blocks) with the normals of elements
/// 4 * block onwards.
///
/// # Safety
/// The CPU has AVX-512F.
#[target_feature(enable = "avx512f")]
pub unsafe fn fill_blocks(p: &Philox, block: u64, out: &mut [f32]) {
    debug_assert!(out.len().is_multiple_of(BULK));
    let keys = round_keys(p);
    for (c, chunk) in out.chunks_exact_mut(BULK).enumerate() {
        let first = block + 16 * c as u64;
        // Two independent 8-block streams give the multiplier pipes work to overlap.
        let a = philox8(p, &keys, first);
        let b = philox8(p, &keys, first + 8);
        box_muller8(&a, chunk.as_mut_ptr());
        box_muller8(&b, chunk.as_mut_ptr().add(32));
    }
}

//! The bulk normal generator in AVX2 (8 lanes) and AVX-512 (16 lanes): Philox rounds written
//! out in vector instructions, then the shared transforms of `transform.rs` at that width, so
//! every width gives the scalar reference's bits.
//!
//! Left to itself LLVM vectorizes Philox's 32 x 32 -> 64-bit products with zero-extensions and
//! narrowing moves around every multiply (36 instructions a round at 16 lanes). Here each
//! Philox word lives in the low half of a 64-bit lane, where `vpmuludq` gives the whole product
//! at once: a round is six instructions (eight without AVX-512's three-way xor). The high
//! halves pick up garbage that nothing reads: the multiplies and the final pairing of words
//! look at the low halves only.
//!
//! Safety: values of `F8`/`U8` (AVX2) and `F16`/`U16` (AVX-512) are made only inside
//! `fill_blocks_avx2` and `fill_blocks_avx512`, which are compiled for those features and
//! called only where `backend::cpu::simd::level` detected them; every method is
//! `inline(always)`, so its intrinsics compile into that caller.

use super::transform::{box_muller, Lanes};
use super::{Philox, BULK, M0, M1, NORMALS_PER_BLOCK};
use std::arch::x86_64::*;
use std::ops::{Add, BitAnd, BitOr, Div, Mul, Neg, Shr, Sub};

/// Philox words in 64-bit lanes (one block each, low halves) and the lanes' pairing into the
/// u32 words of the transforms.
trait PhiloxLanes: Lanes {
    /// Philox blocks per register: one per 64-bit lane.
    const BLOCKS: usize;
    /// Every 64-bit lane `x`.
    fn splat64(x: u64) -> Self::Bits;
    /// Lane j = first + j / 2 + (j % 2) * BLOCKS / 2: the order in which `unpack_lo64` and
    /// `unpack_hi64` put the blocks back in sequence.
    fn counters(first: u64) -> Self::Bits;
    /// The high half of each 64-bit lane, in its low half.
    fn high_halves(a: Self::Bits) -> Self::Bits;
    /// The 64-bit products of the lanes' low halves.
    fn mul_low_halves(a: Self::Bits, b: Self::Bits) -> Self::Bits;
    fn xor3(a: Self::Bits, b: Self::Bits, c: Self::Bits) -> Self::Bits;
    /// u32 lane 2j = a's block j word, lane 2j + 1 = b's block j word.
    fn pair(a: Self::Bits, b: Self::Bits) -> Self::Bits;
    /// In each 128-bit lane, the low 64 bits of a, then those of b.
    fn unpack_lo64(a: Self::Bits, b: Self::Bits) -> Self::Bits;
    /// In each 128-bit lane, the high 64 bits of a, then those of b.
    fn unpack_hi64(a: Self::Bits, b: Self::Bits) -> Self::Bits;
    /// out[2j] = x[j], out[2j + 1] = y[j].
    ///
    /// # Safety
    /// `out` is valid for 2 * lanes writes.
    unsafe fn store_interleaved(x: Self, y: Self, out: *mut f32);
}

/// Implements the operators of a float vector type and of its bits type.
macro_rules! vector_ops {
    ($f:ident, $u:ident, $add:ident, $sub:ident, $mul:ident, $div:ident,
     $and:ident, $or:ident, $add32:ident, $srl:ident, $xor:ident, $sign:expr) => {
        impl Add for $f {
            type Output = $f;
            #[inline(always)]
            fn add(self, b: $f) -> $f {
                // SAFETY: see the module doc.
                unsafe { $f($add(self.0, b.0)) }
            }
        }
        impl Sub for $f {
            type Output = $f;
            #[inline(always)]
            fn sub(self, b: $f) -> $f {
                // SAFETY: see the module doc.
                unsafe { $f($sub(self.0, b.0)) }
            }
        }
        impl Mul for $f {
            type Output = $f;
            #[inline(always)]
            fn mul(self, b: $f) -> $f {
                // SAFETY: see the module doc.
                unsafe { $f($mul(self.0, b.0)) }
            }
        }
        impl Div for $f {
            type Output = $f;
            #[inline(always)]
            fn div(self, b: $f) -> $f {
                // SAFETY: see the module doc.
                unsafe { $f($div(self.0, b.0)) }
            }
        }
        impl Neg for $f {
            type Output = $f;
            /// Flips the sign bit, as multiplying by -1 would.
            #[inline(always)]
            fn neg(self) -> $f {
                // SAFETY: see the module doc.
                unsafe { $f::from_bits($u($xor(self.to_bits().0, $sign))) }
            }
        }
        impl BitAnd for $u {
            type Output = $u;
            #[inline(always)]
            fn bitand(self, b: $u) -> $u {
                // SAFETY: see the module doc.
                unsafe { $u($and(self.0, b.0)) }
            }
        }
        impl BitOr for $u {
            type Output = $u;
            #[inline(always)]
            fn bitor(self, b: $u) -> $u {
                // SAFETY: see the module doc.
                unsafe { $u($or(self.0, b.0)) }
            }
        }
        impl Add for $u {
            type Output = $u;
            /// Wrapping addition of u32 lanes.
            #[inline(always)]
            fn add(self, b: $u) -> $u {
                // SAFETY: see the module doc.
                unsafe { $u($add32(self.0, b.0)) }
            }
        }
        impl Shr<u32> for $u {
            type Output = $u;
            /// Logical shift of u32 lanes (a constant after inlining, so an immediate shift).
            #[inline(always)]
            fn shr(self, n: u32) -> $u {
                // SAFETY: see the module doc.
                unsafe { $u($srl(self.0, _mm_cvtsi32_si128(n as i32))) }
            }
        }
    };
}

/// 8 f32 lanes (AVX2).
#[derive(Clone, Copy)]
struct F8(__m256);
/// 8 u32 lanes, or 4 u64 lanes (AVX2).
#[derive(Clone, Copy)]
struct U8(__m256i);

vector_ops!(
    F8,
    U8,
    _mm256_add_ps,
    _mm256_sub_ps,
    _mm256_mul_ps,
    _mm256_div_ps,
    _mm256_and_si256,
    _mm256_or_si256,
    _mm256_add_epi32,
    _mm256_srl_epi32,
    _mm256_xor_si256,
    _mm256_set1_epi32(i32::MIN)
);

// SAFETY (every unsafe block below): see the module doc.
impl Lanes for F8 {
    type Bits = U8;
    /// All ones in the lanes that are set.
    type Mask = __m256;

    #[inline(always)]
    fn splat(x: f32) -> F8 {
        unsafe { F8(_mm256_set1_ps(x)) }
    }
    #[inline(always)]
    fn splat_bits(x: u32) -> U8 {
        unsafe { U8(_mm256_set1_epi32(x as i32)) }
    }
    #[inline(always)]
    fn mul_add(self, a: F8, b: F8) -> F8 {
        unsafe { F8(_mm256_fmadd_ps(self.0, a.0, b.0)) }
    }
    #[inline(always)]
    fn sqrt(self) -> F8 {
        unsafe { F8(_mm256_sqrt_ps(self.0)) }
    }
    #[inline(always)]
    fn round_ties_even(self) -> F8 {
        unsafe {
            F8(_mm256_round_ps::<
                { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
            >(self.0))
        }
    }
    #[inline(always)]
    fn to_bits(self) -> U8 {
        unsafe { U8(_mm256_castps_si256(self.0)) }
    }
    #[inline(always)]
    fn from_bits(b: U8) -> F8 {
        unsafe { F8(_mm256_castsi256_ps(b.0)) }
    }
    #[inline(always)]
    fn from_i32_bits(b: U8) -> F8 {
        unsafe { F8(_mm256_cvtepi32_ps(b.0)) }
    }
    #[inline(always)]
    fn gt(self, b: F8) -> __m256 {
        unsafe { _mm256_cmp_ps::<_CMP_GT_OQ>(self.0, b.0) }
    }
    #[inline(always)]
    fn any_bit(b: U8, bit: u32) -> __m256 {
        unsafe {
            let bit = _mm256_set1_epi32(bit as i32);
            let zero = _mm256_cmpeq_epi32(_mm256_and_si256(b.0, bit), _mm256_setzero_si256());
            _mm256_castsi256_ps(_mm256_xor_si256(zero, _mm256_set1_epi32(-1)))
        }
    }
    #[inline(always)]
    fn select(m: __m256, if_true: F8, if_false: F8) -> F8 {
        unsafe { F8(_mm256_blendv_ps(if_false.0, if_true.0, m)) }
    }
}

impl PhiloxLanes for F8 {
    const BLOCKS: usize = 4;
    #[inline(always)]
    fn splat64(x: u64) -> U8 {
        unsafe { U8(_mm256_set1_epi64x(x as i64)) }
    }
    #[inline(always)]
    fn counters(first: u64) -> U8 {
        unsafe {
            U8(_mm256_add_epi64(
                _mm256_set1_epi64x(first as i64),
                _mm256_setr_epi64x(0, 2, 1, 3),
            ))
        }
    }
    #[inline(always)]
    fn high_halves(a: U8) -> U8 {
        unsafe { U8(_mm256_srli_epi64::<32>(a.0)) }
    }
    #[inline(always)]
    fn mul_low_halves(a: U8, b: U8) -> U8 {
        unsafe { U8(_mm256_mul_epu32(a.0, b.0)) }
    }
    #[inline(always)]
    fn xor3(a: U8, b: U8, c: U8) -> U8 {
        unsafe { U8(_mm256_xor_si256(_mm256_xor_si256(a.0, b.0), c.0)) }
    }
    #[inline(always)]
    fn pair(a: U8, b: U8) -> U8 {
        unsafe {
            U8(_mm256_blend_epi32::<0b1010_1010>(
                a.0,
                _mm256_slli_epi64::<32>(b.0),
            ))
        }
    }
    #[inline(always)]
    fn unpack_lo64(a: U8, b: U8) -> U8 {
        unsafe { U8(_mm256_unpacklo_epi64(a.0, b.0)) }
    }
    #[inline(always)]
    fn unpack_hi64(a: U8, b: U8) -> U8 {
        unsafe { U8(_mm256_unpackhi_epi64(a.0, b.0)) }
    }
    #[inline(always)]
    unsafe fn store_interleaved(x: F8, y: F8, out: *mut f32) {
        // Per 128-bit half: lo = x0 y0 x1 y1, hi = x2 y2 x3 y3 (and x4.. in the upper half).
        let lo = _mm256_unpacklo_ps(x.0, y.0);
        let hi = _mm256_unpackhi_ps(x.0, y.0);
        _mm256_storeu_ps(out, _mm256_permute2f128_ps::<0x20>(lo, hi));
        _mm256_storeu_ps(out.add(8), _mm256_permute2f128_ps::<0x31>(lo, hi));
    }
}

/// 16 f32 lanes (AVX-512).
#[derive(Clone, Copy)]
struct F16(__m512);
/// 16 u32 lanes, or 8 u64 lanes (AVX-512).
#[derive(Clone, Copy)]
struct U16(__m512i);

vector_ops!(
    F16,
    U16,
    _mm512_add_ps,
    _mm512_sub_ps,
    _mm512_mul_ps,
    _mm512_div_ps,
    _mm512_and_si512,
    _mm512_or_si512,
    _mm512_add_epi32,
    _mm512_srl_epi32,
    _mm512_xor_si512,
    _mm512_set1_epi32(i32::MIN)
);

// SAFETY (every unsafe block below): see the module doc.
impl Lanes for F16 {
    type Bits = U16;
    type Mask = __mmask16;

    #[inline(always)]
    fn splat(x: f32) -> F16 {
        unsafe { F16(_mm512_set1_ps(x)) }
    }
    #[inline(always)]
    fn splat_bits(x: u32) -> U16 {
        unsafe { U16(_mm512_set1_epi32(x as i32)) }
    }
    #[inline(always)]
    fn mul_add(self, a: F16, b: F16) -> F16 {
        unsafe { F16(_mm512_fmadd_ps(self.0, a.0, b.0)) }
    }
    #[inline(always)]
    fn sqrt(self) -> F16 {
        unsafe { F16(_mm512_sqrt_ps(self.0)) }
    }
    #[inline(always)]
    fn round_ties_even(self) -> F16 {
        unsafe {
            F16(_mm512_roundscale_ps::<
                { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
            >(self.0))
        }
    }
    #[inline(always)]
    fn to_bits(self) -> U16 {
        unsafe { U16(_mm512_castps_si512(self.0)) }
    }
    #[inline(always)]
    fn from_bits(b: U16) -> F16 {
        unsafe { F16(_mm512_castsi512_ps(b.0)) }
    }
    #[inline(always)]
    fn from_i32_bits(b: U16) -> F16 {
        unsafe { F16(_mm512_cvtepi32_ps(b.0)) }
    }
    #[inline(always)]
    fn gt(self, b: F16) -> __mmask16 {
        unsafe { _mm512_cmp_ps_mask::<_CMP_GT_OQ>(self.0, b.0) }
    }
    #[inline(always)]
    fn any_bit(b: U16, bit: u32) -> __mmask16 {
        unsafe { _mm512_test_epi32_mask(b.0, _mm512_set1_epi32(bit as i32)) }
    }
    #[inline(always)]
    fn select(m: __mmask16, if_true: F16, if_false: F16) -> F16 {
        unsafe { F16(_mm512_mask_blend_ps(m, if_false.0, if_true.0)) }
    }
}

impl PhiloxLanes for F16 {
    const BLOCKS: usize = 8;
    #[inline(always)]
    fn splat64(x: u64) -> U16 {
        unsafe { U16(_mm512_set1_epi64(x as i64)) }
    }
    #[inline(always)]
    fn counters(first: u64) -> U16 {
        unsafe {
            U16(_mm512_add_epi64(
                _mm512_set1_epi64(first as i64),
                _mm512_setr_epi64(0, 4, 1, 5, 2, 6, 3, 7),
            ))
        }
    }
    #[inline(always)]
    fn high_halves(a: U16) -> U16 {
        unsafe { U16(_mm512_srli_epi64::<32>(a.0)) }
    }
    #[inline(always)]
    fn mul_low_halves(a: U16, b: U16) -> U16 {
        unsafe { U16(_mm512_mul_epu32(a.0, b.0)) }
    }
    #[inline(always)]
    fn xor3(a: U16, b: U16, c: U16) -> U16 {
        // 0x96: a ^ b ^ c.
        unsafe { U16(_mm512_ternarylogic_epi32::<0x96>(a.0, b.0, c.0)) }
    }
    #[inline(always)]
    fn pair(a: U16, b: U16) -> U16 {
        unsafe {
            U16(_mm512_mask_blend_epi32(
                0xAAAA,
                a.0,
                _mm512_slli_epi64::<32>(b.0),
            ))
        }
    }
    #[inline(always)]
    fn unpack_lo64(a: U16, b: U16) -> U16 {
        unsafe { U16(_mm512_unpacklo_epi64(a.0, b.0)) }
    }
    #[inline(always)]
    fn unpack_hi64(a: U16, b: U16) -> U16 {
        unsafe { U16(_mm512_unpackhi_epi64(a.0, b.0)) }
    }
    #[inline(always)]
    unsafe fn store_interleaved(x: F16, y: F16, out: *mut f32) {
        // Indices 16.. pick from y.
        let lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        let hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
        _mm512_storeu_ps(out, _mm512_permutex2var_ps(x.0, lo, y.0));
        _mm512_storeu_ps(out.add(16), _mm512_permutex2var_ps(x.0, hi, y.0));
    }
}

/// The round keys, each word broadcast to every u32 lane.
type RoundKeys<V> = [(<V as Lanes>::Bits, <V as Lanes>::Bits); 10];

/// A plain loop rather than `array::map`, whose out-of-line helper is compiled without the
/// caller's vector features: over 256-element segments it cost about half as much as the
/// normals themselves.
#[inline(always)]
fn round_keys<V: PhiloxLanes>(p: &Philox) -> RoundKeys<V> {
    let mut keys = [(V::splat_bits(0), V::splat_bits(0)); 10];
    for (k, &(k0, k1)) in keys.iter_mut().zip(&super::round_keys(p.key)) {
        *k = (V::splat_bits(k0), V::splat_bits(k1));
    }
    keys
}

/// Philox-4x32-10 over S streams of V::BLOCKS blocks each, from block `first`: the four words
/// of each stream, one block a 64-bit lane. The streams go round by round together, so that S
/// independent multiply chains are in flight at once: one stream's chain alone waits on each
/// multiply, and streams run one after another overlapped too little (the normals took 13-16%
/// longer that way with AVX-512 and with AVX2 on Zen 5; the bits are the same).
#[inline(always)]
fn philox_streams<V: PhiloxLanes, const S: usize>(
    p: &Philox,
    keys: &RoundKeys<V>,
    first: u64,
) -> [[V::Bits; 4]; S] {
    // Plain loops, not `array::from_fn` (see `round_keys`).
    let mut x = [[V::splat_bits(0); 4]; S];
    for (s, xs) in x.iter_mut().enumerate() {
        let b = V::counters(first + (s * V::BLOCKS) as u64);
        *xs = [
            b,
            V::high_halves(b),
            V::splat64(p.step as u64),
            V::splat64(p.tensor as u64),
        ];
    }
    let (m0, m1) = (V::splat64(M0 as u64), V::splat64(M1 as u64));
    for &(k0, k1) in keys {
        for xs in x.iter_mut() {
            let p0 = V::mul_low_halves(xs[0], m0);
            let p1 = V::mul_low_halves(xs[2], m1);
            *xs = [
                V::xor3(V::high_halves(p1), xs[1], k0),
                p1,
                V::xor3(V::high_halves(p0), xs[3], k1),
                p0,
            ];
        }
    }
    x
}

/// The normals of elements 8 * block .. 8 * block + out.len() (a multiple of BULK), S
/// independent Philox streams of V::BLOCKS blocks at a time, so that the multiplier pipes and
/// the dividers always have work to overlap; single streams finish it.
#[inline(always)]
fn fill_blocks<V: PhiloxLanes, const S: usize>(p: &Philox, block: u64, out: &mut [f32]) {
    let per_stream = NORMALS_PER_BLOCK * V::BLOCKS;
    assert!(out.len().is_multiple_of(BULK) && BULK.is_multiple_of(per_stream));
    let keys = round_keys::<V>(p);
    let mut first = block;
    let mut groups = out.chunks_exact_mut(S * per_stream);
    for group in &mut groups {
        streams::<V, S>(p, &keys, first, group);
        first += (S * V::BLOCKS) as u64;
    }
    for one in groups.into_remainder().chunks_exact_mut(per_stream) {
        streams::<V, 1>(p, &keys, first, one);
        first += V::BLOCKS as u64;
    }
}

/// The normals of S * V::BLOCKS blocks from `first` into `out`, which holds exactly theirs.
#[inline(always)]
fn streams<V: PhiloxLanes, const S: usize>(
    p: &Philox,
    keys: &RoundKeys<V>,
    first: u64,
    out: &mut [f32],
) {
    let per_stream = NORMALS_PER_BLOCK * V::BLOCKS;
    assert_eq!(out.len(), S * per_stream);
    let words = philox_streams::<V, S>(p, keys, first);
    let out = out.as_mut_ptr();
    for (s, w) in words.iter().enumerate() {
        // SAFETY: `out` holds the normals of each stream.
        unsafe { normals_of_stream::<V>(w, out.add(s * per_stream)) };
    }
}

/// The 8 * V::BLOCKS normals of one stream's blocks from their words, in element order. The
/// first half of the blocks and the second go through Box-Muller as one vector of twice the
/// width (`Two`), so that their long chains (ln, sqrt, sin and cos) interleave (3-6% faster
/// normals on Zen 5 than one vector at a time, as measured when pairs took two words).
///
/// # Safety
/// `out` is valid for 8 * V::BLOCKS writes.
#[inline(always)]
unsafe fn normals_of_stream<V: PhiloxLanes>(w: &[V::Bits; 4], out: *mut f32) {
    // 64-bit lane j of `w01` holds words 0 and 1 of block `counters` put in lane j, and `w23`
    // words 2 and 3; unpacking gives 128-bit lane k the four words of block k (`lo`) and of
    // block k + BLOCKS / 2 (`hi`), so u32 lane j of each is word j % 4 of block j / 4.
    let w01 = V::pair(w[0], w[1]);
    let w23 = V::pair(w[2], w[3]);
    let words = Two(V::unpack_lo64(w01, w23), V::unpack_hi64(w01, w23));
    // Word q of a block gives its elements 2q (r cos) and 2q + 1 (r sin).
    let (c, s) = box_muller::<Two<V>>(words);
    V::store_interleaved(c.0, s.0, out);
    V::store_interleaved(c.1, s.1, out.add(4 * V::BLOCKS));
}

/// Two vectors of lanes as one of twice the width: each operation is the same operation on
/// both halves, so the bits are those of each half alone.
#[derive(Clone, Copy)]
struct Two<T>(T, T);

/// Implements a binary operator of `Two` halfwise.
macro_rules! two_op {
    ($tr:ident, $f:ident, $bound:ident) => {
        impl<T: $bound<Output = T>> $tr for Two<T> {
            type Output = Two<T>;
            #[inline(always)]
            fn $f(self, b: Two<T>) -> Two<T> {
                Two(self.0.$f(b.0), self.1.$f(b.1))
            }
        }
    };
}
two_op!(Add, add, Add);
two_op!(Sub, sub, Sub);
two_op!(Mul, mul, Mul);
two_op!(Div, div, Div);
two_op!(BitAnd, bitand, BitAnd);
two_op!(BitOr, bitor, BitOr);

impl<T: Neg<Output = T>> Neg for Two<T> {
    type Output = Two<T>;
    #[inline(always)]
    fn neg(self) -> Two<T> {
        Two(-self.0, -self.1)
    }
}

impl<T: Shr<u32, Output = T>> Shr<u32> for Two<T> {
    type Output = Two<T>;
    #[inline(always)]
    fn shr(self, n: u32) -> Two<T> {
        Two(self.0 >> n, self.1 >> n)
    }
}

impl<V: Lanes> Lanes for Two<V> {
    type Bits = Two<V::Bits>;
    type Mask = Two<V::Mask>;

    #[inline(always)]
    fn splat(x: f32) -> Self {
        Two(V::splat(x), V::splat(x))
    }
    #[inline(always)]
    fn splat_bits(x: u32) -> Self::Bits {
        Two(V::splat_bits(x), V::splat_bits(x))
    }
    #[inline(always)]
    fn mul_add(self, a: Self, b: Self) -> Self {
        Two(self.0.mul_add(a.0, b.0), self.1.mul_add(a.1, b.1))
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        Two(self.0.sqrt(), self.1.sqrt())
    }
    #[inline(always)]
    fn round_ties_even(self) -> Self {
        Two(self.0.round_ties_even(), self.1.round_ties_even())
    }
    #[inline(always)]
    fn to_bits(self) -> Self::Bits {
        Two(self.0.to_bits(), self.1.to_bits())
    }
    #[inline(always)]
    fn from_bits(b: Self::Bits) -> Self {
        Two(V::from_bits(b.0), V::from_bits(b.1))
    }
    #[inline(always)]
    fn from_i32_bits(b: Self::Bits) -> Self {
        Two(V::from_i32_bits(b.0), V::from_i32_bits(b.1))
    }
    #[inline(always)]
    fn gt(self, b: Self) -> Self::Mask {
        Two(self.0.gt(b.0), self.1.gt(b.1))
    }
    #[inline(always)]
    fn any_bit(b: Self::Bits, bit: u32) -> Self::Mask {
        Two(V::any_bit(b.0, bit), V::any_bit(b.1, bit))
    }
    #[inline(always)]
    fn select(m: Self::Mask, if_true: Self, if_false: Self) -> Self {
        Two(
            V::select(m.0, if_true.0, if_false.0),
            V::select(m.1, if_true.1, if_false.1),
        )
    }
}

/// `fill_blocks` in AVX2.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn fill_blocks_avx2(p: &Philox, block: u64, out: &mut [f32]) {
    // Four streams, though their words alone fill all sixteen AVX2 registers: with a Box-Muller
    // pair per word the normals still ran 9-12% faster than with two streams on Zen 5 (the
    // spills go to L1 while the multiplies wait).
    fill_blocks::<F8, 4>(p, block, out)
}

/// `fill_blocks` in AVX-512.
///
/// # Safety
/// The CPU has AVX-512F.
#[target_feature(enable = "avx512f,avx2,fma")]
pub unsafe fn fill_blocks_avx512(p: &Philox, block: u64, out: &mut [f32]) {
    fill_blocks::<F16, 4>(p, block, out)
}

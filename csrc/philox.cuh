// Philox-4x32-10 and the transforms from its words to uniform, normal and Rademacher values:
// the one random generator of zoft. `src/rng` is the bit-for-bit Rust mirror; a parity
// test compares them.
//
// Keying: key = (seed lo, seed hi); counter of block b = (b lo, b hi, step, tensor). The
// uniform and the sign of element i come from word i % 4 of block i / 4; its normal from word
// (i % 8) / 2 of block i / 8: each word gives one Box-Muller pair, its high 20 bits the radius
// and its low 12 the angle (cell midpoints, so no normal is zero); even elements take r cos,
// odd ones r sin.
//
// Every float operation is an explicitly rounded intrinsic (__fmul_rn, __fadd_rn, __fsub_rn,
// __fdiv_rn, __fsqrt_rn) or an explicit fused multiply-add (__fmaf_rn): intrinsics are never
// contracted or reassociated by the compiler, so the results equal the Rust code, which uses
// separate IEEE ops and f32::mul_add in the same places. ln and sincos are our own
// polynomials (CUDA's logf/sincosf differ from libm in the last place). Constants are given as
// bit patterns of the f32 values the Rust expressions evaluate to.
#pragma once

#include <stdint.h>

#define ZF_PHILOX_M0 0xD2511F53u
#define ZF_PHILOX_M1 0xCD9E8D57u
#define ZF_PHILOX_W0 0x9E3779B9u
#define ZF_PHILOX_W1 0xBB67AE85u

struct PhiloxKey {
  uint32_t k0, k1;  // the run seed, low and high words
  uint32_t step;    // counter word 2
  uint32_t tensor;  // counter word 3
};

// The raw block function: 10 rounds over a 4-word counter with a 2-word key.
__host__ __device__ __forceinline__ void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += ZF_PHILOX_W0;
      k1 += ZF_PHILOX_W1;
    }
    const uint64_t p0 = (uint64_t)ZF_PHILOX_M0 * c[0];
    const uint64_t p1 = (uint64_t)ZF_PHILOX_M1 * c[2];
    const uint32_t hi0 = (uint32_t)(p0 >> 32), lo0 = (uint32_t)p0;
    const uint32_t hi1 = (uint32_t)(p1 >> 32), lo1 = (uint32_t)p1;
    const uint32_t n0 = hi1 ^ c[1] ^ k0;
    const uint32_t n2 = hi0 ^ c[3] ^ k1;
    c[0] = n0;
    c[1] = lo1;
    c[2] = n2;
    c[3] = lo0;
  }
}

// The four words of block `block` (elements 4*block .. 4*block+3) of a key.
__host__ __device__ __forceinline__ void philox_block(const PhiloxKey& key, uint64_t block,
                                                      uint32_t w[4]) {
  w[0] = (uint32_t)block;
  w[1] = (uint32_t)(block >> 32);
  w[2] = key.step;
  w[3] = key.tensor;
  philox4x32_10(w, key.k0, key.k1);
}

#ifdef __CUDACC__

// f32 constants, as the bit patterns of the Rust constants in src/rng/transform.rs.
#define ZF_U20 __uint_as_float(0x35800000u)     // 2^-20
#define ZF_U21 __uint_as_float(0x35000000u)     // 2^-21
#define ZF_U12 __uint_as_float(0x39800000u)     // 2^-12
#define ZF_U13 __uint_as_float(0x39000000u)     // 2^-13
#define ZF_SQRT2 __uint_as_float(0x3FB504F3u)   // std::f32::consts::SQRT_2
#define ZF_LN2 __uint_as_float(0x3F317218u)     // std::f32::consts::LN_2
#define ZF_TAU __uint_as_float(0x40C90FDBu)     // std::f32::consts::TAU
// The polynomials of src/rng/transform.rs (LN_P, SIN_S, COS_C), highest degree first.
#define ZF_LN_P0 __uint_as_float(0x3E18F070u)   // 0.1493547
#define ZF_LN_P1 __uint_as_float(0x3E4CAF68u)   // 0.19988787
#define ZF_LN_P2 __uint_as_float(0x3EAAAABDu)   // 0.33333388
#define ZF_SIN_S0 __uint_as_float(0xB94CA1F0u)  // -0.00019515282
#define ZF_SIN_S1 __uint_as_float(0x3C08839Du)  // 0.00833216
#define ZF_SIN_S2 __uint_as_float(0xBE2AAAA3u)  // -0.16666655
#define ZF_COS_C0 __uint_as_float(0x37CD012Du)  // 0.000024438452
#define ZF_COS_C1 __uint_as_float(0xBAB60646u)  // -0.0013887368
#define ZF_COS_C2 __uint_as_float(0x3D2AAAA5u)  // 0.041666646

// A normal pair's radius uniform, in (0, 1): the midpoint of cell k = the word's high 20 bits,
// (k + 1/2) 2^-20, exact (mirror of rng::transform::radius_u01).
__device__ __forceinline__ float philox_radius_u01(uint32_t w) {
  return __fmaf_rn((float)(w >> 12), ZF_U20, ZF_U21);
}

// A normal pair's angle uniform, in (0, 1): the midpoint of cell k = the word's low 12 bits.
__device__ __forceinline__ float philox_angle_u01(uint32_t w) {
  return __fmaf_rn((float)(w & 0xfffu), ZF_U12, ZF_U13);
}

// Natural log for x in (0, 1] (mirror of rng::transform::ln).
__device__ __forceinline__ float philox_ln(float x) {
  const uint32_t bits = __float_as_uint(x);
  // The exponent as a float: small integers, so the conversion and the +1 are exact.
  float e = __fsub_rn((float)((bits >> 23) & 0xffu), 127.0f);
  float m = __uint_as_float((bits & 0x007fffffu) | 0x3f800000u);  // [1, 2)
  if (m > ZF_SQRT2) {
    m = __fmul_rn(m, 0.5f);
    e = __fadd_rn(e, 1.0f);
  }
  const float s = __fdiv_rn(__fsub_rn(m, 1.0f), __fadd_rn(m, 1.0f));
  const float s2 = __fmul_rn(s, s);
  float p = ZF_LN_P0;
  p = __fmaf_rn(p, s2, ZF_LN_P1);
  p = __fmaf_rn(p, s2, ZF_LN_P2);
  p = __fmaf_rn(p, s2, 1.0f);
  const float ln_m = __fmul_rn(__fmul_rn(2.0f, s), p);
  return __fmaf_rn(e, ZF_LN2, ln_m);
}

// (sin, cos) of 2 pi u for u in [0, 1) (mirror of rng::transform::sincos_2pi).
__device__ __forceinline__ void philox_sincos_2pi(float u, float* sin_out, float* cos_out) {
  const float q = rintf(__fmul_rn(u, 4.0f));  // round half to even, like round_ties_even
  const float r = __fsub_rn(u, __fmul_rn(q, 0.25f));
  const float x = __fmul_rn(r, ZF_TAU);
  const float x2 = __fmul_rn(x, x);
  float sp = ZF_SIN_S0;
  sp = __fmaf_rn(sp, x2, ZF_SIN_S1);
  sp = __fmaf_rn(sp, x2, ZF_SIN_S2);
  const float sin_r = __fmaf_rn(__fmul_rn(x, x2), sp, x);
  float cp = ZF_COS_C0;
  cp = __fmaf_rn(cp, x2, ZF_COS_C1);
  cp = __fmaf_rn(cp, x2, ZF_COS_C2);
  cp = __fmaf_rn(cp, x2, -0.5f);
  const float cos_r = __fmaf_rn(x2, cp, 1.0f);
  switch ((int)q & 3) {
    case 0: *sin_out = sin_r; *cos_out = cos_r; break;
    case 1: *sin_out = cos_r; *cos_out = -sin_r; break;
    case 2: *sin_out = -sin_r; *cos_out = -cos_r; break;
    default: *sin_out = -cos_r; *cos_out = sin_r; break;
  }
}

// Box-Muller on one word: radius sqrt(-2 ln u1) and (sin, cos) of 2 pi u2.
__device__ __forceinline__ void philox_box_muller(uint32_t w, float* r, float* s, float* c) {
  *r = __fsqrt_rn(__fmul_rn(-2.0f, philox_ln(philox_radius_u01(w))));
  philox_sincos_2pi(philox_angle_u01(w), s, c);
}

// The eight standard normals of block `block`, a pair from each word.
__device__ __forceinline__ void philox_normal8(const PhiloxKey& key, uint64_t block, float z[8]) {
  uint32_t w[4];
  philox_block(key, block, w);
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    float r, s, c;
    philox_box_muller(w[q], &r, &s, &c);
    z[2 * q] = __fmul_rn(r, c);
    z[2 * q + 1] = __fmul_rn(r, s);
  }
}

// Standard normal of element i alone.
__device__ __forceinline__ float philox_normal(const PhiloxKey& key, uint64_t i) {
  uint32_t w[4];
  philox_block(key, i >> 3, w);
  float r, s, c;
  philox_box_muller(w[(i & 7) >> 1], &r, &s, &c);
  return (i & 1) ? __fmul_rn(r, s) : __fmul_rn(r, c);
}

// Walks the Philox blocks of eight normals that cover elements [start, start + n): worker
// `worker` of `workers` takes blocks worker, worker + workers, ... (a grid-stride loop with the
// global thread index, or a block-stride one with threadIdx.x). A block whose eight elements
// all lie in the range goes to whole(i, z) at once (i = its first element - start), so that
// the caller can move the eight with vector accesses; the elements of a block cut by either
// end go to part(e - start, z(e)) one by one.
template <typename W, typename F>
__device__ __forceinline__ void philox_for_each_block(const PhiloxKey& key, uint64_t start,
                                                      uint64_t n, uint64_t worker,
                                                      uint64_t workers, W whole, F part) {
  const uint64_t end = start + n;
  const uint64_t first = start >> 3;
  const uint64_t blocks = ((end + 7) >> 3) - first;
  for (uint64_t g = worker; g < blocks; g += workers) {
    const uint64_t b = first + g;
    float z[8];
    philox_normal8(key, b, z);
    const uint64_t e0 = 8 * b;
    if (e0 >= start && e0 + 8 <= end) {
      whole(e0 - start, z);
      continue;
    }
#pragma unroll
    for (int l = 0; l < 8; ++l) {
      const uint64_t e = e0 + l;
      if (e >= start && e < end) part(e - start, z[l]);
    }
  }
}

// Calls apply(e - start, z(e)) for every element e of [start, start + n), block by block as
// philox_for_each_block deals them.
template <typename F>
__device__ __forceinline__ void philox_for_each_normal(const PhiloxKey& key, uint64_t start,
                                                       uint64_t n, uint64_t worker,
                                                       uint64_t workers, F apply) {
  philox_for_each_block(
      key, start, n, worker, workers,
      [&](uint64_t i, const float* z) {
#pragma unroll
        for (int l = 0; l < 8; ++l) apply(i + l, z[l]);
      },
      apply);
}

// +1 or -1 for element i (the top bit of its word).
__device__ __forceinline__ float philox_rademacher(const PhiloxKey& key, uint64_t i) {
  uint32_t w[4];
  philox_block(key, i >> 2, w);
  return (w[i & 3] >> 31) ? -1.0f : 1.0f;
}

#endif  // __CUDACC__

// Shared device helpers of zoft's kernels: storage types, loads that widen to f32, and
// warp/block reductions. Storage is bf16 or f32; arithmetic is always f32.
#pragma once

#include <cuda_bf16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

#define ZF_NEG_INF __int_as_float(0xff800000)

// Widening loads and narrowing stores, overloaded on the storage type.
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(bf16 v) { return __bfloat162float(v); }

__device__ __forceinline__ void store_f32(float* p, float v) { *p = v; }
// Round to nearest even, as half::bf16::from_f32 does on the host.
__device__ __forceinline__ void store_f32(bf16* p, float v) { *p = __float2bfloat16_rn(v); }

// Four consecutive elements starting at a multiple of 4 (16-byte aligned for f32, 8 for bf16).
__device__ __forceinline__ float4 load4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ float4 load4(const bf16* p) {
  uint2 raw = *reinterpret_cast<const uint2*>(p);
  __nv_bfloat162 a = *reinterpret_cast<__nv_bfloat162*>(&raw.x);
  __nv_bfloat162 b = *reinterpret_cast<__nv_bfloat162*>(&raw.y);
  float2 fa = __bfloat1622float2(a);
  float2 fb = __bfloat1622float2(b);
  return make_float4(fa.x, fa.y, fb.x, fb.y);
}
__device__ __forceinline__ void store4(float* p, float4 v) { *reinterpret_cast<float4*>(p) = v; }

// The global thread index and thread count of a 1-D grid, for grid-stride loops.
__device__ __forceinline__ uint64_t grid_thread() {
  return (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ uint64_t grid_threads() { return (uint64_t)gridDim.x * blockDim.x; }

// Eight consecutive elements (one Philox block's worth) in 16-byte accesses: one for bf16, two
// for f32, so that a warp whose threads each own a block reads and writes whole sectors. Only
// where aligned16(p); element 2q of a bf16 run is the low half of 32-bit word q.
__device__ __forceinline__ bool aligned16(const void* p) { return ((uintptr_t)p & 15u) == 0; }
__device__ __forceinline__ void load8(const float* p, float x[8]) {
  const float4 a = reinterpret_cast<const float4*>(p)[0];
  const float4 b = reinterpret_cast<const float4*>(p)[1];
  x[0] = a.x, x[1] = a.y, x[2] = a.z, x[3] = a.w;
  x[4] = b.x, x[5] = b.y, x[6] = b.z, x[7] = b.w;
}
__device__ __forceinline__ void load8(const bf16* p, float x[8]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    // Widening is exact: the bf16 bits become the f32's upper half.
    x[2 * q] = __uint_as_float(words[q] << 16);
    x[2 * q + 1] = __uint_as_float(words[q] & 0xffff0000u);
  }
}
__device__ __forceinline__ void store8(float* p, const float x[8]) {
  reinterpret_cast<float4*>(p)[0] = make_float4(x[0], x[1], x[2], x[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(x[4], x[5], x[6], x[7]);
}
// Rounded as store_f32 rounds each element.
__device__ __forceinline__ void store8(bf16* p, const float x[8]) {
  uint32_t words[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const uint32_t lo = __bfloat16_as_ushort(__float2bfloat16_rn(x[2 * q]));
    const uint32_t hi = __bfloat16_as_ushort(__float2bfloat16_rn(x[2 * q + 1]));
    words[q] = lo | (hi << 16);
  }
  *reinterpret_cast<uint4*>(p) = make_uint4(words[0], words[1], words[2], words[3]);
}

// p[l] = f(p[l], z[l]) for the eight elements at p, with vector accesses where p allows them.
template <typename T, typename F>
__device__ __forceinline__ void update8(T* p, const float z[8], F f) {
  if (aligned16(p)) {
    float x[8];
    load8(p, x);
#pragma unroll
    for (int l = 0; l < 8; ++l) x[l] = f(x[l], z[l]);
    store8(p, x);
  } else {
#pragma unroll
    for (int l = 0; l < 8; ++l) store_f32(p + l, f(to_f32(p[l]), z[l]));
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block; every thread gets the result. blockDim.x must be a multiple of 32
// (at most 1024). `scratch` holds 32 values; the function syncs before reusing it.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T r = lane < nwarps ? scratch[lane] : T(0);
  return warp_sum(r);
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float r = lane < nwarps ? scratch[lane] : ZF_NEG_INF;
  return warp_max(r);
}

// Runs the kernels of csrc/ on the CPU, for tests on machines without a GPU: every CUDA thread
// of a block is a fiber of one OS thread, blocks run one after another, and __syncthreads and
// the warp shuffles are barriers between the fibers. The float intrinsics keep their meaning
// (each __f*_rn is one correctly rounded IEEE operation, __fmaf_rn one fused multiply-add), so
// kernels built only from them give the GPU's bits. Plain expressions may be contracted into
// fused multiply-adds, here (where the CPU has FMA) as by nvcc, though not at the same places,
// and libm functions (expf, sincosf) round differently from CUDA's: those can differ from the
// device in the last place.
//
// Included first by the one C++ file that src/backend/cuda/emulator/mod.rs makes of csrc/*.cu,
// where it also turns `__shared__` declarations into ZF_SHARED and defines the
// `extern __shared__` arrays. That file is compiled with the memory checker's instrumentation
// (checker.h).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#define __host__
#define __device__
// noinline: a kernel keeps the checker's instrumentation (see checker.h) even where the
// uninstrumented trampoline that calls it could inline it.
#define __global__ __attribute__((noinline))
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __CUDACC__ 1
// `__shared__ T name dims;`, rewritten: a static (the block's fibers share it; blocks run one at
// a time) that tells the memory checker where it is the first time a thread passes it.
extern "C" bool zf_check_shared(const void* p, size_t bytes, const char* name);
#define ZF_SHARED(T, name, dims) \
  static T name dims;            \
  static const bool name##_zf_checked = zf_check_shared(&name, sizeof name, #name)

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

// The running fiber's coordinates, set by the scheduler before it resumes a fiber.
extern uint3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;

using std::max;
using std::min;

inline float __uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float __int_as_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
inline uint32_t __float_as_uint(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// nvcc never fuses an intrinsic into a multiply-add, whatever it does with plain expressions.
// Here the compiler may contract plain expressions too (the emulator builds with contraction
// where the CPU has FMA, as nvcc's default -fmad=true does), so each intrinsic's operands and
// result pass through an empty asm, which the compiler cannot see through: every intrinsic
// stays one rounded operation.
inline float zf_emu_opaque(float v) {
#if defined(__x86_64__)
  asm("" : "+x"(v));
#else
  asm("" : "+r"(v));
#endif
  return v;
}
inline float __fadd_rn(float a, float b) { return zf_emu_opaque(zf_emu_opaque(a) + zf_emu_opaque(b)); }
inline float __fsub_rn(float a, float b) { return zf_emu_opaque(zf_emu_opaque(a) - zf_emu_opaque(b)); }
inline float __fmul_rn(float a, float b) { return zf_emu_opaque(zf_emu_opaque(a) * zf_emu_opaque(b)); }
inline float __fdiv_rn(float a, float b) { return zf_emu_opaque(zf_emu_opaque(a) / zf_emu_opaque(b)); }
inline float __fsqrt_rn(float a) { return zf_emu_opaque(std::sqrt(zf_emu_opaque(a))); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }

// Barriers of the emulated block (every live thread) and of the caller's warp.
void zf_emu_sync_block();
void zf_emu_sync_warp();
unsigned zf_emu_lane();
// Every lane of the caller's warp offers v; returns what src_lane offered. Between two warp
// barriers, as __shfl_sync is a point every lane of the warp reaches together.
uint64_t zf_emu_shfl_raw(uint64_t v, unsigned src_lane);

inline void __syncthreads() { zf_emu_sync_block(); }

template <typename T>
T zf_emu_shfl(T v, unsigned src_lane) {
  static_assert(sizeof(T) <= 8, "shuffled values fit 64 bits");
  uint64_t raw = 0;
  std::memcpy(&raw, &v, sizeof(T));
  raw = zf_emu_shfl_raw(raw, src_lane);
  T r;
  std::memcpy(&r, &raw, sizeof(T));
  return r;
}

template <typename T>
T __shfl_xor_sync(unsigned, T v, int lane_mask) {
  return zf_emu_shfl(v, zf_emu_lane() ^ (unsigned)lane_mask);
}

template <typename T>
T __shfl_sync(unsigned, T v, int src_lane) {
  return zf_emu_shfl(v, (unsigned)src_lane);
}

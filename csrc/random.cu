// Philox-keyed fills and perturbations: every element's value depends only on
// (seed, step, tensor, element index), so any pass can regenerate it in any order.
#include "common.cuh"
#include "philox.cuh"

// One thread per Philox block of eight normals; elements [start, start + n) of the stream are
// written to out[0 .. n). `apply(out_index, z)` consumes the value.
template <typename F>
__device__ __forceinline__ void for_each_normal(uint64_t n, PhiloxKey key, uint64_t start, F apply) {
  philox_for_each_normal(key, start, n, (uint64_t)blockIdx.x * blockDim.x + threadIdx.x,
                         (uint64_t)gridDim.x * blockDim.x, apply);
}

// out[i] = shift + scale * z(start + i), as two rounded ops (no fma); shift == 0 skips the add
// so that scale 1 gives the raw normals bit for bit (including the sign of zero). This is what
// LlamaWeights::random computes on the host: `0.05 * z` and `1.0 + 0.1 * z`.
template <typename T>
__device__ __forceinline__ void fill_normal(T* out, uint64_t n, PhiloxKey key, uint64_t start,
                                            float scale, float shift) {
  for_each_normal(n, key, start, [&](uint64_t i, float z) {
    float v = __fmul_rn(scale, z);
    if (shift != 0.0f) v = __fadd_rn(shift, v);
    store_f32(out + i, v);
  });
}

// w[i] += scale * z(start + i): widen to f32, add the rounded product (no fma), round back
// to the storage type (nearest even for bf16).
template <typename T>
__device__ __forceinline__ void axpy_normal(T* w, uint64_t n, PhiloxKey key, uint64_t start,
                                            float scale) {
  for_each_normal(n, key, start, [&](uint64_t i, float z) {
    store_f32(w + i, __fadd_rn(to_f32(w[i]), __fmul_rn(scale, z)));
  });
}

#define ZF_KEY PhiloxKey{k0, k1, step, tensor}

extern "C" __global__ void fill_normal_f32(float* out, uint64_t n, uint32_t k0, uint32_t k1,
                                           uint32_t step, uint32_t tensor, uint64_t start,
                                           float scale, float shift) {
  fill_normal(out, n, ZF_KEY, start, scale, shift);
}

extern "C" __global__ void fill_normal_bf16(bf16* out, uint64_t n, uint32_t k0, uint32_t k1,
                                            uint32_t step, uint32_t tensor, uint64_t start,
                                            float scale, float shift) {
  fill_normal(out, n, ZF_KEY, start, scale, shift);
}

extern "C" __global__ void axpy_normal_f32(float* w, uint64_t n, uint32_t k0, uint32_t k1,
                                           uint32_t step, uint32_t tensor, uint64_t start,
                                           float scale) {
  axpy_normal(w, n, ZF_KEY, start, scale);
}

extern "C" __global__ void axpy_normal_bf16(bf16* w, uint64_t n, uint32_t k0, uint32_t k1,
                                            uint32_t step, uint32_t tensor, uint64_t start,
                                            float scale) {
  axpy_normal(w, n, ZF_KEY, start, scale);
}

// out[i] = scale * (+1 or -1) for element start + i.
extern "C" __global__ void fill_rademacher_f32(float* out, uint64_t n, uint32_t k0, uint32_t k1,
                                               uint32_t step, uint32_t tensor, uint64_t start,
                                               float scale) {
  const PhiloxKey key = ZF_KEY;
  const uint64_t end = start + n;
  const uint64_t first = start >> 2;
  const uint64_t blocks = ((end + 3) >> 2) - first;
  const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
  for (uint64_t g = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; g < blocks; g += stride) {
    const uint64_t b = first + g;
    uint32_t w[4];
    philox_block(key, b, w);
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const uint64_t e = 4 * b + l;
      if (e >= start && e < end) out[e - start] = (w[l] >> 31) ? -scale : scale;
    }
  }
}

// Raw Philox words of blocks [first, first + n): out[4 * i + l] (for the generator's parity test).
extern "C" __global__ void philox_words(uint32_t* out, uint64_t n, uint32_t k0, uint32_t k1,
                                        uint32_t step, uint32_t tensor, uint64_t first) {
  const PhiloxKey key = ZF_KEY;
  const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
  for (uint64_t g = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; g < n; g += stride) {
    uint32_t w[4];
    philox_block(key, first + g, w);
#pragma unroll
    for (int l = 0; l < 4; ++l) out[4 * g + l] = w[l];
  }
}

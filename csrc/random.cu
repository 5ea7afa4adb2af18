// Philox-keyed fills and perturbations: every element's value depends only on
// (seed, step, tensor, element index), so any pass can regenerate it in any order.
#include "common.cuh"
#include "philox.cuh"

// out[i] = shift + scale * z(start + i), as two rounded ops (no fma); shift == 0 skips the add
// so that scale 1 gives the raw normals bit for bit (including the sign of zero). This is what
// LlamaWeights::random computes on the host: `0.05 * z` and `1.0 + 0.1 * z`. One thread per
// Philox block of eight normals, written with vector stores where out allows.
template <typename T>
__device__ __forceinline__ void fill_normal(T* out, uint64_t n, PhiloxKey key, uint64_t start,
                                            float scale, float shift) {
  const auto value = [&](float z) {
    float v = __fmul_rn(scale, z);
    if (shift != 0.0f) v = __fadd_rn(shift, v);
    return v;
  };
  philox_for_each_block(
      key, start, n, grid_thread(), grid_threads(),
      [&](uint64_t i, const float* z) {
        float v[8];
#pragma unroll
        for (int l = 0; l < 8; ++l) v[l] = value(z[l]);
        if (aligned16(out + i)) {
          store8(out + i, v);
        } else {
#pragma unroll
          for (int l = 0; l < 8; ++l) store_f32(out + i + l, v[l]);
        }
      },
      [&](uint64_t i, float z) { store_f32(out + i, value(z)); });
}

// w[i] += scale * z(start + i): widen to f32, add the rounded product (no fma), round back
// to the storage type (nearest even for bf16).
template <typename T>
__device__ __forceinline__ void axpy_normal(T* w, uint64_t n, PhiloxKey key, uint64_t start,
                                            float scale) {
  const auto moved = [&](float x, float z) { return __fadd_rn(x, __fmul_rn(scale, z)); };
  philox_for_each_block(
      key, start, n, grid_thread(), grid_threads(),
      [&](uint64_t i, const float* z) { update8(w + i, z, moved); },
      [&](uint64_t i, float z) { store_f32(w + i, moved(to_f32(w[i]), z)); });
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
  for (uint64_t g = grid_thread(); g < blocks; g += grid_threads()) {
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
  for (uint64_t g = grid_thread(); g < n; g += grid_threads()) {
    uint32_t w[4];
    philox_block(key, first + g, w);
#pragma unroll
    for (int l = 0; l < 4; ++l) out[4 * g + l] = w[l];
  }
}

// SwiGLU in place: gate <- silu(gate) * up, computed as (g / (1 + exp(-g))) * u like the CPU.
#include "common.cuh"

__device__ __forceinline__ float swiglu1(float g, float u) {
  return __fmul_rn(__fdiv_rn(g, __fadd_rn(1.0f, expf(-g))), u);
}

extern "C" __global__ void swiglu_f32(float* __restrict__ gate, const float* __restrict__ up,
                                      uint64_t n) {
  const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
  const uint64_t n4 = n / 4;
  for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n4; i += stride) {
    float4 g = load4(gate + 4 * i);
    const float4 u = load4(up + 4 * i);
    g.x = swiglu1(g.x, u.x);
    g.y = swiglu1(g.y, u.y);
    g.z = swiglu1(g.z, u.z);
    g.w = swiglu1(g.w, u.w);
    store4(gate + 4 * i, g);
  }
  for (uint64_t i = 4 * n4 + (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
    gate[i] = swiglu1(gate[i], up[i]);
}

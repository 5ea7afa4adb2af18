// RMSNorm, and RMSNorm fused with the residual add. One block per row; f32 activations,
// bf16 or f32 gains. out = (x * s) * w with s = 1 / sqrt(mean(x^2) + eps), as on the CPU.
#include "common.cuh"

template <typename W>
__device__ __forceinline__ void rmsnorm_row(const float* __restrict__ x, const W* __restrict__ w,
                                            float* __restrict__ out, int d, float eps) {
  __shared__ float scratch[32];
  const bool vec = (d & 3) == 0;
  float ss = 0.0f;
  if (vec) {
    for (int c = 4 * threadIdx.x; c < d; c += 4 * blockDim.x) {
      const float4 v = load4(x + c);
      ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
    }
  } else {
    for (int c = threadIdx.x; c < d; c += blockDim.x) ss += x[c] * x[c];
  }
  ss = block_sum(ss, scratch);
  const float s = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(ss, (float)d), eps)));
  if (vec) {
    for (int c = 4 * threadIdx.x; c < d; c += 4 * blockDim.x) {
      const float4 v = load4(x + c);
      const float4 g = load4(w + c);
      store4(out + c, make_float4(__fmul_rn(__fmul_rn(v.x, s), g.x), __fmul_rn(__fmul_rn(v.y, s), g.y),
                                  __fmul_rn(__fmul_rn(v.z, s), g.z), __fmul_rn(__fmul_rn(v.w, s), g.w)));
    }
  } else {
    for (int c = threadIdx.x; c < d; c += blockDim.x)
      out[c] = __fmul_rn(__fmul_rn(x[c], s), to_f32(w[c]));
  }
}

template <typename W>
__device__ __forceinline__ void rmsnorm(const float* x, const W* w, float* out, int d, float eps) {
  const size_t off = (size_t)blockIdx.x * d;
  rmsnorm_row(x + off, w, out + off, d, eps);
}

// residual += delta, then out = rmsnorm(residual) * w. Each thread re-reads only the
// elements it wrote itself, so no barrier is needed between the add and the norm.
template <typename W>
__device__ __forceinline__ void add_rmsnorm(float* residual, const float* delta, const W* w,
                                            float* out, int d, float eps) {
  const size_t off = (size_t)blockIdx.x * d;
  float* r = residual + off;
  const float* dl = delta + off;
  if ((d & 3) == 0) {
    for (int c = 4 * threadIdx.x; c < d; c += 4 * blockDim.x) {
      float4 v = load4(r + c);
      const float4 e = load4(dl + c);
      v.x = __fadd_rn(v.x, e.x);
      v.y = __fadd_rn(v.y, e.y);
      v.z = __fadd_rn(v.z, e.z);
      v.w = __fadd_rn(v.w, e.w);
      store4(r + c, v);
    }
  } else {
    for (int c = threadIdx.x; c < d; c += blockDim.x) r[c] = __fadd_rn(r[c], dl[c]);
  }
  rmsnorm_row(r, w, out + off, d, eps);
}

extern "C" __global__ void rmsnorm_f32w(const float* x, const float* w, float* out, int d, float eps) {
  rmsnorm(x, w, out, d, eps);
}
extern "C" __global__ void rmsnorm_bf16w(const float* x, const bf16* w, float* out, int d, float eps) {
  rmsnorm(x, w, out, d, eps);
}
extern "C" __global__ void add_rmsnorm_f32w(float* residual, const float* delta, const float* w,
                                            float* out, int d, float eps) {
  add_rmsnorm(residual, delta, w, out, d, eps);
}
extern "C" __global__ void add_rmsnorm_bf16w(float* residual, const float* delta, const bf16* w,
                                             float* out, int d, float eps) {
  add_rmsnorm(residual, delta, w, out, d, eps);
}

// RoPE, HF rotate_half convention, in place on [rows, n_heads * head_dim]: pairs (i, i + half)
// of every head rotate by angle pos * inv_freq[i], pos = q_offset + row % q_len.
#include "common.cuh"

extern "C" __global__ void rope_f32(float* __restrict__ x, const float* __restrict__ inv_freq,
                                    int n_heads, int head_dim, int q_len, int q_offset) {
  extern __shared__ float sc[];  // [half] sines then [half] cosines
  const int half = head_dim / 2;
  const int row = blockIdx.x;
  const float pos = (float)(q_offset + row % q_len);
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    float s, c;
    sincosf(__fmul_rn(pos, inv_freq[i]), &s, &c);
    sc[i] = s;
    sc[half + i] = c;
  }
  __syncthreads();
  float* xr = x + (size_t)row * n_heads * head_dim;
  for (int p = threadIdx.x; p < n_heads * half; p += blockDim.x) {
    const int h = p / half, i = p - h * half;
    float* base = xr + h * head_dim;
    const float a = base[i], b = base[i + half];
    const float s = sc[i], c = sc[half + i];
    base[i] = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
    base[i + half] = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
  }
}

// Embedding gather: out[r] = table[ids[r]] widened to f32. Ids are checked on the host.
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void embed(const T* __restrict__ table, const uint32_t* __restrict__ ids,
                                      float* __restrict__ out, int d) {
  const int r = blockIdx.x;
  const T* src = table + (size_t)ids[r] * d;
  float* dst = out + (size_t)r * d;
  for (int c = threadIdx.x; c < d; c += blockDim.x) dst[c] = to_f32(src[c]);
}

extern "C" __global__ void embed_f32(const float* table, const uint32_t* ids, float* out, int d) {
  embed(table, ids, out, d);
}

extern "C" __global__ void embed_bf16(const bf16* table, const uint32_t* ids, float* out, int d) {
  embed(table, ids, out, d);
}

// dtype conversions between f32 and bf16 (round to nearest even), and a row gather.
#include "common.cuh"

extern "C" __global__ void f32_to_bf16(const float* __restrict__ in, bf16* __restrict__ out,
                                       uint64_t n) {
  const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
  for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
    out[i] = __float2bfloat16_rn(in[i]);
}

extern "C" __global__ void bf16_to_f32(const bf16* __restrict__ in, float* __restrict__ out,
                                       uint64_t n) {
  const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
  for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
    out[i] = __bfloat162float(in[i]);
}

// out[r] = in[rows[r]] for r < n, rows of `cols` f32 values, stored as T.
template <typename T>
__device__ __forceinline__ void gather_rows(const float* __restrict__ in, const int* __restrict__ rows,
                                            T* __restrict__ out, int cols) {
  const int r = blockIdx.x;
  const float* src = in + (size_t)rows[r] * cols;
  T* dst = out + (size_t)r * cols;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) store_f32(dst + c, src[c]);
}

extern "C" __global__ void gather_rows_f32(const float* in, const int* rows, float* out, int cols) {
  gather_rows(in, rows, out, cols);
}

extern "C" __global__ void gather_rows_bf16(const float* in, const int* rows, bf16* out, int cols) {
  gather_rows(in, rows, out, cols);
}

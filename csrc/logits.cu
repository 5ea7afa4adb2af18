// The loss end of the LM head: per row of a chunk of logits (computed by a GEMM into a
// [chunk x vocab] scratch), log-sum-exp and the target's log-probability, fused.
#include "common.cuh"

// out[dst[r]] = logits[r, target[r]] - logsumexp(logits[r, :]) for r < chunk rows (one block
// per row). The sum of exponentials is accumulated in f64, as on the CPU.
extern "C" __global__ void target_logprob_f32(const float* __restrict__ logits, int vocab,
                                              const int* __restrict__ target,
                                              const int* __restrict__ dst, float* __restrict__ out) {
  __shared__ float fscratch[32];
  __shared__ double dscratch[32];
  const int r = blockIdx.x;
  const float* row = logits + (size_t)r * vocab;
  float mx = ZF_NEG_INF;
  for (int c = threadIdx.x; c < vocab; c += blockDim.x) mx = fmaxf(mx, row[c]);
  mx = block_max(mx, fscratch);
  double sum = 0.0;
  for (int c = threadIdx.x; c < vocab; c += blockDim.x) sum += (double)expf(row[c] - mx);
  sum = block_sum(sum, dscratch);
  if (threadIdx.x == 0) out[dst[r]] = row[target[r]] - (mx + (float)log(sum));
}

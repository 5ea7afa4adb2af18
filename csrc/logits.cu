// The loss end of the LM head: per row of a chunk of logits (computed by a GEMM into a
// [chunk x vocab] scratch), log-sum-exp and the target's log-probability, fused.
#include "common.cuh"

// The maximum of row[0 .. n) and the sum of exp(row[c] - maximum) in f64, as the CPU's
// max_sum_exp gives them; every thread of the block gets both.
__device__ __forceinline__ void row_max_sum_exp(const float* row, int n, float* mx_out,
                                                double* sum_out) {
  __shared__ float fscratch[32];
  __shared__ double dscratch[32];
  float mx = ZF_NEG_INF;
  for (int c = threadIdx.x; c < n; c += blockDim.x) mx = fmaxf(mx, row[c]);
  mx = block_max(mx, fscratch);
  double sum = 0.0;
  for (int c = threadIdx.x; c < n; c += blockDim.x) sum += (double)expf(row[c] - mx);
  *sum_out = block_sum(sum, dscratch);
  *mx_out = mx;
}

// out[dst[r]] = logits[r, target[r]] - logsumexp(logits[r, :]) for r < chunk rows (one block
// per row). The sum of exponentials is accumulated in f64, as on the CPU.
extern "C" __global__ void target_logprob_f32(const float* __restrict__ logits, int vocab,
                                              const int* __restrict__ target,
                                              const int* __restrict__ dst, float* __restrict__ out) {
  const int r = blockIdx.x;
  const float* row = logits + (size_t)r * vocab;
  float mx;
  double sum;
  row_max_sum_exp(row, vocab, &mx, &sum);
  if (threadIdx.x == 0) out[dst[r]] = row[target[r]] - (mx + (float)log(sum));
}

// Vocabulary blocks (the fused LM head, src/backend/cuda/fused.rs): merges block
// logits[r, 0 .. nv) (vocabulary ids v0 ..) into row r's running maximum, sum of
// exp(logit - maximum) (f64) and target logit, as RunningLogSumExp::add_block does on the CPU.
// One block per row; target[r] < 0 never matches.
extern "C" __global__ void lse_block_f32(const float* __restrict__ logits, int nv, int v0,
                                         const int* __restrict__ target, float* run_max,
                                         double* run_sum, float* run_target) {
  const int r = blockIdx.x;
  const float* row = logits + (size_t)r * nv;
  float mx;
  double sum;
  row_max_sum_exp(row, nv, &mx, &sum);
  if (threadIdx.x == 0) {
    const float m0 = run_max[r];
    if (mx > m0) {
      run_sum[r] = run_sum[r] * exp((double)(m0 - mx)) + sum;
      run_max[r] = mx;
    } else {
      run_sum[r] += sum * exp((double)(mx - m0));
    }
    const int t = target[r] - v0;
    if (t >= 0 && t < nv) run_target[r] = row[t];
  }
}

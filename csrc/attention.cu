// Causal GQA attention with an online softmax (flash-attention style, f32): scores live in
// registers one key tile at a time, so no [T x T] matrix ever reaches global memory.
//
// q [batch * q_len, n_heads * hd], k, v [batch * kv_len, n_kv * hd], out like q. Query row t of
// sequence b sees key rows j <= t + q_offset with j < kv_valid[b]. The same kernel serves full
// sequences (q_len == kv_len, q_offset 0, kv_valid = lengths) and decoding from a KV cache
// (q_len new rows, kv_len = cache capacity, q_offset = cached tokens). Rows past kv_valid are
// never read as data (the tile loader writes zeros instead), so stale cache contents are harmless.
//
// Grid (ceil(q_len / BR), n_heads, batch); block of 4 warps; each warp owns BR / 4 query rows.
// Per key tile of BC = 32 rows: lane j scores key j against the warp's rows, the warp updates
// each row's running max and sum, then accumulates p * V with lane l owning dims l + 32 t.
#include "common.cuh"

#define ATT_BR 16
#define ATT_BC 32
#define ATT_WARPS 4
#define ATT_RPW (ATT_BR / ATT_WARPS)

template <int NT>  // NT = ceil(hd / 32) accumulator slots per lane
__device__ __forceinline__ void attention(const float* __restrict__ q, const float* __restrict__ k,
                                          const float* __restrict__ v, float* __restrict__ out,
                                          const int* __restrict__ kv_valid, int q_len, int kv_len,
                                          int n_heads, int n_kv, int hd, int q_offset, float scale) {
  extern __shared__ float smem[];
  float* Qs = smem;                          // [BR][hd]
  float* Ks = Qs + ATT_BR * hd;              // [BC][hd + 1] (padded: lanes read different rows)
  float* Vs = Ks + ATT_BC * (hd + 1);        // [BC][hd]

  const int b = blockIdx.z, h = blockIdx.y, t0 = blockIdx.x * ATT_BR;
  const int kh = h / (n_heads / n_kv);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int qc = n_heads * hd, kc = n_kv * hd;
  int valid = kv_valid[b];
  valid = valid < 0 ? 0 : (valid > kv_len ? kv_len : valid);

  for (int idx = threadIdx.x; idx < ATT_BR * hd; idx += blockDim.x) {
    const int r = idx / hd, d = idx - r * hd, t = t0 + r;
    Qs[idx] = t < q_len ? q[((size_t)b * q_len + t) * qc + h * hd + d] : 0.0f;
  }

  // Keys any row of this block may see: [0, kend).
  const int last_t = min(t0 + ATT_BR, q_len) - 1;
  const int kend = min(valid, last_t + q_offset + 1);

  float m[ATT_RPW], l[ATT_RPW], acc[ATT_RPW][NT];
  int lim[ATT_RPW];  // exclusive key limit of each of the warp's rows (0 for rows past q_len)
#pragma unroll
  for (int i = 0; i < ATT_RPW; ++i) {
    const int t = t0 + warp * ATT_RPW + i;
    lim[i] = t < q_len ? min(t + q_offset + 1, valid) : 0;
    m[i] = ZF_NEG_INF;
    l[i] = 0.0f;
#pragma unroll
    for (int s = 0; s < NT; ++s) acc[i][s] = 0.0f;
  }

  for (int j0 = 0; j0 < kend; j0 += ATT_BC) {
    __syncthreads();  // the previous tile is consumed (and Qs is written, first time round)
    for (int idx = threadIdx.x; idx < ATT_BC * hd; idx += blockDim.x) {
      const int r = idx / hd, d = idx - r * hd, j = j0 + r;
      float kv = 0.0f, vv = 0.0f;
      if (j < kend) {
        const size_t off = ((size_t)b * kv_len + j) * kc + kh * hd + d;
        kv = k[off];
        vv = v[off];
      }
      Ks[r * (hd + 1) + d] = kv;
      Vs[r * hd + d] = vv;
    }
    __syncthreads();

    // Scores of key j0 + lane against the warp's rows.
    float s[ATT_RPW];
#pragma unroll
    for (int i = 0; i < ATT_RPW; ++i) s[i] = 0.0f;
    const float* krow = Ks + lane * (hd + 1);
    const float* q0 = Qs + warp * ATT_RPW * hd;
    for (int d = 0; d < hd; ++d) {
      const float kd = krow[d];
#pragma unroll
      for (int i = 0; i < ATT_RPW; ++i) s[i] = fmaf(q0[i * hd + d], kd, s[i]);
    }

    const int j = j0 + lane;
    float p[ATT_RPW];
#pragma unroll
    for (int i = 0; i < ATT_RPW; ++i) {
      const float si = j < lim[i] ? s[i] * scale : ZF_NEG_INF;
      const float m_new = fmaxf(m[i], warp_max(si));
      float alpha;
      if (m_new == ZF_NEG_INF) {  // nothing visible to this row yet
        p[i] = 0.0f;
        alpha = 1.0f;
      } else {
        p[i] = expf(si - m_new);      // exp(-inf) = 0 for masked keys
        alpha = expf(m[i] - m_new);   // 0 when m was -inf
      }
      l[i] = l[i] * alpha + warp_sum(p[i]);
      m[i] = m_new;
#pragma unroll
      for (int t = 0; t < NT; ++t) acc[i][t] *= alpha;
    }

    const int nkeys = min(ATT_BC, kend - j0);
    for (int jj = 0; jj < nkeys; ++jj) {
      const float* vrow = Vs + jj * hd;
      float pj[ATT_RPW];
#pragma unroll
      for (int i = 0; i < ATT_RPW; ++i) pj[i] = __shfl_sync(0xffffffffu, p[i], jj);
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        const int d = lane + 32 * t;
        if (d < hd) {
          const float vd = vrow[d];
#pragma unroll
          for (int i = 0; i < ATT_RPW; ++i) acc[i][t] = fmaf(pj[i], vd, acc[i][t]);
        }
      }
    }
  }

#pragma unroll
  for (int i = 0; i < ATT_RPW; ++i) {
    const int t = t0 + warp * ATT_RPW + i;
    if (t >= q_len) continue;
    const float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
    float* o = out + ((size_t)b * q_len + t) * qc + h * hd;
#pragma unroll
    for (int s2 = 0; s2 < NT; ++s2) {
      const int d = lane + 32 * s2;
      if (d < hd) o[d] = acc[i][s2] * inv;
    }
  }
}

#define ZF_ATTENTION(NT)                                                                        \
  extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)                                  \
      attention_f32_nt##NT(const float* q, const float* k, const float* v, float* out,          \
                           const int* kv_valid, int q_len, int kv_len, int n_heads, int n_kv,   \
                           int hd, int q_offset, float scale) {                                 \
    attention<NT>(q, k, v, out, kv_valid, q_len, kv_len, n_heads, n_kv, hd, q_offset, scale);   \
  }

ZF_ATTENTION(1)
ZF_ATTENTION(2)
ZF_ATTENTION(4)
ZF_ATTENTION(8)

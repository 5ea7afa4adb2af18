// Zeroth-order weight passes, the CUDA twins of the CPU passes (src/zo/passes.rs, ZoBackend for
// CpuBackend, over src/zo/direction.rs). A pass finds a tensor at w0 + offset * z and writes
// rule(w0, z) in one read and one write of each element, regenerating z from Philox keys.
//
// The results must equal the CPU's bit for bit: z comes from the same normals, and every float op
// is an explicitly rounded intrinsic nested exactly like the Rust expression it mirrors (Rust never
// contracts a * b + c into an fma; nvcc would, unless told not to by the intrinsics). bf16 weights
// are widened to f32, updated, and rounded back to nearest even, which is what for_each_chunk does
// on the host.
#include "common.cuh"
#include "philox.cuh"

// The rules of passes.rs `Rule`. Adam, which carries moments, has a kernel of its own; its
// code serves the batched passes (ZoPassJob).
#define ZF_RULE_MOVE 0
#define ZF_RULE_SGD 1
#define ZF_RULE_ADAM 2

// Columns of a low-rank block (one thread each), rows per pass over them, and the largest rank
// whose factor tiles fit in 48 KB of shared memory (src/backend/cuda/kernels.rs mirrors these).
#define ZF_LR_COLS 128
#define ZF_LR_ROWS 32
#define ZF_LR_MAX_RANK 64
static_assert(4 * (ZF_LR_COLS * (ZF_LR_MAX_RANK | 1) + (ZF_LR_ROWS + 1) * ZF_LR_MAX_RANK) <=
                  48 * 1024,
              "the low-rank tiles of the largest rank must fit the default shared memory");

// w0 from w = w0 + offset z (mirror of zo::direction::unperturbed): offset 0 leaves w's bits,
// since w - 0 z would turn -0 into +0 where z < 0.
__device__ __forceinline__ float zo_unperturbed(float w, float z, float offset) {
  return offset == 0.0f ? w : __fsub_rn(w, __fmul_rn(offset, z));
}

// The w0 and z a rule sees (TensorZ::pass). Sparse: where |w0| > h the perturbation was never
// applied, so the stored w is w0 and z is 0. A NaN w0 fails that test too, which is why dense
// passes carry a flag rather than h = +inf.
__device__ __forceinline__ void zo_unperturb(float w, float z, float offset, bool sparse, float h,
                                             float* w0, float* zr) {
  const float u = zo_unperturbed(w, z, offset);
  if (!sparse || fabsf(u) <= h) {
    *w0 = u;
    *zr = z;
  } else {
    *w0 = w;
    *zr = 0.0f;
  }
}

// Rule::Move (p0 = to) and Rule::Sgd (p0 = lr, p1 = g, p2 = wd).
__device__ __forceinline__ float zo_rule(int rule, float w0, float z, float p0, float p1,
                                         float p2) {
  if (rule == ZF_RULE_MOVE) return __fadd_rn(w0, __fmul_rn(p0, z));
  // Elements outside a sparse mask (z == 0, either sign) keep w0 exactly, decay included.
  if (z == 0.0f) return w0;
  return __fsub_rn(w0, __fmul_rn(p0, __fadd_rn(__fmul_rn(p1, z), __fmul_rn(p2, w0))));
}

struct ZoAdam {
  float g, lr, wd, beta1, beta2, c1, c2, eps;
};

// Rule::Adam; updates the moments in place.
__device__ __forceinline__ float zo_adam(const ZoAdam& a, float w0, float z, float* m, float* v) {
  const float ge = __fmul_rn(a.g, z);
  const float mn = __fadd_rn(__fmul_rn(a.beta1, *m), __fmul_rn(__fsub_rn(1.0f, a.beta1), ge));
  // (1 - beta2) * ge * ge associates to the left in Rust.
  const float vn =
      __fadd_rn(__fmul_rn(a.beta2, *v), __fmul_rn(__fmul_rn(__fsub_rn(1.0f, a.beta2), ge), ge));
  *m = mn;
  *v = vn;
  const float dir =
      __fdiv_rn(__fdiv_rn(mn, a.c1), __fadd_rn(__fsqrt_rn(__fdiv_rn(vn, a.c2)), a.eps));
  const float step = __fmul_rn(a.lr, __fadd_rn(dir, __fmul_rn(a.wd, w0)));
  // A zero step (lr 0) keeps w0's bits: w0 - step would turn -0 into +0.
  return step == 0.0f ? w0 : __fsub_rn(w0, step);
}

// Dense or sparse z with Move or Sgd: worker `worker` of `workers` takes Philox blocks worker,
// worker + workers, ... of eight normals.
template <typename T>
__device__ __forceinline__ void zo_pass(T* w, uint64_t n, PhiloxKey key, float offset, int sparse,
                                        float h, int rule, float p0, float p1, float p2,
                                        uint64_t worker, uint64_t workers) {
  const auto updated = [&](float x, float z) {
    float w0, zr;
    zo_unperturb(x, z, offset, sparse != 0, h, &w0, &zr);
    return zo_rule(rule, w0, zr, p0, p1, p2);
  };
  philox_for_each_block(
      key, 0, n, worker, workers, [&](uint64_t j, const float* z) { update8(w + j, z, updated); },
      [&](uint64_t j, float z) { store_f32(w + j, updated(to_f32(w[j]), z)); });
}

// The fused perturbation (src/backend/cuda/fused.rs): dst[i] = w0 + to z(start + i) with
// w0 = src[i], rounded to T: the bits that an in-place Move pass from offset 0 leaves at element
// start + i of the tensor, written to a copy instead (a whole tensor, or a block of its rows).
// Where `other` is not null it gets w0 + to_other z(start + i) from the same draw of z: the
// weights of a paired forward's other stream (src/backend/cuda/paired.rs).
// Worker `worker` of `workers` takes Philox blocks worker, worker + workers, ...
template <typename T>
__device__ __forceinline__ void zo_perturbed_copy(const T* src, T* dst, T* other, uint64_t n,
                                                  uint64_t start, PhiloxKey key, int sparse,
                                                  float h, float to, float to_other,
                                                  uint64_t worker, uint64_t workers) {
  const auto moved = [&](float x, float z, float by) {
    float w0, zr;
    zo_unperturb(x, z, 0.0f, sparse != 0, h, &w0, &zr);
    return zo_rule(ZF_RULE_MOVE, w0, zr, by, 0.0f, 0.0f);
  };
  const auto one = [&](uint64_t i, float z) {
    const float x = to_f32(src[i]);
    store_f32(dst + i, moved(x, z, to));
    if (other != nullptr) store_f32(other + i, moved(x, z, to_other));
  };
  const auto eight = [&](uint64_t i, const float* z) {
    if (!aligned16(src + i) || !aligned16(dst + i) ||
        (other != nullptr && !aligned16(other + i))) {
#pragma unroll
      for (int l = 0; l < 8; ++l) one(i + l, z[l]);
      return;
    }
    float x[8], y[8];
    load8(src + i, x);
#pragma unroll
    for (int l = 0; l < 8; ++l) y[l] = moved(x[l], z[l], to);
    store8(dst + i, y);
    if (other != nullptr) {
#pragma unroll
      for (int l = 0; l < 8; ++l) y[l] = moved(x[l], z[l], to_other);
      store8(other + i, y);
    }
  };
  philox_for_each_block(key, start, n, worker, workers, eight, one);
}

// The job of a batch that global Philox block g lies in: the last of `count` jobs (sorted by
// first_block) whose first_block <= g.
template <typename Job>
__device__ __forceinline__ int job_of(const Job* jobs, int count, uint64_t g) {
  int lo = 0, hi = count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (jobs[mid].first_block <= g) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// One tensor of a batched perturbed copy: zo_perturbed_copy of the whole tensor (start 0, no
// second copy), its storage f32 or bf16. Mirrored field for field by kernels.rs CopyJob.
struct ZoCopyJob {
  uint64_t src, dst;     // T*
  uint64_t n;            // elements
  uint64_t first_block;  // the Philox blocks of the jobs before this one
  uint32_t tensor;       // Philox counter word 3
  uint32_t bf16;         // 1: bf16 storage, 0: f32
  uint32_t sparse;
  float threshold;
};
static_assert(sizeof(ZoCopyJob) == 48, "kernels.rs CopyJob mirrors this layout");

// The same for the embedding rows a forward gathers: row r of `rows` (f32, d wide) holds
// table row ids[r] (stored as T) and becomes that row of the perturbed table, rounded to T and
// widened back. One block per row.
template <typename T>
__device__ __forceinline__ void zo_perturb_gathered(float* rows, const uint32_t* ids, int d,
                                                    PhiloxKey key, int sparse, float h, float to) {
  float* row = rows + (size_t)blockIdx.x * d;
  const uint64_t start = (uint64_t)ids[blockIdx.x] * d;
  philox_for_each_normal(key, start, d, threadIdx.x, blockDim.x, [&](uint64_t c, float z) {
    float w0, zr;
    zo_unperturb(row[c], z, 0.0f, sparse != 0, h, &w0, &zr);
    T v;
    store_f32(&v, zo_rule(ZF_RULE_MOVE, w0, zr, to, 0.0f, 0.0f));
    row[c] = to_f32(v);
  });
}

// Dense or sparse z with Adam; m and v are f32 per element. Workers as in zo_pass.
template <typename T>
__device__ __forceinline__ void zo_adam_pass(T* w, float* m, float* v, uint64_t n, PhiloxKey key,
                                             float offset, int sparse, float h, const ZoAdam& a,
                                             uint64_t worker, uint64_t workers) {
  const auto updated = [&](float x, float z, float* mj, float* vj) {
    float w0, zr;
    zo_unperturb(x, z, offset, sparse != 0, h, &w0, &zr);
    return zo_adam(a, w0, zr, mj, vj);
  };
  const auto one = [&](uint64_t j, float z) {
    store_f32(w + j, updated(to_f32(w[j]), z, m + j, v + j));
  };
  const auto eight = [&](uint64_t j, const float* z) {
    if (!aligned16(w + j) || !aligned16(m + j) || !aligned16(v + j)) {
#pragma unroll
      for (int l = 0; l < 8; ++l) one(j + l, z[l]);
      return;
    }
    float x[8], mj[8], vj[8];
    load8(w + j, x);
    load8(m + j, mj);
    load8(v + j, vj);
#pragma unroll
    for (int l = 0; l < 8; ++l) x[l] = updated(x[l], z[l], &mj[l], &vj[l]);
    store8(w + j, x);
    store8(m + j, mj);
    store8(v + j, vj);
  };
  philox_for_each_block(key, 0, n, worker, workers, eight, one);
}

// One tensor's element pass in a batch: zo_pass (rule ZF_RULE_MOVE or ZF_RULE_SGD, p0..p2 as
// there) or, with rule ZF_RULE_ADAM, zo_adam_pass with moments m, v and `adam`. Mirrored field
// for field by kernels.rs PassJob.
struct ZoPassJob {
  uint64_t w;            // T*
  uint64_t m, v;         // float*, Adam only
  uint64_t n;            // elements
  uint64_t first_block;  // the Philox blocks of the jobs before this one
  uint32_t tensor;       // Philox counter word 3
  uint32_t bf16;         // 1: bf16 storage, 0: f32
  uint32_t sparse;
  uint32_t rule;
  float threshold, offset;
  float p0, p1, p2;
  ZoAdam adam;
  float pad[3];
};
static_assert(sizeof(ZoPassJob) == 120, "kernels.rs PassJob mirrors this layout");

// Low-rank z with Move: w <- (src - offset z) + to z for the [rows x cols] matrices w and src
// (the same matrix for a pass in place, a tensor and its copy for the fused forward), where
// z(a, b) = sum_k V[b, k] uc[a, k] (k ascending from +0, as Factors::row adds) and
// uc[a, k] = (U[a, k] coef[k]) norm. U [rows x r] and V [cols x r] are the normals of keys ku, kv
// at element a r + k and b r + k; they are regenerated here rather than stored.
//
// Block (x, y) of an x by gy grid owns columns [128 x, 128 x + 128), one per thread, and fills
// their V rows (a contiguous range of the V stream) into shared memory once; it then walks row
// tiles y, y + gy, ... of 32 rows, filling each tile's uc rows (again a contiguous range of U)
// and updating the 32 x 128 elements with coalesced row-wise accesses.
//
// Shared memory: V with an odd row stride (r | 1) so that the 32 threads of a warp, reading
// V[b, k] for 32 consecutive b, hit 32 different banks; uc with stride r (every thread reads the
// same uc[a, k], a broadcast); coef. That is 4 (128 (r | 1) + 32 r + r) bytes.
template <typename T>
__device__ __forceinline__ void zo_low_rank_move(T* w, const T* src, const float* coef, int rows,
                                                 int cols,
                                                 int r, PhiloxKey ku, PhiloxKey kv, float norm,
                                                 float offset, float to, int x, int y, int gy) {
  extern __shared__ float zo_smem[];
  const int rv = r | 1;
  float* vs = zo_smem;                  // [ZF_LR_COLS][rv]
  float* us = vs + ZF_LR_COLS * rv;     // [ZF_LR_ROWS][r]
  float* cs = us + ZF_LR_ROWS * r;      // [r]
  const int b0 = x * ZF_LR_COLS;
  const int nb = min(ZF_LR_COLS, cols - b0);
  const int b = threadIdx.x;

  for (int k = threadIdx.x; k < r; k += blockDim.x) cs[k] = coef[k];
  philox_for_each_normal(kv, (uint64_t)b0 * r, (uint64_t)nb * r, threadIdx.x, blockDim.x,
                         [&](uint64_t i, float x) {
                           const unsigned li = (unsigned)i;
                           vs[(li / r) * rv + li % r] = x;
                         });

  for (int a0 = y * ZF_LR_ROWS; a0 < rows; a0 += gy * ZF_LR_ROWS) {
    const int na = min(ZF_LR_ROWS, rows - a0);
    __syncthreads();  // coef and V are in place; the previous tile's uc has been read
    philox_for_each_normal(ku, (uint64_t)a0 * r, (uint64_t)na * r, threadIdx.x, blockDim.x,
                           [&](uint64_t i, float x) {
                             const unsigned li = (unsigned)i;
                             us[li] = __fmul_rn(__fmul_rn(x, cs[li % r]), norm);
                           });
    // Rows past the matrix are computed (the row loop below is unrolled) but never stored.
    for (int i = na * r + threadIdx.x; i < ZF_LR_ROWS * r; i += blockDim.x) us[i] = 0.0f;
    __syncthreads();
    if (b < nb) {
      // k outside, rows inside: each V[b, k] is loaded once, and every row's sum still runs over
      // k in ascending order.
      float acc[ZF_LR_ROWS];
#pragma unroll
      for (int a = 0; a < ZF_LR_ROWS; ++a) acc[a] = 0.0f;
      for (int k = 0; k < r; ++k) {
        const float vk = vs[b * rv + k];
#pragma unroll
        for (int a = 0; a < ZF_LR_ROWS; ++a) acc[a] = __fadd_rn(acc[a], __fmul_rn(vk, us[a * r + k]));
      }
#pragma unroll
      for (int a = 0; a < ZF_LR_ROWS; ++a) {
        if (a < na) {
          const size_t e = (size_t)(a0 + a) * cols + b0 + b;
          const float z = acc[a];
          const float w0 = zo_unperturbed(to_f32(src[e]), z, offset);
          store_f32(w + e, __fadd_rn(w0, __fmul_rn(to, z)));
        }
      }
    }
  }
}

// w <- w - factor w (`*x -= factor * *x`), grid-stride.
template <typename T>
__device__ __forceinline__ void zo_decay(T* w, uint64_t n, float factor) {
  for (uint64_t i = grid_thread(); i < n; i += grid_threads()) {
    const float x = to_f32(w[i]);
    store_f32(w + i, __fsub_rn(x, __fmul_rn(factor, x)));
  }
}

extern "C" __global__ void zo_pass_f32(float* w, uint64_t n, uint32_t k0, uint32_t k1,
                                       uint32_t step, uint32_t tensor, float offset, int sparse,
                                       float threshold, int rule, float p0, float p1, float p2) {
  zo_pass(w, n, PhiloxKey{k0, k1, step, tensor}, offset, sparse, threshold, rule, p0, p1, p2,
          grid_thread(), grid_threads());
}

extern "C" __global__ void zo_pass_bf16(bf16* w, uint64_t n, uint32_t k0, uint32_t k1,
                                        uint32_t step, uint32_t tensor, float offset, int sparse,
                                        float threshold, int rule, float p0, float p1, float p2) {
  zo_pass(w, n, PhiloxKey{k0, k1, step, tensor}, offset, sparse, threshold, rule, p0, p1, p2,
          grid_thread(), grid_threads());
}

// The element passes of several tensors in one launch (a whole model's update, or its move in
// place, src/backend/cuda/zo.rs): thread g of the grid-stride loop takes global Philox block g.
extern "C" __global__ void zo_pass_jobs(const ZoPassJob* jobs, int count, uint64_t blocks,
                                        uint32_t k0, uint32_t k1, uint32_t step) {
  for (uint64_t g = grid_thread(); g < blocks; g += grid_threads()) {
    const ZoPassJob& j = jobs[job_of(jobs, count, g)];
    const PhiloxKey key{k0, k1, step, j.tensor};
    // Block b of the job alone: worker b of as many workers as the job has blocks.
    const uint64_t b = g - j.first_block, job_blocks = (j.n + 7) >> 3;
    float* m = (float*)j.m;
    float* v = (float*)j.v;
    if (j.rule == ZF_RULE_ADAM) {
      if (j.bf16) {
        zo_adam_pass((bf16*)j.w, m, v, j.n, key, j.offset, j.sparse, j.threshold, j.adam, b,
                     job_blocks);
      } else {
        zo_adam_pass((float*)j.w, m, v, j.n, key, j.offset, j.sparse, j.threshold, j.adam, b,
                     job_blocks);
      }
    } else if (j.bf16) {
      zo_pass((bf16*)j.w, j.n, key, j.offset, j.sparse, j.threshold, j.rule, j.p0, j.p1, j.p2, b,
              job_blocks);
    } else {
      zo_pass((float*)j.w, j.n, key, j.offset, j.sparse, j.threshold, j.rule, j.p0, j.p1, j.p2,
              b, job_blocks);
    }
  }
}

extern "C" __global__ void zo_perturbed_copy_f32(const float* src, float* dst, float* other,
                                               uint64_t n, uint64_t start, uint32_t k0,
                                               uint32_t k1, uint32_t step, uint32_t tensor,
                                               int sparse, float threshold, float to,
                                               float to_other) {
  zo_perturbed_copy(src, dst, other, n, start, PhiloxKey{k0, k1, step, tensor}, sparse, threshold,
                    to, to_other, grid_thread(), grid_threads());
}

extern "C" __global__ void zo_perturbed_copy_bf16(const bf16* src, bf16* dst, bf16* other,
                                                uint64_t n, uint64_t start, uint32_t k0,
                                                uint32_t k1, uint32_t step, uint32_t tensor,
                                                int sparse, float threshold, float to,
                                                float to_other) {
  zo_perturbed_copy(src, dst, other, n, start, PhiloxKey{k0, k1, step, tensor}, sparse, threshold,
                    to, to_other, grid_thread(), grid_threads());
}

// The perturbed copies of several tensors in one launch (a layer's element-wise parameters,
// src/backend/cuda/fused.rs): thread g of the grid-stride loop takes global Philox block g.
extern "C" __global__ void zo_perturbed_copy_jobs(const ZoCopyJob* jobs, int count,
                                                 uint64_t blocks, uint32_t k0, uint32_t k1,
                                                 uint32_t step, float to) {
  for (uint64_t g = grid_thread(); g < blocks; g += grid_threads()) {
    const ZoCopyJob& j = jobs[job_of(jobs, count, g)];
    const PhiloxKey key{k0, k1, step, j.tensor};
    // Block b of the job alone: worker b of as many workers as the job has blocks.
    const uint64_t b = g - j.first_block, job_blocks = (j.n + 7) >> 3;
    if (j.bf16) {
      zo_perturbed_copy((const bf16*)j.src, (bf16*)j.dst, (bf16*)nullptr, j.n, 0, key, j.sparse,
                        j.threshold, to, 0.0f, b, job_blocks);
    } else {
      zo_perturbed_copy((const float*)j.src, (float*)j.dst, (float*)nullptr, j.n, 0, key,
                        j.sparse, j.threshold, to, 0.0f, b, job_blocks);
    }
  }
}

// One factor of a low-rank side product in a batch (src/backend/cuda/fused.rs): the normals of
// Philox step word `step` and tensor word `tensor` at elements [0, n) of a row-major f32 matrix
// `cols` wide, each scaled as (z coef[its column]) norm where coef is given (U diag(c) / sqrt(r),
// the bits scale_cols_f32 leaves in fill_normal's U) and left as drawn where it is not (V).
// Mirrored field for field by kernels.rs FactorJob.
struct ZoFactorJob {
  uint64_t dst;          // float*
  uint64_t coef;         // const float*, cols of them, or 0
  uint64_t n;            // elements
  uint64_t first_block;  // the Philox blocks of the jobs before this one
  uint32_t step;         // Philox counter word 2 (FACTOR_U or FACTOR_V)
  uint32_t tensor;       // Philox counter word 3
  uint32_t cols;
  float norm;
};
static_assert(sizeof(ZoFactorJob) == 48, "kernels.rs FactorJob mirrors this layout");

// The factors of several matrices in one launch (a layer's low-rank side products): thread g of
// the grid-stride loop takes global Philox block g. Each job carries its own step word, so U
// and V of a layer share a launch; the key's seed comes from k0, k1.
extern "C" __global__ void zo_factor_jobs(const ZoFactorJob* jobs, int count, uint64_t blocks,
                                          uint32_t k0, uint32_t k1) {
  for (uint64_t g = grid_thread(); g < blocks; g += grid_threads()) {
    const ZoFactorJob& j = jobs[job_of(jobs, count, g)];
    const PhiloxKey key{k0, k1, j.step, j.tensor};
    const uint64_t b = g - j.first_block, job_blocks = (j.n + 7) >> 3;
    float* dst = (float*)j.dst;
    const float* coef = (const float*)j.coef;
    const auto value = [&](uint64_t i, float z) {
      return coef ? __fmul_rn(__fmul_rn(z, coef[i % j.cols]), j.norm) : z;
    };
    const auto eight = [&](uint64_t i, const float* z) {
      float v[8];
#pragma unroll
      for (int l = 0; l < 8; ++l) v[l] = value(i + l, z[l]);
      if (aligned16(dst + i)) {
        store8(dst + i, v);
      } else {
#pragma unroll
        for (int l = 0; l < 8; ++l) dst[i + l] = v[l];
      }
    };
    const auto one = [&](uint64_t i, float z) { dst[i] = value(i, z); };
    philox_for_each_block(key, 0, j.n, b, job_blocks, eight, one);
  }
}

extern "C" __global__ void zo_perturb_gathered_f32(float* rows, const uint32_t* ids, int d,
                                                 uint32_t k0, uint32_t k1, uint32_t step,
                                                 uint32_t tensor, int sparse, float threshold,
                                                 float to) {
  zo_perturb_gathered<float>(rows, ids, d, PhiloxKey{k0, k1, step, tensor}, sparse, threshold,
                             to);
}

extern "C" __global__ void zo_perturb_gathered_bf16(float* rows, const uint32_t* ids, int d,
                                                  uint32_t k0, uint32_t k1, uint32_t step,
                                                  uint32_t tensor, int sparse, float threshold,
                                                  float to) {
  zo_perturb_gathered<bf16>(rows, ids, d, PhiloxKey{k0, k1, step, tensor}, sparse, threshold, to);
}

// x[i] = (x[i] coef[i % cols]) norm over a row-major [rows x cols] f32 matrix: the scaled U of a
// low-rank side product, multiplied in the order of the low-rank kernel's uc.
extern "C" __global__ void scale_cols_f32(float* x, uint64_t n, int cols, const float* coef,
                                          float norm) {
  for (uint64_t i = grid_thread(); i < n; i += grid_threads()) {
    x[i] = __fmul_rn(__fmul_rn(x[i], coef[i % (uint64_t)cols]), norm);
  }
}

extern "C" __global__ void zo_adam_pass_f32(float* w, float* m, float* v, uint64_t n, uint32_t k0,
                                            uint32_t k1, uint32_t step, uint32_t tensor,
                                            float offset, int sparse, float threshold, float g,
                                            float lr, float wd, float beta1, float beta2,
                                            float c1, float c2, float eps) {
  zo_adam_pass(w, m, v, n, PhiloxKey{k0, k1, step, tensor}, offset, sparse, threshold,
               ZoAdam{g, lr, wd, beta1, beta2, c1, c2, eps}, grid_thread(), grid_threads());
}

extern "C" __global__ void zo_adam_pass_bf16(bf16* w, float* m, float* v, uint64_t n, uint32_t k0,
                                             uint32_t k1, uint32_t step, uint32_t tensor,
                                             float offset, int sparse, float threshold, float g,
                                             float lr, float wd, float beta1, float beta2,
                                             float c1, float c2, float eps) {
  zo_adam_pass(w, m, v, n, PhiloxKey{k0, k1, step, tensor}, offset, sparse, threshold,
               ZoAdam{g, lr, wd, beta1, beta2, c1, c2, eps}, grid_thread(), grid_threads());
}

// U and V keep the step words FACTOR_U and FACTOR_V of src/zo/direction.rs (passed in, so that
// the Rust constants stay the only definition). src is w for a pass in place.
extern "C" __global__ void __launch_bounds__(ZF_LR_COLS)
    zo_low_rank_move_f32(float* w, const float* src, const float* coef, int rows, int cols,
                         int rank, uint32_t k0, uint32_t k1, uint32_t step_u, uint32_t step_v,
                         uint32_t tensor, float norm, float offset, float to) {
  zo_low_rank_move(w, src, coef, rows, cols, rank, PhiloxKey{k0, k1, step_u, tensor},
                   PhiloxKey{k0, k1, step_v, tensor}, norm, offset, to, blockIdx.x, blockIdx.y,
                   gridDim.y);
}

extern "C" __global__ void __launch_bounds__(ZF_LR_COLS)
    zo_low_rank_move_bf16(bf16* w, const bf16* src, const float* coef, int rows, int cols,
                          int rank, uint32_t k0, uint32_t k1, uint32_t step_u, uint32_t step_v,
                          uint32_t tensor, float norm, float offset, float to) {
  zo_low_rank_move(w, src, coef, rows, cols, rank, PhiloxKey{k0, k1, step_u, tensor},
                   PhiloxKey{k0, k1, step_v, tensor}, norm, offset, to, blockIdx.x, blockIdx.y,
                   gridDim.y);
}

// One matrix of a batch of low-rank moves: zo_low_rank_move over its own x by gy grid of
// blocks, which lie in the launch's one-dimensional grid from block first_block on. Mirrored
// field for field by kernels.rs LowRankJob.
struct ZoLowRankJob {
  uint64_t w;            // T*
  uint64_t src;          // const T*: w itself in place, else the tensor w copies
  uint64_t coef;         // const float*, rank of them
  uint64_t first_block;  // the thread blocks of the jobs before this one
  int32_t rows, cols, rank;
  uint32_t tensor;       // Philox counter word 3 of U and V
  uint32_t bf16;         // 1: bf16 storage, 0: f32
  uint32_t grid_x, grid_y;
  float norm, offset, to;
};
static_assert(sizeof(ZoLowRankJob) == 72, "kernels.rs LowRankJob mirrors this layout");

// The low-rank moves of several matrices in one launch (the matrices of a ZO pass over all the
// weights, or the perturbed copies of a layer's matrices for the fused forward): thread block g
// runs block g - first_block of its job's grid. The dynamic shared memory fits the largest rank
// of the batch.
extern "C" __global__ void __launch_bounds__(ZF_LR_COLS)
    zo_low_rank_move_jobs(const ZoLowRankJob* jobs, int count, uint32_t k0, uint32_t k1,
                          uint32_t step_u, uint32_t step_v) {
  const ZoLowRankJob& j = jobs[job_of(jobs, count, blockIdx.x)];
  const uint32_t b = blockIdx.x - (uint32_t)j.first_block;
  const int x = b % j.grid_x, y = b / j.grid_x;
  const PhiloxKey ku{k0, k1, step_u, j.tensor}, kv{k0, k1, step_v, j.tensor};
  const float* coef = (const float*)j.coef;
  if (j.bf16) {
    zo_low_rank_move((bf16*)j.w, (const bf16*)j.src, coef, j.rows, j.cols, j.rank, ku, kv,
                     j.norm, j.offset, j.to, x, y, j.grid_y);
  } else {
    zo_low_rank_move((float*)j.w, (const float*)j.src, coef, j.rows, j.cols, j.rank, ku, kv,
                     j.norm, j.offset, j.to, x, y, j.grid_y);
  }
}

extern "C" __global__ void zo_decay_f32(float* w, uint64_t n, float factor) {
  zo_decay(w, n, factor);
}

extern "C" __global__ void zo_decay_bf16(bf16* w, uint64_t n, float factor) {
  zo_decay(w, n, factor);
}

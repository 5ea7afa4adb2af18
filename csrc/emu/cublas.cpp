// The part of cuBLAS that zoft uses (one GEMM entry point), on the CPU, for the emulated CUDA
// device of driver.cpp: column-major C = alpha op(A) op(B) + beta C with f32 or bf16 operands
// and f32 accumulation. beta = 0 never reads C, as in cuBLAS. Built with the soname
// libcublas.so.
#include <cstdint>
#include <vector>

#include "cuda_emu.h"
#include "cuda_bf16.h"

// The product, registered by the loader (zoft registers its CPU GEMM): out = a b^T for
// row-major a [m x k] and b [n x k], out column-major [m x n].
typedef void (*HostGemm)(int m, int n, int k, const float* a, const float* b, float* out);

namespace {

HostGemm g_host_gemm = nullptr;

constexpr int OK = 0, INVALID_VALUE = 7, NOT_SUPPORTED = 15;
constexpr int R_32F = 0, R_16BF = 14;
int g_handle;

float load(const void* p, int type, size_t i) {
  return type == R_32F ? ((const float*)p)[i] : __bfloat162float(((const __nv_bfloat16*)p)[i]);
}

void store(void* p, int type, size_t i, float v) {
  if (type == R_32F) {
    ((float*)p)[i] = v;
  } else {
    ((__nv_bfloat16*)p)[i] = __float2bfloat16_rn(v);
  }
}

}  // namespace

extern "C" {

void zf_emu_set_host_gemm(HostGemm f) { g_host_gemm = f; }

int cublasCreate_v2(void** handle) { *handle = &g_handle; return OK; }
int cublasDestroy_v2(void*) { return OK; }
int cublasSetStream_v2(void*, void*) { return OK; }
int cublasSetWorkspace_v2(void*, void*, size_t) { return OK; }
int cublasSetMathMode(void*, int) { return OK; }

int cublasGemmEx(void*, int transa, int transb, int m, int n, int k, const void* alpha,
                 const void* A, int atype, int lda, const void* B, int btype, int ldb,
                 const void* beta, void* C, int ctype, int ldc, int compute, int) {
  for (int t : {atype, btype, ctype})
    if (t != R_32F && t != R_16BF) return NOT_SUPPORTED;
  if (m < 0 || n < 0 || k < 0 || lda < 1 || ldb < 1 || ldc < 1) return INVALID_VALUE;
  if (!g_host_gemm) return NOT_SUPPORTED;
  (void)compute;
  const float a = *(const float*)alpha, b = *(const float*)beta;
  // Each operand widened to f32 once, in the row-major layouts the host GEMM takes.
  std::vector<float> at((size_t)m * k), bt((size_t)n * k);
  for (int i = 0; i < m; ++i)
    for (int l = 0; l < k; ++l)
      at[(size_t)i * k + l] = load(A, atype, transa ? l + (size_t)i * lda : i + (size_t)l * lda);
  for (int j = 0; j < n; ++j)
    for (int l = 0; l < k; ++l)
      bt[(size_t)j * k + l] = load(B, btype, transb ? j + (size_t)l * ldb : l + (size_t)j * ldb);
  // k = 0 leaves the product zero.
  std::vector<float> prod((size_t)m * n, 0.0f);
  if (k > 0) g_host_gemm(m, n, k, at.data(), bt.data(), prod.data());
  for (int j = 0; j < n; ++j)
    for (int i = 0; i < m; ++i) {
      const size_t c = i + (size_t)j * ldc;
      const float prior = b == 0.0f ? 0.0f : b * load(C, ctype, c);
      store(C, ctype, c, a * prod[i + (size_t)j * m] + prior);
    }
  return OK;
}

}  // extern "C"

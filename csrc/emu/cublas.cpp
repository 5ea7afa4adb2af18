// The part of cuBLAS that zoft uses (one GEMM entry point), on the CPU, for the emulated CUDA
// device of driver.cpp: column-major C = alpha op(A) op(B) + beta C with f32 or bf16 operands
// and f32 accumulation. beta = 0 never reads C, as in cuBLAS. Leading dimensions below what
// cuBLAS accepts are refused as there, and every operand must lie inside one device allocation
// (the memory checker of the emulated driver says; cuBLAS on a GPU would read or write past it).
// Built with the soname libcublas.so.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "cuda_emu.h"
#include "cuda_bf16.h"

// The product, registered by the loader (zoft registers its CPU GEMM): out = a b^T for
// row-major a [m x k] and b [n x k], out column-major [m x n].
typedef void (*HostGemm)(int m, int n, int k, const float* a, const float* b, float* out);

// Whether [p, p + bytes) lies inside one device allocation; if not, why (registered by the
// loader: the emulated driver's checker).
typedef int (*RangeCheck)(uintptr_t p, size_t bytes, char* why, size_t why_len);

namespace {

HostGemm g_host_gemm = nullptr;
RangeCheck g_range_check = nullptr;

constexpr int OK = 0, INVALID_VALUE = 7, EXECUTION_FAILED = 13, NOT_SUPPORTED = 15;
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

// Bytes from the first element to one past the last of a column-major rows x cols operand.
size_t span(int rows, int cols, int ld, int type) {
  if (rows == 0 || cols == 0) return 0;
  return ((size_t)(cols - 1) * ld + rows) * (type == R_32F ? 4 : 2);
}

bool inside(const char* what, const void* p, size_t bytes) {
  char why[512];
  if (bytes == 0 || !g_range_check || g_range_check((uintptr_t)p, bytes, why, sizeof why))
    return true;
  std::fprintf(stderr, "zoft kernel emulator: cublasGemmEx: %s spans %zu bytes from %p, %s\n", what,
               bytes, p, why);
  return false;
}

}  // namespace

extern "C" {

void zf_emu_set_host_gemm(HostGemm f) { g_host_gemm = f; }
void zf_emu_set_range_check(RangeCheck f) { g_range_check = f; }

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
  // op(A) is m x k, stored k x m when transposed; op(B) k x n, stored n x k when transposed.
  const int a_rows = transa ? k : m, a_cols = transa ? m : k;
  const int b_rows = transb ? n : k, b_cols = transb ? k : n;
  if (m < 0 || n < 0 || k < 0) return INVALID_VALUE;
  if (lda < std::max(1, a_rows) || ldb < std::max(1, b_rows) || ldc < std::max(1, m))
    return INVALID_VALUE;
  if (!g_host_gemm) return NOT_SUPPORTED;
  if (!inside("A", A, span(a_rows, a_cols, lda, atype)) ||
      !inside("B", B, span(b_rows, b_cols, ldb, btype)) ||
      !inside("C", C, span(m, n, ldc, ctype)))
    return EXECUTION_FAILED;
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

// The part of cuBLAS that zoft uses (one GEMM entry point), on the CPU, for the emulated CUDA
// device of driver.cpp: column-major C = alpha op(A) op(B) + beta C with f32 or bf16 operands
// and f32 accumulation. beta = 0 never reads C, as in cuBLAS. Built with the soname
// libcublas.so.
#include <cstdint>
#include <cstring>
#include <vector>

// The product, when the loader registers one (zoft registers its CPU GEMM): out = a b^T for
// row-major a [m x k] and b [n x k], out column-major [m x n].
typedef void (*HostGemm)(int m, int n, int k, const float* a, const float* b, float* out);

namespace {

HostGemm g_host_gemm = nullptr;

constexpr int OK = 0, INVALID_VALUE = 7, NOT_SUPPORTED = 15;
constexpr int R_32F = 0, R_16BF = 14;
int g_handle;

float load(const void* p, int type, size_t i) {
  if (type == R_32F) return ((const float*)p)[i];
  const uint32_t u = (uint32_t)((const uint16_t*)p)[i] << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

void store(void* p, int type, size_t i, float v) {
  if (type == R_32F) {
    ((float*)p)[i] = v;
    return;
  }
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    ((uint16_t*)p)[i] = (uint16_t)((u >> 16) | 0x40u);
    return;
  }
  ((uint16_t*)p)[i] = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
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
  (void)compute;
  const float a = *(const float*)alpha, b = *(const float*)beta;
  // Each operand widened once, laid out so that the inner loop runs over k contiguously.
  std::vector<float> at((size_t)m * k), bt((size_t)n * k);
  for (int i = 0; i < m; ++i)
    for (int l = 0; l < k; ++l)
      at[(size_t)i * k + l] = load(A, atype, transa ? l + (size_t)i * lda : i + (size_t)l * lda);
  for (int j = 0; j < n; ++j)
    for (int l = 0; l < k; ++l)
      bt[(size_t)j * k + l] = load(B, btype, transb ? j + (size_t)l * ldb : l + (size_t)j * ldb);
  std::vector<float> prod((size_t)m * n, 0.0f);
  if (k > 0 && g_host_gemm) {
    g_host_gemm(m, n, k, at.data(), bt.data(), prod.data());
  } else {
    for (int j = 0; j < n; ++j)
      for (int i = 0; i < m; ++i) {
        const float* x = &at[(size_t)i * k];
        const float* y = &bt[(size_t)j * k];
        float acc = 0.0f;
        for (int l = 0; l < k; ++l) acc += x[l] * y[l];
        prod[i + (size_t)j * m] = acc;
      }
  }
  for (int j = 0; j < n; ++j)
    for (int i = 0; i < m; ++i) {
      const size_t c = i + (size_t)j * ldc;
      const float prior = b == 0.0f ? 0.0f : b * load(C, ctype, c);
      store(C, ctype, c, a * prod[i + (size_t)j * m] + prior);
    }
  return OK;
}

}  // extern "C"

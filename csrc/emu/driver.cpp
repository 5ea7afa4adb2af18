// The part of the CUDA driver API that zoft uses, served on the CPU, so that the unchanged CUDA
// backend (through cudarc, which loads libcuda.so at run time) can run its tests on a machine
// without a GPU. "Device" memory is host memory, streams and events are synchronous, the module
// holds the emulated kernels (see cuda_emu.h) and a launch runs them to completion, under the
// memory checker (checker.h): an access out of bounds fails the launch as
// CUDA_ERROR_ILLEGAL_ADDRESS, a misaligned one as CUDA_ERROR_MISALIGNED_ADDRESS, a race or a
// read of unwritten shared memory as CUDA_ERROR_LAUNCH_FAILED, and cuGetErrorString gives the
// checker's report. Launches past a GPU's limits are refused as there. Fresh allocations are filled with 0xff bytes (NaN as f32 and bf16), as
// fresh GPU memory holds garbage, so a read of memory nothing wrote shows. Built with the soname
// libcuda.so and loaded before cudarc looks for the driver (src/backend/cuda/emulator).
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>

#include "checker.h"

extern "C" int zf_emu_launch(const char* kernel, void (*trampoline)(void**), void** params,
                             unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                             unsigned bz, size_t dynamic_smem);
extern "C" void (*zf_emu_kernel(const char* name))(void**);

namespace {

typedef int CUresult;
constexpr CUresult OK = 0, INVALID_VALUE = 1, OUT_OF_MEMORY = 2, NOT_FOUND = 500,
                   ILLEGAL_ADDRESS = 700, MISALIGNED_ADDRESS = 716, LAUNCH_FAILED = 719;

// What the emulated device reports: large enough for every test, small enough that a request
// far past it fails as an out-of-memory error would.
constexpr size_t kTotalBytes = size_t(16) << 30;
// Shared memory per block: 48 KB unless the kernel opts in to more (cuFuncSetAttribute), up to
// an H100's 227 KB, as on the GPU. The emulator's dynamic shared arrays hold 256 KB.
constexpr size_t kDefaultSmemBytes = 48 * 1024;
constexpr size_t kOptInSmemBytes = 227 * 1024;
constexpr int kAttrMaxDynamicSmem = 8;  // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES

std::mutex g_mu;
size_t g_held = 0;  // the allocations themselves are the checker's record (zf_check_track)
int g_dummy_ctx, g_dummy_module;

// What cuModuleGetFunction hands out.
struct Function {
  std::string name;
  void (*trampoline)(void**);
  size_t max_dynamic_smem = kDefaultSmemBytes;
};
std::map<std::string, Function> g_functions;

CUresult alloc(unsigned long long* p, size_t bytes) {
  std::lock_guard<std::mutex> lock(g_mu);
  if (bytes > kTotalBytes - g_held) return OUT_OF_MEMORY;
  void* m = std::aligned_alloc(256, (bytes + 255) / 256 * 256 + 256);
  if (!m) return OUT_OF_MEMORY;
  std::memset(m, 0xff, bytes);
  *p = (unsigned long long)m;
  zf_check_track(*p, bytes);
  g_held += bytes;
  return OK;
}

CUresult release(unsigned long long p) {
  std::lock_guard<std::mutex> lock(g_mu);
  size_t bytes;
  if (!zf_check_untrack(p, &bytes)) return INVALID_VALUE;
  g_held -= bytes;
  std::free((void*)p);
  return OK;
}

double now_ms() {
  using namespace std::chrono;
  return duration<double, std::milli>(steady_clock::now().time_since_epoch()).count();
}

}  // namespace

extern "C" {

CUresult cuInit(unsigned) { return OK; }
CUresult cuDriverGetVersion(int* v) { *v = 13000; return OK; }
CUresult cuDeviceGetCount(int* n) { *n = 1; return OK; }
CUresult cuDeviceGet(int* dev, int ordinal) {
  if (ordinal != 0) return INVALID_VALUE;
  *dev = 0;
  return OK;
}
CUresult cuDeviceGetName(char* name, int len, int) {
  std::snprintf(name, len, "zoft kernel emulator (CPU)");
  return OK;
}
CUresult cuDeviceTotalMem_v2(size_t* bytes, int) { *bytes = kTotalBytes; return OK; }
CUresult cuDeviceGetAttribute(int* v, int attr, int) {
  switch (attr) {
    case 75: *v = 9; break;                     // compute capability major
    case 76: *v = 0; break;                     // minor
    case 97: *v = (int)kOptInSmemBytes; break;  // max shared memory per block (opt-in)
    case 115: *v = 1; break;                    // memory pools (async allocation)
    case 1: *v = 1024; break;                   // max threads per block
    case 10: *v = 32; break;                    // warp size
    case 16: *v = 1; break;                     // multiprocessors
    default: *v = 0;
  }
  return OK;
}
CUresult cuDevicePrimaryCtxRetain(void** ctx, int) { *ctx = &g_dummy_ctx; return OK; }
CUresult cuDevicePrimaryCtxRelease_v2(int) { return OK; }
CUresult cuCtxSetCurrent(void*) { return OK; }
CUresult cuCtxGetCurrent(void** ctx) { *ctx = &g_dummy_ctx; return OK; }
CUresult cuCtxPushCurrent_v2(void*) { return OK; }
CUresult cuCtxPopCurrent_v2(void** ctx) { if (ctx) *ctx = &g_dummy_ctx; return OK; }
CUresult cuCtxSynchronize() { return OK; }
CUresult cuCtxGetDevice(int* dev) { *dev = 0; return OK; }

CUresult cuStreamCreate(void** s, unsigned) { *s = new int(0); return OK; }
CUresult cuStreamCreateWithPriority(void** s, unsigned, int) { *s = new int(0); return OK; }
CUresult cuStreamDestroy_v2(void* s) { delete (int*)s; return OK; }
CUresult cuStreamSynchronize(void*) { return OK; }
CUresult cuStreamQuery(void*) { return OK; }
CUresult cuStreamWaitEvent(void*, void*, unsigned) { return OK; }

CUresult cuEventCreate(void** e, unsigned) { *e = new double(0); return OK; }
CUresult cuEventDestroy_v2(void* e) { delete (double*)e; return OK; }
CUresult cuEventRecord(void* e, void*) { *(double*)e = now_ms(); return OK; }
CUresult cuEventRecordWithFlags(void* e, void*, unsigned) { *(double*)e = now_ms(); return OK; }
CUresult cuEventSynchronize(void*) { return OK; }
CUresult cuEventQuery(void*) { return OK; }
CUresult cuEventElapsedTime(float* ms, void* start, void* end) {
  *ms = (float)(*(double*)end - *(double*)start);
  return OK;
}
CUresult cuEventElapsedTime_v2(float* ms, void* start, void* end) {
  return cuEventElapsedTime(ms, start, end);
}

CUresult cuMemAlloc_v2(unsigned long long* p, size_t bytes) { return alloc(p, bytes); }
CUresult cuMemAllocAsync(unsigned long long* p, size_t bytes, void*) { return alloc(p, bytes); }
CUresult cuMemFree_v2(unsigned long long p) { return release(p); }
CUresult cuMemFreeAsync(unsigned long long p, void*) { return release(p); }
// One pool that frees at once, so keeping freed memory and trimming it change nothing here.
CUresult cuDeviceGetDefaultMemPool(void** pool, int) {
  static int the_pool;
  *pool = &the_pool;
  return OK;
}
CUresult cuMemPoolSetAttribute(void*, int, void*) { return OK; }
CUresult cuMemPoolTrimTo(void*, size_t) { return OK; }
CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
  std::lock_guard<std::mutex> lock(g_mu);
  *free_bytes = kTotalBytes - g_held;
  *total = kTotalBytes;
  return OK;
}
CUresult cuMemAllocHost_v2(void** p, size_t bytes) {
  *p = std::malloc(bytes ? bytes : 1);
  return *p ? OK : OUT_OF_MEMORY;
}
CUresult cuMemHostAlloc(void** p, size_t bytes, unsigned) { return cuMemAllocHost_v2(p, bytes); }
CUresult cuMemFreeHost(void* p) { std::free(p); return OK; }
CUresult cuMemcpyHtoD_v2(unsigned long long d, const void* h, size_t n) {
  std::memcpy((void*)d, h, n);
  return OK;
}
CUresult cuMemcpyHtoDAsync_v2(unsigned long long d, const void* h, size_t n, void*) {
  return cuMemcpyHtoD_v2(d, h, n);
}
CUresult cuMemcpyDtoH_v2(void* h, unsigned long long d, size_t n) {
  std::memcpy(h, (const void*)d, n);
  return OK;
}
CUresult cuMemcpyDtoHAsync_v2(void* h, unsigned long long d, size_t n, void*) {
  return cuMemcpyDtoH_v2(h, d, n);
}
CUresult cuMemcpyDtoD_v2(unsigned long long d, unsigned long long s, size_t n) {
  std::memmove((void*)d, (const void*)s, n);
  return OK;
}
CUresult cuMemcpyDtoDAsync_v2(unsigned long long d, unsigned long long s, size_t n, void*) {
  return cuMemcpyDtoD_v2(d, s, n);
}
CUresult cuMemsetD8_v2(unsigned long long d, unsigned char v, size_t n) {
  std::memset((void*)d, v, n);
  return OK;
}
CUresult cuMemsetD8Async(unsigned long long d, unsigned char v, size_t n, void*) {
  return cuMemsetD8_v2(d, v, n);
}

CUresult cuModuleLoadData(void** module, const void*) { *module = &g_dummy_module; return OK; }
CUresult cuModuleUnload(void*) { return OK; }
CUresult cuModuleGetFunction(void** f, void*, const char* name) {
  auto k = zf_emu_kernel(name);
  if (!k) return NOT_FOUND;
  std::lock_guard<std::mutex> lock(g_mu);
  Function& fn = g_functions[name];
  if (!fn.trampoline) fn = Function{name, k};
  *f = &fn;
  return OK;
}
CUresult cuFuncSetAttribute(void* f, int attr, int v) {
  if (attr != kAttrMaxDynamicSmem) return OK;
  if (v < 0 || (size_t)v > kOptInSmemBytes) return INVALID_VALUE;
  std::lock_guard<std::mutex> lock(g_mu);
  static_cast<Function*>(f)->max_dynamic_smem = (size_t)v;
  return OK;
}
CUresult cuFuncGetAttribute(int* v, int, void*) { *v = 0; return OK; }

CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                        unsigned bz, unsigned smem, void*, void** params, void** extra) {
  const Function* fn = static_cast<const Function*>(f);
  // A GPU's limits: 1024 threads a block (z at most 64), 2^31 - 1 blocks in x, 65535 in y and z.
  if (extra || bx * by * bz == 0 || bx * by * bz > 1024 || bz > 64) return INVALID_VALUE;
  if (gx == 0 || gy == 0 || gz == 0 || gx > 0x7fffffffu || gy > 65535 || gz > 65535)
    return INVALID_VALUE;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    if (smem > fn->max_dynamic_smem) return INVALID_VALUE;  // over 48 KB without opting in
  }
  switch (zf_emu_launch(fn->name.c_str(), fn->trampoline, params, gx, gy, gz, bx, by, bz, smem)) {
    case 0: return OK;
    case 2:
      std::fprintf(stderr, "zoft kernel emulator: %s\n", zf_emu_last_report());
      switch (zf_emu_last_violation()) {
        case ZF_OUT_OF_BOUNDS: return ILLEGAL_ADDRESS;
        case ZF_MISALIGNED: return MISALIGNED_ADDRESS;
        default: return LAUNCH_FAILED;  // a race or a read of unwritten shared memory
      }
    default: return LAUNCH_FAILED;
  }
}

CUresult cuGetErrorString(CUresult e, const char** s) {
  const bool checked =
      (e == ILLEGAL_ADDRESS || e == MISALIGNED_ADDRESS || e == LAUNCH_FAILED) && *zf_emu_last_report();
  *s = e == OK ? "no error" : e == OUT_OF_MEMORY ? "out of memory (emulated device)"
                            : checked            ? zf_emu_last_report()
                            : e == LAUNCH_FAILED ? "kernel deadlocked in the emulator"
                                                 : "error in the CUDA emulator";
  return OK;
}
CUresult cuGetErrorName(CUresult e, const char** s) {
  *s = e == OK ? "CUDA_SUCCESS" : e == OUT_OF_MEMORY ? "CUDA_ERROR_OUT_OF_MEMORY"
                            : e == INVALID_VALUE ? "CUDA_ERROR_INVALID_VALUE"
                            : e == NOT_FOUND     ? "CUDA_ERROR_NOT_FOUND"
                            : e == ILLEGAL_ADDRESS ? "CUDA_ERROR_ILLEGAL_ADDRESS"
                            : e == MISALIGNED_ADDRESS ? "CUDA_ERROR_MISALIGNED_ADDRESS"
                            : e == LAUNCH_FAILED   ? "CUDA_ERROR_LAUNCH_FAILED"
                                                   : "CUDA_ERROR_EMULATED";
  return OK;
}

}  // extern "C"

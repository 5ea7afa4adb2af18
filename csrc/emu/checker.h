// The emulator's memory checker (checker.cpp), as the scheduler (runtime.cpp) and the driver
// (driver.cpp) see it. The kernels are compiled with the compiler's thread-sanitizer
// instrumentation, whose hooks (__tsan_read4, __tsan_write8, ...) checker.cpp defines itself:
// every load and store a kernel makes is checked against the device allocations, the launch's
// shared memory and the running thread's stack, and against the other threads' accesses of the
// same launch for races. The first violation aborts the launch with a report.
#pragma once

#include <cstddef>
#include <cstdint>

// Who is running, as the scheduler sets it before it resumes a fiber.
struct ZfCheckCursor {
  unsigned thread;               // linear index in the block
  const unsigned* block_epoch;   // completed __syncthreads of the block
  const unsigned* warp_epoch;    // completed barriers (shuffles) of the thread's warp
  uintptr_t stack_lo, stack_hi;  // the fiber's stack
};
extern ZfCheckCursor zf_check_cursor;

// Reads ZOFT_EMU_CHECK (0 turns the checker off) once.
bool zf_check_enabled();
void zf_check_launch_begin(const char* kernel, const unsigned grid[3], const unsigned block[3],
                           size_t dynamic_smem);
void zf_check_block_begin(uint64_t block_linear);
void zf_check_launch_end();

// A static shared array (see ZF_SHARED in cuda_emu.h), on its first use.
extern "C" bool zf_check_shared(const void* p, size_t bytes, const char* name);

// The report of the last launch this thread made, when the checker stopped it ("" when not),
// and what it found.
enum ZfViolation { ZF_NONE, ZF_OUT_OF_BOUNDS, ZF_MISALIGNED, ZF_RACE, ZF_UNINITIALIZED };
extern "C" const char* zf_emu_last_report();
extern "C" int zf_emu_last_violation();

// Device memory the kernels may use: the driver's allocations (requested sizes, not the
// allocator's rounding; the driver's only record of them: untrack gives the size back, or false
// for a pointer it never allocated), and host buffers the calling thread hands to kernels
// directly (the unit tests').
extern "C" void zf_check_track(uintptr_t base, size_t bytes);
extern "C" bool zf_check_untrack(uintptr_t base, size_t* bytes);
extern "C" void zf_check_track_host(uintptr_t base, size_t bytes);
// Whether [p, p + bytes) lies inside one of those ranges (1), or why not (0): for the emulated
// cuBLAS, whose host GEMM the instrumentation does not see.
extern "C" int zf_check_device_range(uintptr_t p, size_t bytes, char* why, size_t why_len);

// Called by the checker on a violation, from the running fiber: ends the launch now (before the
// offending access happens). Defined in runtime.cpp.
[[noreturn]] void zf_emu_abort_launch();

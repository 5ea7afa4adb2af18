// The scheduler of the CPU emulation (see cuda_emu.h): a launch runs its blocks in order, and
// within a block every thread is a fiber (ucontext) on the calling OS thread, resumed round-robin
// until it finishes or waits at a barrier. A thread that returns stops counting at the barriers
// (as exited threads do on the GPU). Launches from several OS threads run one at a time.
//
// The fibers live for the whole process and run one block after another: each starts once
// through makecontext/setcontext, and every later switch is _setjmp/_longjmp, which unlike
// swapcontext does not save and restore the signal mask (system calls at every switch).
#include <setjmp.h>
#include <ucontext.h>

#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <vector>

#include "checker.h"
#include "cuda_emu.h"

uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

namespace {

constexpr size_t kStackBytes = 256 * 1024;

struct Barrier {
  unsigned expected = 0, arrived = 0, generation = 0;
};

struct Fiber {
  ucontext_t start;  // where the fiber begins, entered once
  jmp_buf resume;    // where it waits: at a barrier, or done with a block
  bool started = false;
  bool done = false;
  uint3 idx;
  unsigned linear = 0;
  char* stack = nullptr;
};

struct Launch {
  void (*trampoline)(void**);
  void** params;
  Barrier block;
  std::vector<Barrier> warps;
  std::vector<uint64_t> slots;  // 32 per warp
  jmp_buf scheduler;
  Fiber* current = nullptr;
  uint64_t progress = 0;  // arrivals, releases and exits: what a deadlock lacks
  bool aborted = false;   // by the checker
};

Launch* g_launch = nullptr;
std::vector<Fiber*> g_pool;

void yield_to_scheduler() {
  if (_setjmp(g_launch->current->resume) == 0) _longjmp(g_launch->scheduler, 1);
}

void arrive(Barrier& b) {
  Launch& l = *g_launch;
  const unsigned gen = b.generation;
  ++l.progress;
  if (++b.arrived == b.expected) {
    b.arrived = 0;
    ++b.generation;
    return;
  }
  while (b.generation == gen) yield_to_scheduler();
}

// An exiting thread no longer counts; the others may now all be waiting for it.
void leave(Barrier& b) {
  --b.expected;
  if (b.arrived > 0 && b.arrived == b.expected) {
    b.arrived = 0;
    ++b.generation;
  }
}

// One CUDA thread per block, for ever: the scheduler resumes it for each block it takes part in.
void fiber_main() {
  for (;;) {
    Launch& l = *g_launch;
    Fiber* f = l.current;
    l.trampoline(l.params);
    f->done = true;
    ++l.progress;
    leave(l.block);
    leave(l.warps[f->linear / 32]);
    yield_to_scheduler();
  }
}

Fiber* pooled_fiber(unsigned t) {
  while (g_pool.size() <= t) {
    Fiber* f = new Fiber;
    f->stack = static_cast<char*>(std::malloc(kStackBytes));
    getcontext(&f->start);
    f->start.uc_stack.ss_sp = f->stack;
    f->start.uc_stack.ss_size = kStackBytes;
    f->start.uc_link = nullptr;
    makecontext(&f->start, fiber_main, 0);
    g_pool.push_back(f);
  }
  return g_pool[t];
}

}  // namespace

void zf_emu_sync_block() { arrive(g_launch->block); }
void zf_emu_sync_warp() { arrive(g_launch->warps[g_launch->current->linear / 32]); }
unsigned zf_emu_lane() { return g_launch->current->linear % 32; }
uint64_t zf_emu_shfl_raw(uint64_t v, unsigned src_lane) {
  uint64_t* slots = g_launch->slots.data() + 32 * (g_launch->current->linear / 32);
  slots[zf_emu_lane()] = v;
  zf_emu_sync_warp();
  v = slots[src_lane & 31];
  zf_emu_sync_warp();  // nobody overwrites a slot before every lane has read
  return v;
}

void zf_emu_abort_launch() {
  g_launch->aborted = true;
  _longjmp(g_launch->scheduler, 1);
}

// Runs trampoline(params) as kernel<<<grid, block, dynamic_smem>>>. Returns 0; 1 when every live
// thread of a block waits at a barrier that can never complete (the kernel would hang on the
// GPU); 2 when the checker found an access out of bounds or a race (zf_emu_last_report says
// which).
extern "C" int zf_emu_launch(const char* kernel, void (*trampoline)(void**), void** params,
                             unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                             unsigned bz, size_t dynamic_smem) {
  static std::mutex one_at_a_time;
  std::lock_guard<std::mutex> lock(one_at_a_time);
  Launch l;
  l.trampoline = trampoline;
  l.params = params;
  const unsigned threads = bx * by * bz;
  std::vector<Fiber*> fibers(threads);
  for (unsigned t = 0; t < threads; ++t) {
    fibers[t] = pooled_fiber(t);
    fibers[t]->linear = t;
    fibers[t]->idx = uint3{t % bx, (t / bx) % by, t / (bx * by)};
  }
  const unsigned nwarps = (threads + 31) / 32;
  l.warps.resize(nwarps);
  l.slots.assign(32 * nwarps, 0);
  g_launch = &l;
  gridDim = dim3{gx, gy, gz};
  blockDim = dim3{bx, by, bz};
  const unsigned grid[3] = {gx, gy, gz}, block[3] = {bx, by, bz};
  zf_check_launch_begin(kernel, grid, block, dynamic_smem);
  int rc = 0;
  for (unsigned z = 0; z < gz && rc == 0; ++z)
    for (unsigned y = 0; y < gy && rc == 0; ++y)
      for (unsigned x = 0; x < gx && rc == 0; ++x) {
        blockIdx = uint3{x, y, z};
        zf_check_block_begin(x + (uint64_t)gx * (y + (uint64_t)gy * z));
        l.block = Barrier{threads, 0, 0};
        for (unsigned w = 0; w < nwarps; ++w)
          l.warps[w] = Barrier{std::min(32u, threads - 32 * w), 0, 0};
        for (Fiber* f : fibers) f->done = false;
        unsigned live = threads;
        while (live > 0) {
          const uint64_t before = l.progress;
          live = 0;
          for (Fiber* f : fibers) {
            if (f->done) continue;
            l.current = f;
            threadIdx = f->idx;
            zf_check_cursor = ZfCheckCursor{f->linear, &l.block.generation,
                                            &l.warps[f->linear / 32].generation,
                                            (uintptr_t)f->stack, (uintptr_t)f->stack + kStackBytes};
            if (_setjmp(l.scheduler) == 0) {
              if (f->started) _longjmp(f->resume, 1);
              f->started = true;
              setcontext(&f->start);
            }
            if (l.aborted) break;
            live += !f->done;
          }
          if (l.aborted) {
            for (Fiber* f : fibers) f->started = false;
            rc = 2;
            break;
          }
          if (live > 0 && l.progress == before) {
            std::fprintf(stderr,
                         "zoft kernel emulator: block (%u, %u, %u) deadlocked: its %u live threads all "
                         "wait at barriers that can never complete\n",
                         x, y, z, live);
            // The stuck fibers' stacks are abandoned: they start afresh next time.
            for (Fiber* f : fibers) f->started = false;
            rc = 1;
            break;
          }
        }
      }
  zf_check_launch_end();
  g_launch = nullptr;
  return rc;
}

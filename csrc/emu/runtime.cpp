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
uint64_t* zf_emu_warp_slots() {
  return g_launch->slots.data() + 32 * (g_launch->current->linear / 32);
}

// Runs trampoline(params) as kernel<<<grid, block>>>. Returns 0, or 1 when every live thread of
// a block waits at a barrier that can never complete (the kernel would hang on the GPU).
extern "C" int zf_emu_launch(void (*trampoline)(void**), void** params, unsigned gx, unsigned gy,
                             unsigned gz, unsigned bx, unsigned by, unsigned bz) {
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
  int rc = 0;
  for (unsigned z = 0; z < gz && rc == 0; ++z)
    for (unsigned y = 0; y < gy && rc == 0; ++y)
      for (unsigned x = 0; x < gx && rc == 0; ++x) {
        blockIdx = uint3{x, y, z};
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
            if (_setjmp(l.scheduler) == 0) {
              if (f->started) _longjmp(f->resume, 1);
              f->started = true;
              setcontext(&f->start);
            }
            live += !f->done;
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
  g_launch = nullptr;
  return rc;
}

// The emulator's memory checker (see checker.h): bounds and races of every access an emulated
// kernel makes, through the thread-sanitizer hooks the compiler puts before each load and store
// of the instrumented kernels. Compiled without instrumentation itself.
//
// Alignment. Outside the thread's stack, an access of a 2-, 4-, 8- or 16-byte type must be
// aligned to its size, as on a GPU. (The kernels are compiled without scalar replacement of
// aggregates, so a float4 load stays one 16-byte access rather than four 4-byte ones.)
//
// Bounds. An access must lie in the running thread's stack, in one device allocation (as
// requested, not as rounded by the allocator), in the launch's dynamic shared memory (the bytes
// the launch asked for, not the emulator's 256 KB), in the static shared arrays, or in the
// emulator's own globals (threadIdx, ...). Anything else is out of bounds.
//
// Shared memory holds nothing at the start of a block: reading bytes no thread of the block has
// written is reported (on a GPU they hold whatever an earlier block left).
//
// Races. Device and shared memory have a shadow cell per 2 bytes holding the last write and the
// last read (block, thread, and the barrier epochs the thread had passed). Two accesses to the
// same bytes by different threads, one of them a write, race unless a barrier lies between:
// a __syncthreads completed after the first (same block), or a warp barrier (the shuffles) when
// both threads are in one warp. Blocks are never ordered within a launch; launches are (one
// stream), so the shadow of device memory starts empty at each launch, and that of shared memory
// at each block. A cell keeps one read (plus a flag for reads from several blocks), so a race
// with an earlier reader of the same block can be missed; keeping fewer records only ever
// misses races, it never invents one. A launch whose device memory needs more than 1 GiB of
// shadow has its races unchecked past that point (said once on stderr); bounds still are.
#include <cxxabi.h>
#include <dlfcn.h>
#include <link.h>

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "checker.h"

ZfCheckCursor zf_check_cursor;

// The dynamic shared arrays (all alias offset 0 of the block's dynamic shared memory on a GPU)
// and their size, from the generated translation unit; the static ones tell zf_check_shared.
extern "C" float* const zf_emu_dsmem_arrays[];
extern "C" const unsigned zf_emu_dsmem_count;
extern "C" const size_t zf_emu_dsmem_bytes;

namespace {

// The barriers a thread had passed: __syncthreads of its block, and those of its warp.
struct Epoch {
  uint32_t block, warp;
};

struct Cell {
  uint32_t w_block, r_block;  // State::block_id; 0: none
  Epoch w_epoch, r_epoch;
  uint16_t w_thread, r_thread;
};
constexpr uint16_t kManyBlocks = 0x8000;  // r_thread flag: read by more than one block

constexpr unsigned kPageShift = 16;  // shadow pages cover 64 KiB of address space
constexpr size_t kPageCells = (size_t(1) << kPageShift) / 2;
constexpr size_t kShadowCap = size_t(1) << 30;

// Where an access lands, for reports (formatted only then).
struct Memory {
  enum Kind { Device, StaticShared, DynamicShared } kind;
  uintptr_t base;
  size_t bytes;
  const char* name;  // of a static shared array
  bool shared() const { return kind != Device; }
};

void describe(const Memory& m, uintptr_t addr, char* buf, size_t n) {
  switch (m.kind) {
    case Memory::Device:
      std::snprintf(buf, n, "device memory (offset %lu of the %zu-byte allocation at %#lx)",
                    (unsigned long)(addr - m.base), m.bytes, (unsigned long)m.base);
      break;
    case Memory::StaticShared:
      std::snprintf(buf, n, "static shared array %s (%zu bytes)", m.name, m.bytes);
      break;
    case Memory::DynamicShared:
      std::snprintf(buf, n, "dynamic shared memory (offset %lu)", (unsigned long)(addr - m.base));
      break;
  }
}

struct Access {
  uintptr_t addr;
  unsigned bytes;
  bool write;
  bool natural;  // an access of the type's own size and alignment (not memcpy-like)
  void* pc;
};

struct State {
  bool in_launch = false, races = true;
  const char* kernel = "";
  unsigned grid[3] = {}, block[3] = {};
  size_t dynamic_smem = 0;
  // Blocks are numbered across launches (from 1), so shared-memory cells of another launch's
  // blocks are as stale as those of another block.
  uint32_t block_id = 0, first_block_id = 1;
  // The last device ranges hit (kernels alternate among a few buffers), and where the rest live.
  static constexpr unsigned kHits = 4;
  uintptr_t hit_lo[kHits] = {}, hit_hi[kHits] = {};
  unsigned next_hit = 0;
  uintptr_t image_lo = 0, image_hi = 0;
  std::unordered_map<uintptr_t, Cell*> pages;
  uintptr_t last_page = ~uintptr_t(0);
  Cell* last_cells = nullptr;
  struct StaticShared {
    uintptr_t lo, hi;
    const char* name;
    std::vector<Cell> cells;
  };
  std::vector<StaticShared> static_smem;
  std::vector<Cell> dynamic_smem_cells;
  bool cap_said = false;
};
State g;

// base -> bytes: the driver's allocations, and the host buffers this OS thread handed to kernels
// (a unit test's; every test runs on a thread of its own, so none sees another's stale ones).
std::mutex g_ranges_mu;
std::map<uintptr_t, size_t> g_ranges;
thread_local std::map<uintptr_t, size_t> t_host_ranges;
// The launching thread's: tests launch from many threads, each reading its own report.
thread_local char g_report[2048];

// The lowest and highest address of the loaded object (this library) holding `probe`.
void find_image(const void* probe, uintptr_t* lo, uintptr_t* hi) {
  struct Find {
    uintptr_t probe, lo, hi;
  } find{(uintptr_t)probe, ~uintptr_t(0), 0};
  dl_iterate_phdr(
      [](dl_phdr_info* i, size_t, void* data) {
        Find* f = static_cast<Find*>(data);
        uintptr_t lo = ~uintptr_t(0), hi = 0;
        bool mine = false;
        for (int s = 0; s < i->dlpi_phnum; ++s) {
          const ElfW(Phdr)& ph = i->dlpi_phdr[s];
          if (ph.p_type != PT_LOAD) continue;
          const uintptr_t a = i->dlpi_addr + ph.p_vaddr, b = a + ph.p_memsz;
          lo = std::min(lo, a);
          hi = std::max(hi, b);
          mine |= a <= f->probe && f->probe < b;
        }
        if (!mine) return 0;
        f->lo = lo;
        f->hi = hi;
        return 1;
      },
      &find);
  *lo = find.lo;
  *hi = find.hi;
}

// What the last stopped launch of this thread ran into (checker.h's ZfViolation).
thread_local int t_violation = 0;

void say(ZfViolation kind, const char* fmt, ...) {
  t_violation = kind;
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(g_report, sizeof g_report, fmt, ap);
  va_end(ap);
}

// "thread (x, y, z) of block (x, y, z)"
const char* who(uint32_t block_id, unsigned thread, char* buf, size_t n) {
  const uint64_t b = block_id - g.first_block_id;
  const unsigned bx = g.block[0], by = g.block[1], gx = g.grid[0], gy = g.grid[1];
  std::snprintf(buf, n, "thread (%u, %u, %u) of block (%llu, %llu, %llu)", thread % bx,
                (thread / bx) % by, thread / (bx * by), (unsigned long long)(b % gx),
                (unsigned long long)((b / gx) % gy), (unsigned long long)(b / ((uint64_t)gx * gy)));
  return buf;
}

// The function an access was made from, for reports.
void where(void* pc, char* buf, size_t n) {
  Dl_info info;
  if (!dladdr(pc, &info) || !info.dli_sname) {
    std::snprintf(buf, n, "?");
    return;
  }
  int status = 0;
  char* demangled = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
  std::snprintf(buf, n, "%s+%#lx", status == 0 ? demangled : info.dli_sname,
                (unsigned long)((char*)pc - (char*)info.dli_saddr));
  std::free(demangled);
}

// "kernel K (grid, block): thread T of block B reads N bytes at A, <what> [in F]"
void bad_access(ZfViolation kind, const Access& a, const char* what) {
  char w[96], at[256];
  who(g.block_id, zf_check_cursor.thread, w, sizeof w);
  where(a.pc, at, sizeof at);
  say(kind, "kernel %s (grid (%u, %u, %u), block (%u, %u, %u)): %s %s %u bytes at %#lx, %s [in %s]",
      g.kernel, g.grid[0], g.grid[1], g.grid[2], g.block[0], g.block[1], g.block[2], w,
      a.write ? "writes" : "reads", a.bytes, (unsigned long)a.addr, what, at);
}

// A device range ({0, 0}: none).
struct Range {
  uintptr_t base = 0;
  size_t bytes = 0;
  uintptr_t end() const { return base + bytes; }
  bool holds(uintptr_t p) const { return p >= base && p < end(); }
};

// The device range holding `addr` (the driver's before this thread's host buffers), else the
// nearest one below it.
Range range_at(uintptr_t addr) {
  Range below;
  auto visit = [&](const std::map<uintptr_t, size_t>& ranges) {
    auto next = ranges.upper_bound(addr);
    if (next == ranges.begin()) return false;
    const Range r{std::prev(next)->first, std::prev(next)->second};
    if (r.holds(addr) || r.base >= below.base) below = r;
    return r.holds(addr);
  };
  {
    std::lock_guard<std::mutex> lock(g_ranges_mu);
    if (visit(g_ranges)) return below;
  }
  visit(t_host_ranges);
  return below;
}

// Out of every range: name the one it follows (`below`), when that ends close before it.
void outside_everything(const Access& a, const Range& below) {
  char what[256];
  const uintptr_t past = a.addr - below.end();
  if (below.base && past < 65536)
    std::snprintf(what, sizeof what,
                  "outside every device allocation: %lu bytes past the end of the %zu-byte one "
                  "at %#lx",
                  (unsigned long)past, below.bytes, (unsigned long)below.base);
  else
    std::snprintf(what, sizeof what, "outside every device allocation");
  bad_access(ZF_OUT_OF_BOUNDS, a, what);
}

Epoch epoch_now() { return Epoch{*zf_check_cursor.block_epoch, *zf_check_cursor.warp_epoch}; }

// Whether an earlier access by (block_id, thread, epoch) is ordered before the running thread's.
bool ordered(uint32_t block_id, unsigned thread, Epoch epoch) {
  const unsigned me = zf_check_cursor.thread;
  if (block_id != g.block_id) return false;
  if (thread == me) return true;
  const Epoch now = epoch_now();
  if (epoch.block != now.block) return true;
  return thread / 32 == me / 32 && epoch.warp != now.warp;
}

const char* barrier_missing(unsigned other) {
  return other / 32 == zf_check_cursor.thread / 32
             ? "with no __syncthreads or warp barrier between them"
             : "with no __syncthreads between them";
}

void race(const Access& a, const Memory& m, const char* them, bool other_wrote,
          const char* why) {
  char me[96], at[256], memory[160];
  describe(m, a.addr, memory, sizeof memory);
  who(g.block_id, zf_check_cursor.thread, me, sizeof me);
  where(a.pc, at, sizeof at);
  say(ZF_RACE, "kernel %s (grid (%u, %u, %u), block (%u, %u, %u)): race on %s: %s %s %u bytes at %#lx "
      "that %s %s, %s [in %s]",
      g.kernel, g.grid[0], g.grid[1], g.grid[2], g.block[0], g.block[1], g.block[2], memory, me,
      a.write ? "writes" : "reads", a.bytes, (unsigned long)a.addr, them,
      other_wrote ? "wrote" : "read", why, at);
}

void race_with(const Access& a, const Memory& memory, uint32_t block_id, unsigned thread,
               bool other_wrote) {
  char them[96];
  who(block_id, thread, them, sizeof them);
  race(a, memory, them, other_wrote,
       block_id != g.block_id ? "and the blocks of a launch are not ordered"
                              : barrier_missing(thread));
}

// Updates the cells of one access; false (after a report) on a race. In shared memory, cells
// of earlier blocks are empty (every block has its own).
bool track(Cell* cells, const Access& a, const Memory& memory) {
  const bool shared = memory.shared();
  const unsigned me = zf_check_cursor.thread;
  const Epoch now = epoch_now();
  const uintptr_t granules = ((a.addr + a.bytes - 1) >> 1) - (a.addr >> 1) + 1;
  for (uintptr_t i = 0; i < granules; ++i) {
    Cell& c = cells[i];
    if (shared && c.w_block != g.block_id) c.w_block = 0;
    if (shared && c.r_block != g.block_id) c.r_block = c.r_thread = 0;
    if (shared && !a.write && !c.w_block) {
      char desc[160], what[256];
      describe(memory, a.addr, desc, sizeof desc);
      std::snprintf(what, sizeof what,
                    "in %s, which no thread of this block wrote (a GPU gives whatever was left "
                    "there)",
                    desc);
      bad_access(ZF_UNINITIALIZED, a, what);
      return false;
    }
    if (c.w_block && !ordered(c.w_block, c.w_thread, c.w_epoch)) {
      race_with(a, memory, c.w_block, c.w_thread, true);
      return false;
    }
    const bool many_blocks = c.r_thread & kManyBlocks;
    const unsigned reader = c.r_thread & ~kManyBlocks;
    if (a.write) {
      if (many_blocks) {
        // At least one of the reading blocks is not this one.
        race(a, memory, "threads of several blocks", false,
             "and the blocks of a launch are not ordered");
        return false;
      }
      if (c.r_block && !ordered(c.r_block, reader, c.r_epoch)) {
        race_with(a, memory, c.r_block, reader, false);
        return false;
      }
      c = Cell{g.block_id, 0, now, Epoch{}, (uint16_t)me, 0};
    } else {
      const bool many = many_blocks || (c.r_block && c.r_block != g.block_id);
      c.r_block = g.block_id;
      c.r_epoch = now;
      c.r_thread = (uint16_t)(me | (many ? kManyBlocks : 0));
    }
  }
  return true;
}

Cell* global_cells(uintptr_t addr) {
  const uintptr_t page = addr >> kPageShift;
  if (page != g.last_page) {
    Cell*& cells = g.pages[page];
    if (!cells) {
      if ((g.pages.size() + 1) * kPageCells * sizeof(Cell) > kShadowCap) {
        g.pages.erase(page);
        g.races = false;
        if (!g.cap_said) {
          std::fprintf(stderr,
                       "zoft kernel emulator: kernel %s touches more device memory than the race "
                       "checker follows (%zu MiB of shadow); its races, and those of later such "
                       "launches, are not checked (bounds still are)\n",
                       g.kernel, kShadowCap >> 20);
          g.cap_said = true;
        }
        return nullptr;
      }
      cells = static_cast<Cell*>(std::calloc(kPageCells + 8, sizeof(Cell)));
    }
    g.last_page = page;
    g.last_cells = cells;
  }
  return g.last_cells + ((addr & ((uintptr_t(1) << kPageShift) - 1)) >> 1);
}

// False (after a report) when the access is out of bounds or races.
bool check(const Access& a) {
  const ZfCheckCursor& c = zf_check_cursor;
  const uintptr_t end = a.addr + a.bytes;
  if (a.addr >= c.stack_lo && end <= c.stack_hi) return true;
  if (a.natural && (a.addr & (a.bytes - 1))) {
    // A GPU faults on this (misaligned address); a CPU does not: a float4 load from a pointer
    // that is only 4-byte aligned, say.
    char what[96];
    std::snprintf(what, sizeof what, "which is not %u-byte aligned (a GPU faults: misaligned address)",
                  a.bytes);
    bad_access(ZF_MISALIGNED, a, what);
    return false;
  }
  unsigned hit = 0;
  while (hit < State::kHits && !(a.addr >= g.hit_lo[hit] && end <= g.hit_hi[hit])) ++hit;
  if (hit == State::kHits) {
    // Shared memory.
    for (State::StaticShared& r : g.static_smem) {
      if (a.addr < r.lo || a.addr >= r.hi) continue;
      const Memory m{Memory::StaticShared, r.lo, r.hi - r.lo, r.name};
      if (end > r.hi) {
        char memory[160], what[192];
        describe(m, a.addr, memory, sizeof memory);
        std::snprintf(what, sizeof what, "running past the end of %s", memory);
        bad_access(ZF_OUT_OF_BOUNDS, a, what);
        return false;
      }
      return track(&r.cells[(a.addr - r.lo) >> 1], a, m);
    }
    for (unsigned i = 0; i < zf_emu_dsmem_count; ++i) {
      const uintptr_t lo = (uintptr_t)zf_emu_dsmem_arrays[i];
      if (a.addr < lo || a.addr >= lo + zf_emu_dsmem_bytes) continue;
      if (end - lo > g.dynamic_smem) {
        char what[128];
        std::snprintf(what, sizeof what,
                      "offset %lu of dynamic shared memory, of which the launch asked for %zu "
                      "bytes",
                      (unsigned long)(a.addr - lo), g.dynamic_smem);
        bad_access(ZF_OUT_OF_BOUNDS, a, what);
        return false;
      }
      // All dynamic arrays are one memory: share the cells.
      const Memory m{Memory::DynamicShared, lo, g.dynamic_smem, nullptr};
      return track(&g.dynamic_smem_cells[(a.addr - lo) >> 1], a, m);
    }
    if (a.addr >= g.image_lo && end <= g.image_hi) return true;  // the emulator's globals
    const Range r = range_at(a.addr);
    if (!r.holds(a.addr)) {
      outside_everything(a, r);
      return false;
    }
    if (end > r.end()) {
      char what[160];
      std::snprintf(what, sizeof what, "running past the end of the %zu-byte allocation at %#lx",
                    r.bytes, (unsigned long)r.base);
      bad_access(ZF_OUT_OF_BOUNDS, a, what);
      return false;
    }
    hit = g.next_hit;
    g.next_hit = (g.next_hit + 1) % State::kHits;
    g.hit_lo[hit] = r.base;
    g.hit_hi[hit] = r.end();
  }
  if (!g.races) return true;
  Cell* cells = global_cells(a.addr);
  if (!cells) return true;
  // An access that straddles two shadow pages is tracked in the first one's spare cells only.
  return track(cells, a, Memory{Memory::Device, g.hit_lo[hit], g.hit_hi[hit] - g.hit_lo[hit], nullptr});
}

inline void hook(uintptr_t addr, unsigned bytes, bool write, bool natural, void* pc) {
  if (!g.in_launch) return;
  if (!check(Access{addr, bytes, write, natural, pc})) {
    g.in_launch = false;
    zf_emu_abort_launch();
  }
}

}  // namespace

bool zf_check_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("ZOFT_EMU_CHECK");
    return !(v && std::strcmp(v, "0") == 0);
  }();
  return on;
}

void zf_check_launch_begin(const char* kernel, const unsigned grid[3], const unsigned block[3],
                           size_t dynamic_smem) {
  g_report[0] = 0;
  if (!zf_check_enabled()) return;
  if (!g.image_hi) {
    find_image((void*)&zf_check_launch_begin, &g.image_lo, &g.image_hi);
    g.dynamic_smem_cells.resize(zf_emu_dsmem_bytes / 2 + 8);
  }
  g.kernel = kernel;
  std::memcpy(g.grid, grid, sizeof g.grid);
  std::memcpy(g.block, block, sizeof g.block);
  g.dynamic_smem = dynamic_smem;
  for (unsigned i = 0; i < State::kHits; ++i) g.hit_lo[i] = g.hit_hi[i] = 0;
  g.races = true;
  g.in_launch = true;
}

void zf_check_block_begin(uint64_t block_linear) {
  g.block_id = g.first_block_id + (uint32_t)block_linear;
}

void zf_check_launch_end() {
  g.in_launch = false;
  g.first_block_id = g.block_id + 1;
  if (g.first_block_id == 0) g.first_block_id = 1;
  for (auto& p : g.pages) std::free(p.second);
  g.pages.clear();
  g.last_page = ~uintptr_t(0);
  g.last_cells = nullptr;
}

extern "C" const char* zf_emu_last_report() { return g_report; }
extern "C" int zf_emu_last_violation() { return *g_report ? t_violation : ZF_NONE; }

extern "C" bool zf_check_shared(const void* p, size_t bytes, const char* name) {
  const uintptr_t lo = (uintptr_t)p;
  g.static_smem.push_back(State::StaticShared{lo, lo + bytes, name, std::vector<Cell>(bytes / 2 + 9)});
  return true;
}

extern "C" int zf_check_device_range(uintptr_t p, size_t bytes, char* why, size_t why_len) {
  const Range r = range_at(p);
  if (!r.holds(p)) {
    std::snprintf(why, why_len, "outside every device allocation");
    return 0;
  }
  if (p + bytes > r.end()) {
    std::snprintf(why, why_len, "running %zu bytes past the end of the %zu-byte allocation at %#lx",
                  (size_t)(p + bytes - r.end()), r.bytes, (unsigned long)r.base);
    return 0;
  }
  return 1;
}

extern "C" void zf_check_track(uintptr_t base, size_t bytes) {
  std::lock_guard<std::mutex> lock(g_ranges_mu);
  g_ranges[base] = bytes;
}

extern "C" bool zf_check_untrack(uintptr_t base, size_t* bytes) {
  std::lock_guard<std::mutex> lock(g_ranges_mu);
  auto it = g_ranges.find(base);
  if (it == g_ranges.end()) return false;
  *bytes = it->second;
  g_ranges.erase(it);
  return true;
}

extern "C" void zf_check_track_host(uintptr_t base, size_t bytes) {
  // A new range replaces the stale ones it overlaps (buffers freed since).
  auto& ranges = t_host_ranges;
  auto it = ranges.upper_bound(base);
  if (it != ranges.begin() && std::prev(it)->first + std::prev(it)->second > base) --it;
  while (it != ranges.end() && it->first < base + bytes) it = ranges.erase(it);
  ranges[base] = bytes;
}

// The hooks of -fsanitize=thread instrumentation.
#define ZF_HOOKS(N)                                                                        \
  extern "C" void __tsan_read##N(void* p) {                                                \
    hook((uintptr_t)p, N, false, true, __builtin_return_address(0));                       \
  }                                                                                        \
  extern "C" void __tsan_write##N(void* p) {                                               \
    hook((uintptr_t)p, N, true, true, __builtin_return_address(0));                        \
  }                                                                                        \
  extern "C" void __tsan_unaligned_read##N(void* p) {                                      \
    hook((uintptr_t)p, N, false, false, __builtin_return_address(0));                      \
  }                                                                                        \
  extern "C" void __tsan_unaligned_write##N(void* p) {                                     \
    hook((uintptr_t)p, N, true, false, __builtin_return_address(0));                       \
  }
ZF_HOOKS(1)
ZF_HOOKS(2)
ZF_HOOKS(4)
ZF_HOOKS(8)
ZF_HOOKS(16)
extern "C" void __tsan_read_range(void* p, unsigned long n) {
  hook((uintptr_t)p, (unsigned)n, false, false, __builtin_return_address(0));
}
extern "C" void __tsan_write_range(void* p, unsigned long n) {
  hook((uintptr_t)p, (unsigned)n, true, false, __builtin_return_address(0));
}
extern "C" void __tsan_func_entry(void*) {}
extern "C" void __tsan_func_exit() {}
extern "C" void __tsan_init() {}

// The SIMT emulation's runtime (csrc/simt/simt.h): launch checks, the block scheduler (fibers or OS
// threads), the barrier and the warp exchange with their divergence reports.
#include "simt.h"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <condition_variable>
#include <deque>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <thread>
#include <vector>

#if defined(__SANITIZE_THREAD__)
#define BNEXT_SIMT_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define BNEXT_SIMT_TSAN 1
#endif
#endif

// ThreadSanitizer's annotations (weak: null unless libtsan is loaded). In the OS-thread mode the
// emulator's own bookkeeping (one mutex and condition variable per block) is hidden from it, and
// only the synchronization CUDA defines is reported to it: a barrier orders everything every
// thread of the block did before it before everything after it, a shuffle the same among the
// lanes of its warp. Otherwise the block mutex, which every thread takes, would order the
// accesses of a missing barrier and hide the race.
extern "C" {
void AnnotateIgnoreSyncBegin(const char*, int) __attribute__((weak));
void AnnotateIgnoreSyncEnd(const char*, int) __attribute__((weak));
void AnnotateIgnoreReadsBegin(const char*, int) __attribute__((weak));
void AnnotateIgnoreReadsEnd(const char*, int) __attribute__((weak));
void AnnotateIgnoreWritesBegin(const char*, int) __attribute__((weak));
void AnnotateIgnoreWritesEnd(const char*, int) __attribute__((weak));
void __tsan_acquire(void* addr) __attribute__((weak));
void __tsan_release(void* addr) __attribute__((weak));
}

namespace bnext_simt {
namespace {

constexpr int kWarp = 32;
constexpr size_t kMaxParamBytes = 4096;  // the kernel parameter limit the kernels are written for
constexpr size_t kStackBytes = 64 * 1024;

int g_sms = 132;
#ifdef BNEXT_SIMT_TSAN
bool g_os_threads = true;  // ThreadSanitizer does not follow ucontext switches
#else
bool g_os_threads = false;
#endif
bool g_unchecked = false;
LaunchStats g_stats;
std::mutex g_launch_mutex;  // one grid at a time: __shared__ storage has one copy
const cudaStream_t kCurrentStream = reinterpret_cast<cudaStream_t>(0x5117);

thread_local Thread* tls_thread = nullptr;

// Hides the emulator's bookkeeping from ThreadSanitizer (see above) for its lifetime.
struct HiddenFromTsan {
  const bool on = AnnotateIgnoreSyncBegin != nullptr;
  HiddenFromTsan() {
    if (!on) return;
    AnnotateIgnoreSyncBegin(__FILE__, __LINE__);
    AnnotateIgnoreReadsBegin(__FILE__, __LINE__);
    AnnotateIgnoreWritesBegin(__FILE__, __LINE__);
  }
  ~HiddenFromTsan() {
    if (!on) return;
    AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
    AnnotateIgnoreReadsEnd(__FILE__, __LINE__);
    AnnotateIgnoreSyncEnd(__FILE__, __LINE__);
  }
};

// The synchronization objects CUDA's barrier and shuffles stand for, as ThreadSanitizer sees them:
// two per block and two per warp, alternating (a thread cannot reach barrier k + 2 before every
// thread has left barrier k, so two suffice); `passed` counts a thread's barriers or shuffles.
struct TsanClocks {
  char barrier[2];
  std::vector<char> warp;  // 2 per warp
};

// Thrown into the threads of a block that has faulted (OS threads), to unwind them.
struct Abort {};

std::string where(const Site& s) {
  std::ostringstream o;
  o << s.what << " at " << s.file << ":" << s.line;
  return o.str();
}

bool same_site(const Site& a, const Site& b) { return a.line == b.line && a.id == b.id; }

enum class Wait { kRunning, kBarrier, kShfl, kExited };

struct Lane {
  Wait wait = Wait::kRunning;
  bool released = false;
  Site site{};
  unsigned mask = 0, delta = 0;
  int width = kWarp;
  uint64_t value = 0, result = 0;
};

class Fibers;

// The state of one block: who waits where. Every method runs under `mutex` (OS threads) or on the
// one scheduler thread (fibers).
struct Block {
  int n = 0, live = 0, at_barrier = 0, at_shfl = 0, exited = 0;
  std::vector<Lane> lanes;
  std::vector<int> warp_waiting, warp_exited;  // per warp: lanes waiting at a shuffle, lanes exited
  std::vector<Thread> threads;
  std::string error;
  bool os = false;
  std::mutex mutex;
  std::condition_variable cv;
  std::deque<int> ready;  // fibers: runnable threads, in order
  TsanClocks clocks;      // OS threads under ThreadSanitizer
  std::vector<int64_t> barriers_passed, shuffles_passed;  // per thread (its own entries only)
  int running = -1;       // fibers: the thread now running

  std::string thread_name(int t) const {
    std::ostringstream o;
    const Thread& th = threads[t];
    o << "thread (" << th.idx.x << "," << th.idx.y << "," << th.idx.z << ") [warp " << t / kWarp << " lane "
      << t % kWarp << "] of block (" << th.block_idx.x << "," << th.block_idx.y << "," << th.block_idx.z << ")";
    return o.str();
  }

  void fault(const std::string& msg) {
    if (error.empty()) error = msg;
    if (os) cv.notify_all();
  }

  void release(int t) {
    if (lanes[t].wait == Wait::kShfl) {
      --at_shfl;
      --warp_waiting[t / kWarp];
    }
    lanes[t].released = true;
    lanes[t].wait = Wait::kRunning;
    if (!os && t != running) ready.push_back(t);
  }

  // After any change: complete the barrier when every live thread waits at it, and report a block
  // in which every live thread waits but nothing can complete.
  void progress() {
    if (live > 0 && at_barrier == live) {
      int first = -1;
      for (int t = 0; t < n; ++t) {
        if (lanes[t].wait != Wait::kBarrier) continue;
        if (first < 0) {
          first = t;
        } else if (!same_site(lanes[t].site, lanes[first].site)) {
          fault("divergent __syncthreads: " + thread_name(t) + " waits at " + where(lanes[t].site) + " but " +
                thread_name(first) + " at " + where(lanes[first].site));
          return;
        }
      }
      at_barrier = 0;
      for (int t = 0; t < n; ++t)
        if (lanes[t].wait == Wait::kBarrier) release(t);
      if (os) cv.notify_all();
      return;
    }
    if (live > 0 && at_barrier + at_shfl == live) {
      std::ostringstream o;
      o << "deadlock: every live thread of the block waits and none can go on:";
      int shown = 0;
      for (int t = 0; t < n && shown < 8; ++t) {
        if (lanes[t].wait == Wait::kBarrier || lanes[t].wait == Wait::kShfl) {
          o << "\n  " << thread_name(t) << " at " << where(lanes[t].site);
          ++shown;
        }
      }
      fault(o.str());
    }
  }

  void arrive_barrier(int t, const Site& site) {
    Lane& l = lanes[t];
    l.wait = Wait::kBarrier;
    l.released = false;
    l.site = site;
    ++at_barrier;
    for (int u = 0; u < n && exited > 0; ++u) {
      if (lanes[u].wait == Wait::kExited) {
        fault(thread_name(t) + " waits at " + where(site) + " but " + thread_name(u) +
              " has exited without reaching it (a barrier must be reached by every thread of the block)");
        return;
      }
    }
    progress();
  }

  void arrive_shfl(int t, unsigned mask, uint64_t value, unsigned delta, int width, const Site& site) {
    Lane& l = lanes[t];
    l.wait = Wait::kShfl;
    l.released = false;
    l.site = site;
    l.mask = mask;
    l.delta = delta;
    l.width = width;
    l.value = value;
    const int warp = t / kWarp, lane = t % kWarp, base = warp * kWarp;
    ++at_shfl;
    ++warp_waiting[warp];
    if (!(mask >> lane & 1u)) {
      fault(thread_name(t) + " calls " + where(site) + " with a mask that does not name it");
      return;
    }
    if (width <= 0 || width > kWarp || (width & (width - 1)) != 0) {
      fault(where(site) + ": width " + std::to_string(width) + " is not a power of two <= 32");
      return;
    }
    const int named = __builtin_popcount(mask);
    if (warp_waiting[warp] < named && warp_exited[warp] == 0 && base + kWarp <= n) {
      progress();  // not every lane has arrived yet
      return;
    }
    bool all = true;
    for (int k = 0; k < kWarp; ++k) {
      if (!(mask >> k & 1u)) continue;
      const int u = base + k;
      if (u >= n) {
        fault(where(site) + ": the mask names lane " + std::to_string(k) + ", which the block (" + std::to_string(n) +
              " threads) does not have");
        return;
      }
      if (lanes[u].wait == Wait::kExited) {
        fault(thread_name(t) + " waits at " + where(site) + " but " + thread_name(u) +
              ", named in the mask, has exited (inactive lane)");
        return;
      }
      if (lanes[u].wait != Wait::kShfl) all = false;
    }
    if (!all) {
      progress();
      return;
    }
    for (int k = 0; k < kWarp; ++k) {
      if (!(mask >> k & 1u)) continue;
      const Lane& o = lanes[base + k];
      if (!same_site(o.site, site) || o.mask != mask || o.width != width) {
        fault("divergent warp: " + thread_name(base + k) + " waits at " + where(o.site) + " but " + thread_name(t) +
              " at " + where(site) + " (masks " + std::to_string(o.mask) + ", " + std::to_string(mask) + ")");
        return;
      }
    }
    // __shfl_down_sync: lane k reads lane k + delta of its width-segment, or keeps its own value
    // when that lies outside the segment.
    for (int k = 0; k < kWarp; ++k) {
      if (!(mask >> k & 1u)) continue;
      Lane& o = lanes[base + k];
      const int src = k + static_cast<int>(o.delta);
      if ((k % width) + static_cast<int>(o.delta) < width) {
        if (!(mask >> src & 1u)) {
          fault(where(site) + ": lane " + std::to_string(k) + " reads lane " + std::to_string(src) +
                ", which is not in the mask (undefined value)");
          return;
        }
        o.result = lanes[base + src].value;
      } else {
        o.result = o.value;
      }
    }
    for (int k = 0; k < kWarp; ++k)
      if (mask >> k & 1u) release(base + k);
    if (os) cv.notify_all();
  }

  void exit(int t) {
    lanes[t].wait = Wait::kExited;
    --live;
    ++exited;
    ++warp_exited[t / kWarp];
    if (at_barrier == 0 && warp_waiting[t / kWarp] == 0) {
      progress();
      return;
    }
    for (int u = 0; u < n; ++u) {
      const Lane& o = lanes[u];
      if (o.wait == Wait::kBarrier) {
        fault(thread_name(t) + " exited while " + thread_name(u) + " waits at " + where(o.site));
        return;
      }
      if (o.wait == Wait::kShfl && u / kWarp == t / kWarp && (o.mask >> (t % kWarp) & 1u)) {
        fault(thread_name(t) + " exited while " + thread_name(u) + " waits for it at " + where(o.site) +
              " (divergent shuffle)");
        return;
      }
    }
    progress();
  }
};

thread_local Block* tls_block = nullptr;

// --- fibers ----------------------------------------------------------------------------------------

struct StackPool {
  char* base = nullptr;
  size_t count = 0;
  size_t stride = 0;
  char* stack(size_t i) {
    if (base == nullptr) {
      const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
      stride = kStackBytes + page;
      count = 1024;
      void* p = mmap(nullptr, stride * count, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                     -1, 0);
      if (p == MAP_FAILED) throw std::runtime_error("bnext_simt: cannot map fiber stacks");
      base = static_cast<char*>(p);
      for (size_t k = 0; k < count; ++k) mprotect(base + k * stride, page, PROT_NONE);  // guard page
    }
    const size_t page = stride - kStackBytes;
    return base + i * stride + page;  // see make_context: the top is staggered
  }
};

StackPool g_stacks;
void (*g_body)(void*) = nullptr;
void* g_ctx = nullptr;
void fiber_main();

// Context switches. On x86-64 a fiber switch saves the callee-saved registers on the old stack and
// swaps stack pointers (glibc's swapcontext also saves the signal mask with a system call and the
// FP environment on every switch, which made the emulation several times slower); the kernels never
// change the rounding mode, so the x87/SSE control words need no saving. Elsewhere ucontext.
#if defined(__x86_64__)
extern "C" void bnext_simt_swap(void** save_sp, void* load_sp);
asm(R"(
  .text
  .p2align 4
  .type bnext_simt_swap, @function
bnext_simt_swap:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size bnext_simt_swap, .-bnext_simt_swap
)");

struct Context {
  void* sp = nullptr;
};
Context g_scheduler;
std::vector<Context> g_contexts;

// A fresh stack whose first switch "returns" into fiber_main with the ABI's alignment.
void make_context(Context& c, char* stack, size_t size) {
  // Stacks are a multiple of the page size apart: without a stagger every fiber's top frames would
  // map to the same cache sets, and switching fibers would evict the previous one's.
  const size_t stagger = (reinterpret_cast<uintptr_t>(stack) / (kStackBytes + 4096) % 61) * 64;
  uint64_t* top = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(stack + size - stagger) & ~uintptr_t(15));
  *--top = 0;                                                  // fiber_main's (absent) return address
  *--top = reinterpret_cast<uint64_t>(&fiber_main);            // where bnext_simt_swap returns
  for (int r = 0; r < 6; ++r) *--top = 0;                      // rbp rbx r12 r13 r14 r15
  c.sp = top;
}
void switch_context(Context& from, Context& to) { bnext_simt_swap(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};
Context g_scheduler;
std::vector<Context> g_contexts;
void make_context(Context& c, char* stack, size_t size) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, fiber_main, 0);
}
void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

void run_thread_body(Block& b, int t) {
  try {
    g_body(g_ctx);
  } catch (const Abort&) {
    return;
  } catch (const std::exception& e) {
    const std::string what = b.thread_name(t) + ": " + e.what();
    HiddenFromTsan hidden;
    std::unique_lock<std::mutex> lock(b.mutex, std::defer_lock);
    if (b.os) lock.lock();
    b.fault(what);
    return;
  }
}

void fiber_main() {
  Block& b = *tls_block;
  const int t = b.running;
  run_thread_body(b, t);
  if (b.error.empty()) b.exit(t);
  switch_context(g_contexts[t], g_scheduler);  // never resumed
  __builtin_unreachable();
}

void wait_released(Block& b, int t) {
  if (b.os) {
    std::unique_lock<std::mutex> lock(b.mutex, std::adopt_lock);
    b.cv.wait(lock, [&] { return b.lanes[t].released || !b.error.empty(); });
    if (!b.lanes[t].released) throw Abort{};  // unlocks
    lock.release();
    return;
  }
  if (b.lanes[t].released) return;  // this thread completed the exchange: no switch needed
  switch_context(g_contexts[t], g_scheduler);  // resumed once released
}

void run_block_fibers(Block& b) {
  g_contexts.resize(b.n);
  for (int t = 0; t < b.n; ++t) {
    make_context(g_contexts[t], g_stacks.stack(t), kStackBytes);
    b.ready.push_back(t);
  }
  while (!b.ready.empty() && b.error.empty()) {
    const int t = b.ready.front();
    b.ready.pop_front();
    b.running = t;
    tls_thread = &b.threads[t];
    switch_context(g_scheduler, g_contexts[t]);
  }
  b.running = -1;
  tls_thread = nullptr;
  if (b.error.empty() && b.live > 0) b.fault("bnext_simt: scheduler stopped with live threads (emulator bug)");
}

// --- OS threads ------------------------------------------------------------------------------------

void run_block_os(Block& b) {
  std::vector<std::thread> workers;
  workers.reserve(b.n);
  for (int t = 0; t < b.n; ++t) {
    workers.emplace_back([&b, t] {
      tls_thread = &b.threads[t];
      tls_block = &b;
      run_thread_body(b, t);
      HiddenFromTsan hidden;
      std::lock_guard<std::mutex> lock(b.mutex);
      if (b.error.empty()) b.exit(t);
    });
  }
  for (auto& w : workers) w.join();
}

std::string dims(dim3 d) {
  std::ostringstream o;
  o << "(" << d.x << ", " << d.y << ", " << d.z << ")";
  return o.str();
}

}  // namespace

Thread* current_thread() { return tls_thread; }

void syncthreads(const Site& site) {
  Block& b = *tls_block;
  const int t = tls_thread->tid;
  if (!b.os) {
    b.arrive_barrier(t, site);
    wait_released(b, t);
    return;
  }
  char* clock = &b.clocks.barrier[b.barriers_passed[t]++ % 2];
  if (__tsan_release) __tsan_release(clock);
  {
    HiddenFromTsan hidden;
    b.mutex.lock();
    b.arrive_barrier(t, site);
    wait_released(b, t);
    b.mutex.unlock();
  }
  if (__tsan_acquire) __tsan_acquire(clock);
}

uint64_t shfl_down_bits(unsigned mask, uint64_t bits, unsigned delta, int width, const Site& site) {
  Block& b = *tls_block;
  const int t = tls_thread->tid;
  if (!b.os) {
    b.arrive_shfl(t, mask, bits, delta, width, site);
    wait_released(b, t);
    return b.lanes[t].result;
  }
  char* clock = &b.clocks.warp[2 * (t / kWarp) + b.shuffles_passed[t]++ % 2];
  if (__tsan_release) __tsan_release(clock);
  uint64_t r;
  {
    HiddenFromTsan hidden;
    b.mutex.lock();
    b.arrive_shfl(t, mask, bits, delta, width, site);
    wait_released(b, t);
    r = b.lanes[t].result;
    b.mutex.unlock();
  }
  if (__tsan_acquire) __tsan_acquire(clock);
  return r;
}

void device_assert_failed(const char* cond, const char* msg, const char* file, int line) {
  std::ostringstream o;
  o << "device-side assertion `" << cond << "` failed at " << file << ":" << line << ": " << msg;
  throw std::runtime_error(o.str());
}

void set_sm_count(int sms) {
  if (sms < 1) throw std::invalid_argument("bnext_simt: the SM count must be >= 1");
  g_sms = sms;
}
int sm_count() { return g_sms; }
cudaStream_t current_stream() { return kCurrentStream; }

void set_mode(const std::string& mode) {
#ifdef BNEXT_SIMT_TSAN
  if (mode != "os") throw std::invalid_argument("bnext_simt: a ThreadSanitizer build runs OS threads only");
#endif
  if (mode != "fiber" && mode != "os") throw std::invalid_argument("bnext_simt: mode is 'fiber' or 'os', got " + mode);
  g_os_threads = mode == "os";
}
std::string mode() { return g_os_threads ? "os" : "fiber"; }

LaunchStats& launch_stats() { return g_stats; }

void launch_checked() { g_unchecked = false; }

void run_grid(dim3 grid, dim3 block, size_t param_bytes, size_t shared_bytes, cudaStream_t stream,
              void (*body)(void*), void* ctx) {
  std::lock_guard<std::mutex> guard(g_launch_mutex);
  auto fail = [&](const std::string& why) {
    g_unchecked = false;
    throw std::runtime_error("bnext_simt: launch of grid " + dims(grid) + ", block " + dims(block) + ": " + why);
  };
  if (g_unchecked) fail("the previous launch was not followed by C10_CUDA_KERNEL_LAUNCH_CHECK()");
  // Limits of compute capability 9.0 (CUDA C++ Programming Guide, "Technical Specifications per
  // Compute Capability"), and the 4 KB parameter limit the kernels are written for.
  if (grid.x < 1 || grid.y < 1 || grid.z < 1) fail("a grid dimension is 0 (invalid configuration)");
  if (grid.x > 2147483647u) fail("grid.x > 2^31 - 1");
  if (grid.y > 65535u || grid.z > 65535u) fail("grid.y or grid.z > 65535");
  if (block.x < 1 || block.y < 1 || block.z < 1) fail("a block dimension is 0");
  if (block.x > 1024u || block.y > 1024u || block.z > 64u) fail("block dimension over (1024, 1024, 64)");
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  if (threads > 1024u) fail("more than 1024 threads per block");
  if (param_bytes > kMaxParamBytes) fail("kernel parameters take " + std::to_string(param_bytes) + " bytes (> 4 KB)");
  if (shared_bytes != 0) fail("dynamic shared memory is not used by csrc/cuda (emulator has none)");
  if (stream != kCurrentStream) fail("not launched on the current stream (c10::cuda::getCurrentCUDAStream())");

  g_stats.launches += 1;
  g_stats.max_grid_x = std::max<int64_t>(g_stats.max_grid_x, grid.x);
  g_stats.max_grid_y = std::max<int64_t>(g_stats.max_grid_y, grid.y);
  g_body = body;
  g_ctx = ctx;
  const int n = static_cast<int>(threads);
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block b;
        b.n = b.live = n;
        b.os = g_os_threads;
        b.lanes.resize(n);
        b.warp_waiting.assign((n + kWarp - 1) / kWarp, 0);
        b.warp_exited.assign((n + kWarp - 1) / kWarp, 0);
        if (b.os) {
          b.clocks.warp.assign(2 * ((n + kWarp - 1) / kWarp), 0);
          b.barriers_passed.assign(n, 0);
          b.shuffles_passed.assign(n, 0);
        }
        b.threads.resize(n);
        for (int t = 0; t < n; ++t) {
          Thread& th = b.threads[t];
          th.idx = uint3{static_cast<unsigned>(t) % block.x, static_cast<unsigned>(t) / block.x % block.y,
                         static_cast<unsigned>(t) / (block.x * block.y)};
          th.block_idx = uint3{bx, by, bz};
          th.block_dim = block;
          th.grid_dim = grid;
          th.tid = t;
        }
        tls_block = &b;
        if (b.os) run_block_os(b);
        else run_block_fibers(b);
        tls_block = nullptr;
        g_stats.blocks += 1;
        g_stats.threads += n;
        if (!b.error.empty()) fail(b.error);
      }
    }
  }
  g_unchecked = true;
}

}  // namespace bnext_simt

// Host emulation of the CUDA execution model, enough to run the kernels of
// csrc/cuda as C++ on the CPU (tests/test_cuda_host.py). Every GPU thread of
// a block (or of a thread-block cluster) is a fiber with a stack of its own,
// all run on the calling thread by a cooperative scheduler: a thread runs
// until it waits at __syncthreads, a warp shuffle or a cluster barrier, and
// the barrier's last arrival makes every waiter runnable again. Fibers, not
// OS threads (what this did first): a kernel context switch per thread and
// barrier made the AKL search of one 32000-entry row take seconds
// (benchmarks/NOTES.md). The schedule is deterministic, and a barrier some
// thread never reaches is reported, not a hang.
//
// TODI_EXT_HOST_OS_THREADS: every GPU thread a real std::thread and every
// barrier a std::barrier, for the ThreadSanitizer build (TODI_EXT_HOST_SANITIZE
// =thread in tests/test_cuda_host.py), which finds shared-memory races the
// fixed schedule can hide. Shared memory is one arena per block at the same
// offsets in every block, so map_shared_rank is pointer arithmetic. Included
// by the kernel header only when TODI_EXT_HOST_EMULATION is defined; never
// part of the real extension.
#pragma once

#ifndef TODI_EXT_HOST_EMULATION
#error "host_emulation.h is for the host test harness only"
#endif

#include <cuda_bf16.h>  // host-compilable conversions; also uint4, dim3 (vector_types.h)
#include <cuda_fp16.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

// The fibers' context switch below is System V x86-64 code (ELF, 64-bit pointers).
#if !(defined(__x86_64__) && defined(__LP64__) && defined(__linux__)) && !defined(TODI_EXT_HOST_OS_THREADS)
#define TODI_EXT_HOST_OS_THREADS
#endif

#ifdef TODI_EXT_HOST_OS_THREADS
#include <barrier>
#include <thread>
#else
#include <sys/mman.h>

#include <deque>
#include <exception>
#endif

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

namespace todi_host {

constexpr int kWarpSize = 32;
constexpr size_t kStaticSharedBytes = 16 * 1024;  // per block, after the dynamic part

struct Cluster;

struct ThreadState {
  Cluster* cluster = nullptr;
  unsigned rank = 0;           // block rank in the cluster
  size_t static_offset = 0;    // next static shared array
};

inline thread_local ThreadState state;

// Which ready thread runs next. Oldest first (thread 0 first; after a
// barrier, its last arrival and then the others in arrival order) moves the
// threads in lockstep and hides a missing barrier after a read of shared
// memory that the next phase overwrites; newest first (the highest thread
// first) runs one thread far ahead and shows it, and the reverse for a read
// before the barrier that orders it. The tests run every kernel under both.
// OS threads have no order: they ignore it.
enum class Order { kOldestFirst, kNewestFirst };
inline Order schedule_order = Order::kOldestFirst;

#ifdef TODI_EXT_HOST_OS_THREADS
using Barrier = std::barrier<>;
#else
// Saves the callee-saved registers and the FPU control words on the running
// stack, stores its pointer in *save and resumes the stack `next` (saved the
// same way, or made by new_fiber_stack). Not glibc's swapcontext: it saves
// the signal mask with a system call, which cost most of the time (NOTES).
extern "C" void todi_host_switch(void** save, void* next);
asm(R"(
  .pushsection .text
  .p2align 4
  .weak todi_host_switch
  .hidden todi_host_switch
  .type todi_host_switch, @function
todi_host_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size todi_host_switch, .-todi_host_switch
  .popsection
)");

// A stack that todi_host_switch resumes into entry(): what it pops (the FPU
// control words of now, six zero registers, entry as the return address).
// Entry starts with rsp + 8 16-byte aligned, as after a call.
inline void* new_fiber_stack(char* top, void (*entry)()) {
  auto* slot = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(top) & ~uintptr_t{15});
  *--slot = 0;  // entry never returns
  *--slot = reinterpret_cast<uint64_t>(entry);
  for (int i = 0; i < 6; ++i) *--slot = 0;
  --slot;
  uint32_t control[2];
  asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(control[0]), "=m"(control[1]));
  std::memcpy(slot, control, sizeof(control));
  return slot;
}

// A fiber: one emulated GPU thread's stack and identity.
struct Fiber {
  void* sp = nullptr;  // saved stack pointer while suspended
  ThreadState state;
  uint3 thread_idx{};
  uint3 block_idx{};
  bool done = false;
};

// Per launch: the body every fiber runs, the ready queue, the running fiber
// and an exception that escaped a kernel.
struct Scheduler {
  void (*body)(const void*) = nullptr;
  const void* body_arg = nullptr;
  std::deque<Fiber*> ready;
  Fiber* current = nullptr;
  void* launcher = nullptr;  // the launch's own stack: resumed when no fiber can run
  std::exception_ptr error;
};

inline thread_local Scheduler* scheduler = nullptr;

inline Scheduler& running_scheduler() {
  if (scheduler == nullptr) {
    std::fputs("todi_host: a barrier outside an emulated launch\n", stderr);
    std::abort();
  }
  return *scheduler;
}

inline void switch_to_next(Fiber* from);

class Barrier {
 public:
  explicit Barrier(std::ptrdiff_t expected) : expected_(expected) {}
  void arrive_and_wait() {
    Scheduler& s = running_scheduler();
    if (static_cast<std::ptrdiff_t>(waiting_.size()) + 1 < expected_) {
      waiting_.push_back(s.current);
      switch_to_next(s.current);
      return;
    }
    // The last arrival goes on; the others are ready in arrival order.
    for (Fiber* f : waiting_) s.ready.push_back(f);
    waiting_.clear();
  }

 private:
  std::ptrdiff_t expected_;
  std::vector<Fiber*> waiting_;
};
#endif

struct Warp {
  Barrier barrier{kWarpSize};
  double lanes[kWarpSize] = {};
};

struct Block {
  std::vector<unsigned char> arena;  // dynamic shared memory, then the static arrays
  size_t dynamic_bytes = 0;
  std::unique_ptr<Barrier> barrier;
  std::vector<std::unique_ptr<Warp>> warps;
};

struct Cluster {
  std::vector<Block> blocks;
  std::unique_ptr<Barrier> barrier;
};

inline Block& block() { return state.cluster->blocks[state.rank]; }

}  // namespace todi_host

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

inline void __syncthreads() { todi_host::block().barrier->arrive_and_wait(); }

[[noreturn]] inline void __trap() { std::abort(); }

template <class T>
T __shfl_xor_sync(unsigned /*mask*/, T value, int offset) {
  static_assert(sizeof(T) <= sizeof(double), "shuffled values fit a double");
  todi_host::Warp& w = *todi_host::block().warps[threadIdx.x / todi_host::kWarpSize];
  const unsigned lane = threadIdx.x % todi_host::kWarpSize;
  std::memcpy(&w.lanes[lane], &value, sizeof(T));
  w.barrier.arrive_and_wait();
  T out;
  std::memcpy(&out, &w.lanes[lane ^ static_cast<unsigned>(offset)], sizeof(T));
  w.barrier.arrive_and_wait();  // nobody overwrites a lane before every lane has read
  return out;
}

namespace todi_host {

// The static __shared__ arrays of the kernel, in declaration order: every
// thread asks for them in the same order and gets the same addresses.
template <class T>
T* static_shared(size_t count) {
  Block& b = block();
  size_t offset = (b.dynamic_bytes + state.static_offset + 15) / 16 * 16;
  const size_t end = offset + count * sizeof(T);
  if (end > b.arena.size()) std::abort();
  state.static_offset = end - b.dynamic_bytes;
  return reinterpret_cast<T*>(b.arena.data() + offset);
}

inline unsigned char* dynamic_shared() { return block().arena.data(); }

#ifdef TODI_EXT_HOST_OS_THREADS
// Runs body() as every thread of the cluster, each a std::thread.
template <class Body>
void run_cluster(Cluster& cluster, unsigned first_block, unsigned grid, unsigned threads, const Body& body) {
  std::vector<std::thread> pool;
  const unsigned parts = static_cast<unsigned>(cluster.blocks.size());
  pool.reserve(parts * threads);
  for (unsigned r = 0; r < parts; ++r) {
    for (unsigned t = 0; t < threads; ++t) {
      pool.emplace_back([&, r, t] {
        state = ThreadState{&cluster, r, 0};
        threadIdx = uint3{t, 0, 0};
        blockIdx = uint3{first_block + r, 0, 0};
        blockDim = dim3(threads);
        gridDim = dim3(grid);
        body();
      });
    }
  }
  for (auto& th : pool) th.join();
}
#else
// Makes f the running fiber: its identity becomes the thread's.
inline void enter(Fiber* f) {
  scheduler->current = f;
  state = f->state;
  threadIdx = f->thread_idx;
  blockIdx = f->block_idx;
}

inline Fiber* take_next(Scheduler& s) {
  Fiber* next;
  if (schedule_order == Order::kOldestFirst) {
    next = s.ready.front();
    s.ready.pop_front();
  } else {
    next = s.ready.back();
    s.ready.pop_back();
  }
  return next;
}

// Suspends `from` (waiting at a barrier, or done) and runs the next ready
// fiber, or returns to the launch when none is ready.
inline void switch_to_next(Fiber* from) {
  Scheduler& s = *scheduler;
  from->state = state;
  if (s.ready.empty()) {
    s.current = nullptr;
    todi_host_switch(&from->sp, s.launcher);
    return;
  }
  Fiber* next = take_next(s);
  enter(next);
  todi_host_switch(&from->sp, next->sp);
}

inline void fiber_main() {
  Scheduler& s = *scheduler;
  try {
    s.body(s.body_arg);
  } catch (...) {  // unwinding cannot leave a fiber: the launch rethrows it
    if (!s.error) s.error = std::current_exception();
  }
  Fiber* self = s.current;
  self->done = true;
  switch_to_next(self);  // never resumed
  std::abort();
}

// Room for a kernel's frames at -O1 and the libm calls under them; the guard
// below each stack (wider than any frame of these kernels) turns an overflow
// into a fault, not a write into the neighbouring fiber's stack.
constexpr size_t kFiberStackBytes = 256 * 1024;
constexpr size_t kGuardBytes = 64 * 1024;

// The fibers' stacks, one mapping, unmapped however the launch ends.
class FiberStacks {
 public:
  explicit FiberStacks(size_t count) : bytes_(count * (kFiberStackBytes + kGuardBytes)) {
    base_ = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK,
                 -1, 0);
    if (base_ == MAP_FAILED) throw std::runtime_error("todi_host::launch: no memory for the fiber stacks");
    for (size_t i = 0; i < count; ++i) {
      if (mprotect(static_cast<char*>(base_) + i * (kFiberStackBytes + kGuardBytes), kGuardBytes, PROT_NONE) != 0) {
        munmap(base_, bytes_);
        throw std::runtime_error("todi_host::launch: cannot place the fiber stacks' guard pages");
      }
    }
  }
  ~FiberStacks() { munmap(base_, bytes_); }
  FiberStacks(const FiberStacks&) = delete;
  FiberStacks& operator=(const FiberStacks&) = delete;
  char* top(size_t i) const { return static_cast<char*>(base_) + (i + 1) * (kFiberStackBytes + kGuardBytes); }

 private:
  size_t bytes_;
  void* base_;
};

// Runs body() as every thread of the cluster, each a fiber, until all have
// returned; a barrier that some thread never reaches is an error.
template <class Body>
void run_cluster(Cluster& cluster, unsigned first_block, unsigned grid, unsigned threads, const Body& body) {
  if (scheduler != nullptr) throw std::logic_error("todi_host::launch: a launch inside a launch");
  const unsigned parts = static_cast<unsigned>(cluster.blocks.size());
  const size_t count = size_t{parts} * threads;
  const FiberStacks stacks(count);
  std::vector<Fiber> fibers(count);
  Scheduler sched;
  sched.body = [](const void* b) { (*static_cast<const Body*>(b))(); };
  sched.body_arg = &body;
  for (size_t i = 0; i < count; ++i) {
    Fiber& f = fibers[i];
    f.sp = new_fiber_stack(stacks.top(i), fiber_main);
    const unsigned r = static_cast<unsigned>(i / threads), t = static_cast<unsigned>(i % threads);
    f.state = ThreadState{&cluster, r, 0};
    f.thread_idx = uint3{t, 0, 0};
    f.block_idx = uint3{first_block + r, 0, 0};
    sched.ready.push_back(&f);
  }
  scheduler = &sched;
  blockDim = dim3(threads);
  gridDim = dim3(grid);
  Fiber* first = take_next(sched);
  enter(first);
  todi_host_switch(&sched.launcher, first->sp);
  scheduler = nullptr;
  if (sched.error) std::rethrow_exception(sched.error);
  size_t stuck = 0;
  for (const Fiber& f : fibers) stuck += !f.done;
  if (stuck != 0) {
    throw std::runtime_error("todi_host::launch: " + std::to_string(stuck) + " of " + std::to_string(count) +
                             " threads wait at a barrier that the others never reach");
  }
}
#endif

// Runs kernel(args...) over grid x block threads, `parts` blocks to a cluster
// (1: no clusters), one cluster at a time.
template <class Kernel, class... Args>
void launch(Kernel kernel, unsigned grid, unsigned threads, size_t dynamic_bytes, unsigned parts,
            const Args&... args) {
  if (threads % kWarpSize != 0 || threads == 0 || parts == 0 || grid % parts != 0) {
    throw std::invalid_argument("todi_host::launch: bad configuration");
  }
  const auto body = [&] { kernel(args...); };
  for (unsigned first = 0; first < grid; first += parts) {
    Cluster cluster;
    cluster.blocks.resize(parts);
    cluster.barrier = std::make_unique<Barrier>(static_cast<std::ptrdiff_t>(parts * threads));
    for (Block& b : cluster.blocks) {
      // Filled with a pattern, not zeros: a kernel reading shared memory it never wrote sees garbage.
      b.arena.assign(dynamic_bytes + kStaticSharedBytes, 0xA5);
      b.dynamic_bytes = (dynamic_bytes + 15) / 16 * 16;
      b.barrier = std::make_unique<Barrier>(static_cast<std::ptrdiff_t>(threads));
      for (unsigned w = 0; w < threads / kWarpSize; ++w) b.warps.push_back(std::make_unique<Warp>());
    }
    run_cluster(cluster, first, grid, threads, body);
  }
}

}  // namespace todi_host

namespace cooperative_groups {
struct cluster_group {
  unsigned num_blocks() const { return static_cast<unsigned>(todi_host::state.cluster->blocks.size()); }
  unsigned block_rank() const { return todi_host::state.rank; }
  void sync() const { todi_host::state.cluster->barrier->arrive_and_wait(); }
  template <class T>
  T* map_shared_rank(T* p, unsigned rank) const {
    const auto& mine = todi_host::block().arena;
    const auto offset = reinterpret_cast<const unsigned char*>(p) - mine.data();
    return reinterpret_cast<T*>(todi_host::state.cluster->blocks.at(rank).arena.data() + offset);
  }
};
inline cluster_group this_cluster() { return {}; }
}  // namespace cooperative_groups

#define TODI_SHARED_ARRAY(type, name, count) type* name = todi_host::static_shared<type>(count)
#define TODI_DYNAMIC_SHARED(name) unsigned char* name = todi_host::dynamic_shared()

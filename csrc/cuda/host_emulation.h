// Host emulation of the CUDA execution model, enough to run
// streamed_kernel.cuh as C++ on the CPU (tests/test_cuda_host.py): every
// GPU thread of a block (or of a thread-block cluster) is a real std::thread;
// __syncthreads, warp shuffles and cluster barriers are std::barriers; shared
// memory is one arena per block at the same offsets in every block, so
// map_shared_rank is pointer arithmetic. Included by the kernel header only
// when TODI_EXT_HOST_EMULATION is defined; never part of the real extension.
#pragma once

#ifndef TODI_EXT_HOST_EMULATION
#error "host_emulation.h is for the host test harness only"
#endif

#include <cuda_bf16.h>  // host-compilable conversions; also uint4, dim3 (vector_types.h)
#include <cuda_fp16.h>

#include <barrier>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <thread>
#include <vector>

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

namespace todi_host {

constexpr int kWarpSize = 32;
constexpr size_t kStaticSharedBytes = 16 * 1024;  // per block, after the dynamic part

struct Warp {
  std::barrier<> barrier{kWarpSize};
  double lanes[kWarpSize] = {};
};

struct Block {
  std::vector<unsigned char> arena;  // dynamic shared memory, then the static arrays
  size_t dynamic_bytes = 0;
  std::unique_ptr<std::barrier<>> barrier;
  std::vector<std::unique_ptr<Warp>> warps;
};

struct Cluster {
  std::vector<Block> blocks;
  std::unique_ptr<std::barrier<>> barrier;
};

struct ThreadState {
  Cluster* cluster = nullptr;
  unsigned rank = 0;           // block rank in the cluster
  size_t static_offset = 0;    // next static shared array
};

inline thread_local ThreadState state;

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

// Runs kernel(args...) over grid x block threads, `parts` blocks to a cluster
// (1: no clusters), one cluster at a time.
template <class Kernel, class... Args>
void launch(Kernel kernel, unsigned grid, unsigned threads, size_t dynamic_bytes, unsigned parts,
            const Args&... args) {
  if (threads % kWarpSize != 0 || threads == 0 || parts == 0 || grid % parts != 0) {
    throw std::invalid_argument("todi_host::launch: bad configuration");
  }
  for (unsigned first = 0; first < grid; first += parts) {
    Cluster cluster;
    cluster.blocks.resize(parts);
    cluster.barrier = std::make_unique<std::barrier<>>(static_cast<std::ptrdiff_t>(parts * threads));
    for (Block& b : cluster.blocks) {
      // Filled with a pattern, not zeros: a kernel reading shared memory it never wrote sees garbage.
      b.arena.assign(dynamic_bytes + kStaticSharedBytes, 0xA5);
      b.dynamic_bytes = (dynamic_bytes + 15) / 16 * 16;
      b.barrier = std::make_unique<std::barrier<>>(static_cast<std::ptrdiff_t>(threads));
      for (unsigned w = 0; w < threads / kWarpSize; ++w) b.warps.push_back(std::make_unique<Warp>());
    }
    std::vector<std::thread> pool;
    pool.reserve(parts * threads);
    for (unsigned r = 0; r < parts; ++r) {
      for (unsigned t = 0; t < threads; ++t) {
        pool.emplace_back([&, r, t] {
          state = ThreadState{&cluster, r, 0};
          threadIdx = uint3{t, 0, 0};
          blockIdx = uint3{first + r, 0, 0};
          blockDim = dim3(threads);
          gridDim = dim3(grid);
          kernel(args...);
        });
      }
    }
    for (auto& th : pool) th.join();
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

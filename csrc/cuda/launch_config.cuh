// Launch configuration shared by the CUDA translation units: threads per
// row, grid size, the device's opt-in shared memory and the per-kernel
// attribute that unlocks it. Host code only.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "todi_cuda_kernel.cuh"

namespace todi_ext::cuda {

// TODI_EXT_CUDA_MAX_THREADS: the largest forward block (default 512; up to
// 1024 for float-accumulating kernels), for A/B runs.
inline int forward_max_threads(bool double_math) {
  static const int requested = [] {
    const char* v = std::getenv("TODI_EXT_CUDA_MAX_THREADS");
    return v == nullptr ? kMaxThreads : std::atoi(v);
  }();
  const int cap = double_math ? kMaxThreads : 2 * kMaxThreads;
  return std::max(kWarp, std::min(requested, cap));
}

// Threads per row: about 16 entries per thread, 32..max_threads (a power of 2). (Untuned: see README.md.)
inline int threads_for(int64_t vocab, int max_threads = kMaxThreads) {
  int threads = kWarp;
  while (threads * 2 <= max_threads && threads * 16 < vocab) threads *= 2;
  return threads;
}

inline unsigned grid_for(int64_t rows) { return static_cast<unsigned>(std::min<int64_t>(rows, INT_MAX)); }

// Whether an A/B switch (environment variable, read once) is set to "1".
inline bool opted_in(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, "1") == 0;
}

// TODI_EXT_CUDA_ROW_CACHE=1 keeps rows that fit one block's shared memory
// there for passes 2-3. Off by default: its 1 block per SM (25% occupancy)
// cost more than re-reading rows that L2 still holds, on an H200 at
// bf16 8192 x 32000: 1.47 ms cached vs 1.06 ms streamed (benchmarks/NOTES.md).
inline bool row_cache_allowed() {
  static const bool allowed = opted_in("TODI_EXT_CUDA_ROW_CACHE");
  return allowed;
}

constexpr int kMaxDevices = 64;

inline void check_device_index(int device) {
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "todi_ext: device index ", device, " out of range");
}

// Dynamic shared memory a row cache may take on this device.
inline int max_dynamic_smem(int device) {
  static std::array<int, kMaxDevices> cached{};  // 0: not queried yet
  check_device_index(device);
  if (cached[device] == 0) {
    int bytes = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    cached[device] = bytes - 4 * 1024;  // leave room for the static reduction scratch (<= 15 x 32 doubles)
  }
  return cached[device];
}

// Raises a kernel's dynamic shared-memory limit to the device's maximum,
// once per kernel and device: the first call may not happen inside CUDA graph
// capture of a cold process, and repeating it would be wasted host work. The
// kernel is a template argument, not a function-pointer parameter, so every
// kernel gets its own flags (all instantiations share one pointer type).
template <auto Kernel>
void allow_max_dynamic_smem(int device) {
  static std::array<std::once_flag, kMaxDevices> once;
  check_device_index(device);
  std::call_once(once[device], [&] {
    C10_CUDA_CHECK(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, max_dynamic_smem(device)));
  });
}

// TODI_EXT_CUDA_SPLIT_ROWS=1 splits rows too long for one block's shared
// memory over a cluster, each block caching its slice, instead of streaming
// them. Off by default: slower on an H200 (bf16 8192 x 128256: 6.52-7.21 ms
// split vs 4.02 ms streamed, benchmarks/NOTES.md).
inline bool split_rows_allowed() {
  static const bool allowed = opted_in("TODI_EXT_CUDA_SPLIT_ROWS");
  return allowed;
}

// Whether a cluster launch of Kernel with this configuration can run at all
// on the device (thread-block clusters need sm_90; a cluster's blocks must
// fit its GPC), asked once per kernel, device and cluster size.
constexpr int kMaxClusterParts = 16;  // 16 is above the portable 8: opted in per kernel

template <auto Kernel>
bool cluster_launchable(int device, const cudaLaunchConfig_t& config, int parts) {
  static std::array<std::array<std::atomic<int8_t>, 5>, kMaxDevices> known{};  // 0 unknown, 1 yes, 2 no
  check_device_index(device);
  int slot = 0;
  while ((2 << slot) < parts) ++slot;
  std::atomic<int8_t>& entry = known[device][slot];
  if (entry.load() == 0) {
    int major = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    int clusters = 0;
    if (major >= 9) {
      allow_max_dynamic_smem<Kernel>(device);
      if (parts > 8) C10_CUDA_CHECK(cudaFuncSetAttribute(Kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
      if (cudaOccupancyMaxActiveClusters(&clusters, Kernel, &config) != cudaSuccess) {
        (void)cudaGetLastError();  // not launchable this way: clear the error, stream instead
        clusters = 0;
      }
    }
    entry.store(clusters > 0 ? 1 : 2);
  }
  return entry.load() == 1;
}

// Launches the forward kernel of divergence D for inputs of these dtypes.
// Defined in distill_forward_launch.cu, which CMake compiles once per
// divergence (TODI_EXT_DIVERGENCE) so the 80 kernels build in parallel.
template <math::Divergence D>
void launch_distill_forward(const ForwardParams& args, c10::ScalarType student_dtype, c10::ScalarType teacher_dtype,
                            int device, cudaStream_t stream);

}  // namespace todi_ext::cuda

// Launch configuration shared by the CUDA translation units: threads per
// row, grid size, whether a cluster launch places. Host code only.
#pragma once

#include <cuda_runtime.h>
#include <torch/csrc/stable/macros.h>  // STD_CUDA_CHECK (stable ABI)

#include <algorithm>
#include <array>
#include <atomic>
#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "register_rows_kernel.cuh"

namespace todi_ext::cuda {

// Threads per row of the streamed kernel: about 16 entries per thread,
// 32..512 (a power of 2). (Untuned: see README.md.)
inline int threads_for(int64_t vocab) {
  int threads = kWarp;
  while (threads * 2 <= kMaxThreads && threads * 16 < vocab) threads *= 2;
  return threads;
}

inline unsigned grid_for(int64_t rows) { return static_cast<unsigned>(std::min<int64_t>(rows, INT_MAX)); }

constexpr int kMaxDevices = 64;

inline void check_device_index(int device) {
  if (device < 0 || device >= kMaxDevices) {
    throw std::runtime_error("todi_ext: device index " + std::to_string(device) + " out of range");
  }
}

// Lets Kernel have `bytes` of dynamic shared memory (above the default 48
// KB: an opt-in per kernel and device), once per device.
template <auto Kernel>
void allow_register_row_smem(int device, size_t bytes) {
  static std::array<std::atomic<bool>, kMaxDevices> done{};
  check_device_index(device);
  if (done[device].load()) return;
  STD_CUDA_CHECK(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  done[device].store(true);
}

// Whether a cluster launch of Kernel with this configuration can run at all
// on the device (thread-block clusters need sm_90; a cluster's blocks must
// fit its GPC), asked once per kernel, device and cluster size (2-16).
template <auto Kernel>
bool cluster_launchable(int device, const cudaLaunchConfig_t& config, int parts) {
  static std::array<std::array<std::atomic<int8_t>, 4>, kMaxDevices> known{};  // 0 unknown, 1 yes, 2 no
  check_device_index(device);
  int slot = 0;
  while ((2 << slot) < parts) ++slot;
  std::atomic<int8_t>& entry = known[device][slot];
  if (entry.load() == 0) {
    int major = 0;
    STD_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    // The kernel's own code must have clusters too: a build with PTX for
    // sm_8x only, JIT-compiled on sm_90, has them compiled out.
    cudaFuncAttributes attributes{};
    STD_CUDA_CHECK(cudaFuncGetAttributes(&attributes, Kernel));
    int clusters = 0;
    if (major >= 9 && attributes.ptxVersion >= 90 && attributes.binaryVersion >= 90) {
      if (parts > 8) STD_CUDA_CHECK(cudaFuncSetAttribute(Kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
      if (cudaOccupancyMaxActiveClusters(&clusters, Kernel, &config) != cudaSuccess) {
        (void)cudaGetLastError();  // not launchable this way: clear the error, stream instead
        clusters = 0;
      }
    }
    entry.store(clusters > 0 ? 1 : 2);
  }
  return entry.load() == 1;
}

// Launches the forward kernel of divergence D for the params' input dtypes.
// Defined in distill_forward_launch.cu, which CMake compiles once per
// divergence (TODI_EXT_DIVERGENCE) so the 80 kernels build in parallel.
template <math::Divergence D>
void launch_distill_forward(const ForwardParams& args, int device, cudaStream_t stream);

// Launches one vocabulary-parallel phase's kernel (vocab_parallel_kernel) of
// divergence D on this rank's slice; same file.
template <math::Divergence D>
void launch_vocab_parallel(const ForwardParams& args, const VocabParallelParams& phase, cudaStream_t stream);

}  // namespace todi_ext::cuda

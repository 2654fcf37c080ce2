# Finds the installed torch through the Python interpreter instead of
# find_package(Torch): torch's CMake config insists on a full CUDA toolkit
# (nvrtc, cuBLAS, ...) whenever torch is a CUDA build, even for a CPU-only
# extension. We only need the headers, libtorch_cpu (+ libtorch_cuda) and the ABI flag.
#
# Sets: TORCH_VERSION, TORCH_CUDA_VERSION (empty for CPU torch),
#       TORCH_INCLUDE_DIRS, TORCH_LIBRARY_DIR, TORCH_CXX11_ABI,
#       and the interface targets todi_torch (headers) and todi_torch_stable
#       (stable-ABI code: the target version, libtorch_cpu).
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c
          "import os, torch; print(torch.__version__); print(torch.version.cuda or ''); print(os.path.dirname(torch.__file__)); print(int(torch._C._GLIBCXX_USE_CXX11_ABI))"
  OUTPUT_VARIABLE _torch_info
  RESULT_VARIABLE _torch_rc
  ERROR_VARIABLE _torch_err
  OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT _torch_rc EQUAL 0)
  message(FATAL_ERROR
    "todi_ext needs torch installed in the build's Python (${Python_EXECUTABLE}):\n${_torch_err}\n"
    "Install torch first, then build with: pip install --no-build-isolation .")
endif()
string(REPLACE "\n" ";" _torch_info "${_torch_info}")
list(GET _torch_info 0 TORCH_VERSION)
list(GET _torch_info 1 TORCH_CUDA_VERSION)
list(GET _torch_info 2 _torch_dir)
list(GET _torch_info 3 TORCH_CXX11_ABI)
set(TORCH_INCLUDE_DIRS "${_torch_dir}/include" "${_torch_dir}/include/torch/csrc/api/include")
set(TORCH_LIBRARY_DIR "${_torch_dir}/lib")
message(STATUS "todi_ext: torch ${TORCH_VERSION} (CUDA: '${TORCH_CUDA_VERSION}') at ${_torch_dir}")

# todi_torch: torch's headers (the CPU kernel copies use at::vec from them).
add_library(todi_torch INTERFACE)
target_include_directories(todi_torch SYSTEM INTERFACE ${TORCH_INCLUDE_DIRS})
target_compile_definitions(todi_torch INTERFACE _GLIBCXX_USE_CXX11_ABI=${TORCH_CXX11_ABI})

# todi_torch_stable: code on the LibTorch stable ABI. TORCH_TARGET_VERSION
# 2.10 makes the headers offer only what torch 2.10 has, so the modules load
# under every torch from 2.10 on; they call torch through its C shim, which
# libtorch_cpu exports (tests/test_build.py audits the symbols).
add_library(todi_torch_stable INTERFACE)
target_link_libraries(todi_torch_stable INTERFACE todi_torch)
target_compile_definitions(todi_torch_stable INTERFACE TORCH_TARGET_VERSION=0x020a000000000000)
find_library(_path_torch_cpu NAMES torch_cpu PATHS "${TORCH_LIBRARY_DIR}" NO_DEFAULT_PATH REQUIRED)
target_link_libraries(todi_torch_stable INTERFACE "${_path_torch_cpu}")

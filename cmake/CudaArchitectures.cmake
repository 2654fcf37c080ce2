# Turns TORCH_CUDA_ARCH_LIST (torch's convention: "8.0 8.6 9.0+PTX", ';' or
# ' ' separated, also read by torch's own extension builder) into
# CMAKE_CUDA_ARCHITECTURES. "X.Y" gives real sm_XY code only; "X.Y+PTX" adds
# PTX for newer GPUs to JIT. Default 9.0 (H100/H200): with no GPU present,
# detection would fall back to a long, slow list.
#
# Sets CMAKE_CUDA_ARCHITECTURES and TODI_EXT_CUDA_ARCH_NAMES (sm_90, compute_90, ...).
set(_list "$ENV{TORCH_CUDA_ARCH_LIST}")
if(_list STREQUAL "")
  set(_list "9.0")
endif()
string(REPLACE " " ";" _list "${_list}")
set(CMAKE_CUDA_ARCHITECTURES "")
set(TODI_EXT_CUDA_ARCH_NAMES "")
foreach(_arch IN LISTS _list)
  if(_arch STREQUAL "")
    continue()
  endif()
  if(NOT _arch MATCHES "^([0-9]+)\\.([0-9]+)([af]?)(\\+PTX)?$")
    message(FATAL_ERROR "TORCH_CUDA_ARCH_LIST: cannot read '${_arch}' (expected e.g. 8.6, 9.0a or 9.0+PTX)")
  endif()
  set(_sm "${CMAKE_MATCH_1}${CMAKE_MATCH_2}${CMAKE_MATCH_3}")
  if(CMAKE_MATCH_4)
    list(APPEND CMAKE_CUDA_ARCHITECTURES "${_sm}")
    list(APPEND TODI_EXT_CUDA_ARCH_NAMES "sm_${_sm}" "compute_${_sm}")
  else()
    list(APPEND CMAKE_CUDA_ARCHITECTURES "${_sm}-real")
    list(APPEND TODI_EXT_CUDA_ARCH_NAMES "sm_${_sm}")
  endif()
endforeach()

// Where row n of a (..., V) tensor starts, for any strides of the leading
// dimensions (the vocabulary dimension itself must have stride 1). Lets the
// kernels read sliced inputs such as logits[:, :-1] in place instead of
// copying them to contiguous memory. Host and device code.
#pragma once

#include <cstdint>

#include "todi_ext/divergence_math.h"  // TODI_HOST_DEVICE

namespace todi_ext {

struct RowLayout {
  static constexpr int kMaxDims = 8;
  int dims = 0;                    // leading dimensions
  int64_t sizes[kMaxDims] = {};    // outermost first
  int64_t strides[kMaxDims] = {};  // in elements

  // Element offset of the first entry of row `row` (row-major order of the
  // leading indices).
  TODI_HOST_DEVICE int64_t row_offset(int64_t row) const {
    int64_t offset = 0;
    for (int d = dims - 1; d >= 0; --d) {
      offset += (row % sizes[d]) * strides[d];
      row /= sizes[d];
    }
    return offset;
  }
};

}  // namespace todi_ext

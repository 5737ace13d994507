// Token layout arithmetic shared by the CPU ops: grouping items by key (a stable counting sort),
// the same contract as the CUDA layout kernels (csrc/ops/kernels/counting_sort.cu).
#pragma once

#include <cstdint>

namespace moe_ep::core {

// Stable counting sort of rows x width keys; item i = (r, s) has its key at
// keys[r * row_stride + s] (row_stride >= width: the keys may be columns of a wider table).
// offsets[num_keys + 1]: offsets[k] is the first sorted position of key k, offsets[num_keys]
// the number of items sorted. position[rows * width]: the sorted position of each item; items
// with equal keys keep their input order. Items whose key lies outside [0, num_keys) are
// skipped (position -1; -1 is how callers mark padding). Returns the number skipped.
int64_t stable_counting_sort(const int32_t* keys, int64_t rows, int32_t width, int64_t row_stride,
                             int32_t num_keys, int64_t* offsets, int32_t* position);

}  // namespace moe_ep::core

#include "core/layout.h"

namespace moe_ep::core {

int64_t stable_counting_sort(const int32_t* keys, int64_t rows, int32_t width, int64_t row_stride,
                             int32_t num_keys, int64_t* offsets, int32_t* position) {
  auto key_of = [&](int64_t i) { return keys[(i / width) * row_stride + i % width]; };
  const int64_t n = rows * width;
  int64_t skipped = 0;
  for (int32_t k = 0; k <= num_keys; ++k) offsets[k] = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int32_t key = key_of(i);
    if (key < 0 || key >= num_keys) {
      ++skipped;
    } else {
      ++offsets[key + 1];
    }
  }
  for (int32_t k = 0; k < num_keys; ++k) offsets[k + 1] += offsets[k];
  // offsets[k] doubles as the running cursor of key k; restore it afterwards.
  for (int64_t i = 0; i < n; ++i) {
    const int32_t key = key_of(i);
    position[i] = key < 0 || key >= num_keys ? -1 : static_cast<int32_t>(offsets[key]++);
  }
  for (int32_t k = num_keys; k > 0; --k) offsets[k] = offsets[k - 1];
  offsets[0] = 0;
  return skipped;
}

}  // namespace moe_ep::core

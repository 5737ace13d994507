#include "core/layout.h"

#include <stdexcept>
#include <string>

namespace moe_ep::core {

void stable_counting_sort(const int32_t* keys, int64_t n, int32_t num_keys, int64_t* offsets,
                          int32_t* position) {
  for (int32_t k = 0; k <= num_keys; ++k) offsets[k] = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int32_t key = keys[i];
    if (key < 0 || key >= num_keys) {
      throw std::out_of_range("key " + std::to_string(key) + " at position " + std::to_string(i) +
                              " is outside [0, " + std::to_string(num_keys) + ")");
    }
    ++offsets[key + 1];
  }
  for (int32_t k = 0; k < num_keys; ++k) offsets[k + 1] += offsets[k];
  // offsets[k] doubles as the running cursor of key k; restore it afterwards.
  for (int64_t i = 0; i < n; ++i) position[i] = static_cast<int32_t>(offsets[keys[i]]++);
  for (int32_t k = num_keys; k > 0; --k) offsets[k] = offsets[k - 1];
  offsets[0] = 0;
}

}  // namespace moe_ep::core

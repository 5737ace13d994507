// Token layout arithmetic shared by the CPU ops: grouping (token, choice) pairs by expert.
#pragma once

#include <cstdint>

namespace moe_ep::core {

// Stable counting sort of n keys in [0, num_keys).
// offsets[num_keys + 1]: offsets[k] is the first sorted position of key k, offsets[num_keys] = n.
// position[n]: the sorted position of item i; items with equal keys keep their input order.
// Throws std::out_of_range when a key lies outside [0, num_keys).
void stable_counting_sort(const int32_t* keys, int64_t n, int32_t num_keys, int64_t* offsets,
                          int32_t* position);

}  // namespace moe_ep::core

#include "core/dispatch_layout.h"

#include <cstring>

namespace moe_ep::core {

template <typename Id>
int64_t route_choices(const Id* ids, int64_t num_tokens, int32_t top_k, const ExpertMap& map,
                      const TokenChoices& out, int64_t* entries) {
  int64_t errors = 0;
  for (int64_t t = 0; t < num_tokens; ++t) {
    const int64_t base = t * top_k;
    errors |= route_token_choices(ids + base, top_k, map, out.dest_key + base, out.owner + base,
                                  out.slot + base, out.local + base);
    // Every choice is an entry at its rank: the rank of its row's owner.
    for (int32_t j = 0; j < top_k; ++j) ++entries[out.dest_key[base + out.owner[base + j]]];
  }
  return errors;
}

template int64_t route_choices<int32_t>(const int32_t*, int64_t, int32_t, const ExpertMap&,
                                        const TokenChoices&, int64_t*);
template int64_t route_choices<int64_t>(const int64_t*, int64_t, int32_t, const ExpertMap&,
                                        const TokenChoices&, int64_t*);

uint64_t map_checksum(const ExpertMap& map) {
  uint64_t sum = 0;
  for (int64_t s = 0; s < map.num_slots; ++s) {
    sum += map_checksum_term(s, map.slot_rank[s], map.slot_local[s]);
  }
  return sum & kChecksumMask;
}

void pack_rows(const PackArgs& a) {
  for (int64_t t = 0; t < a.num_tokens; ++t) {
    pack_token_metadata(a, t);
    const int64_t base = t * a.top_k;
    for (int32_t j = 0; j < a.top_k; ++j) {
      const int32_t row = a.dest_key[base + j] < 0 ? -1 : a.token_slot[base + j];
      if (row < 0) continue;
      std::memcpy(a.x_send + row * a.row_bytes, a.x + t * a.row_bytes, a.row_bytes);
    }
  }
}

}  // namespace moe_ep::core

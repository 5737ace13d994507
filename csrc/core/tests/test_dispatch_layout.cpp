// GoogleTest for core/dispatch_layout: the sender's layout against a direct construction of
// the rows (rank by rank, token by token), misuse bits, the capacity blocks and the header.
#include "core/dispatch_layout.h"

#include <gtest/gtest.h>

#include <cstring>
#include <map>
#include <random>
#include <set>
#include <vector>

#include "core/layout.h"

namespace moe_ep::core {
namespace {

struct Map {
  std::vector<int32_t> rank, local;
  int32_t world, num_local;
  ExpertMap view(int32_t top_k) const {
    return {rank.data(), local.data(), static_cast<int32_t>(rank.size()),
            world,       num_local,    std::min(top_k, num_local)};
  }
};

// Slots spread over ranks in a scrambled order, `per_rank` slots on each (the last ranks may
// host fewer).
Map scattered_map(int32_t slots, int32_t world, std::mt19937& gen) {
  std::vector<int32_t> order(slots);
  for (int32_t s = 0; s < slots; ++s) order[s] = s;
  std::shuffle(order.begin(), order.end(), gen);
  const int32_t per_rank = (slots + world - 1) / world;
  Map m{std::vector<int32_t>(slots), std::vector<int32_t>(slots), world, per_rank};
  for (int32_t i = 0; i < slots; ++i) {
    m.rank[order[i]] = i / per_rank;
    m.local[order[i]] = i % per_rank;
  }
  return m;
}

struct Sent {
  std::vector<int32_t> token_slot;    // [T * k]
  std::vector<int32_t> meta;          // [rows * stride]
  std::vector<float> x_send;          // [rows * hidden]
  std::vector<int64_t> rank_offsets;  // [world + 1]
  std::vector<int64_t> entries;       // [world]
  int64_t errors = 0;
};

// The layout as the dispatch builds it: route, sort by destination, pack.
Sent lay_out(const std::vector<int32_t>& ids, const std::vector<float>& x,
             const std::vector<float>& weights, int32_t top_k, int64_t hidden, const Map& m,
             int64_t capacity) {
  const ExpertMap map = m.view(top_k);
  const auto n = static_cast<int64_t>(ids.size());
  const int64_t tokens = n / top_k;
  std::vector<int32_t> dest_key(n), owner(n), slot(n), local(n), position(n);
  Sent s;
  s.entries.assign(map.world, 0);
  s.errors =
      route_choices(ids.data(), tokens, top_k, map,
                    {dest_key.data(), owner.data(), slot.data(), local.data()}, s.entries.data());
  s.rank_offsets.assign(map.world + 1, 0);
  stable_counting_sort(dest_key.data(), n, 1, 1, map.world, s.rank_offsets.data(), position.data());
  const int64_t rows = capacity == 0 ? s.rank_offsets[map.world] : map.world * capacity;
  const int32_t stride = 2 * map.width + 1;  // a spare column, as the status column would be
  s.meta.assign(rows * stride, 77);
  s.x_send.assign(rows * hidden, -5.0f);
  s.token_slot.assign(n, -9);
  pack_rows({reinterpret_cast<const uint8_t*>(x.data()),
             static_cast<int64_t>(hidden * sizeof(float)), weights.data(), tokens, top_k,
             dest_key.data(), owner.data(), slot.data(), local.data(), position.data(),
             s.rank_offsets.data(), capacity, map.width, stride,
             reinterpret_cast<uint8_t*>(s.x_send.data()), s.meta.data(), s.token_slot.data()});
  return s;
}

float from_bits(int32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

TEST(DispatchLayout, RowsMatchADirectConstruction) {
  std::mt19937 gen(5);
  for (int32_t world : {1, 2, 3, 8}) {
    for (int32_t slots : {1, 4, 16, 40}) {
      for (int32_t top_k : {1, 2, 6}) {
        for (int64_t capacity : {int64_t{0}, int64_t{3}}) {
          if (top_k > slots) continue;
          const Map m = scattered_map(slots, world, gen);
          const ExpertMap map = m.view(top_k);
          const int64_t tokens = 37, hidden = 3;
          // Distinct slots per token (a token never picks a slot twice).
          std::vector<int32_t> ids;
          for (int64_t t = 0; t < tokens; ++t) {
            std::set<int32_t> picked;
            std::uniform_int_distribution<int32_t> pick(0, slots - 1);
            while (static_cast<int32_t>(picked.size()) < top_k) picked.insert(pick(gen));
            std::vector<int32_t> row(picked.begin(), picked.end());
            std::shuffle(row.begin(), row.end(), gen);
            ids.insert(ids.end(), row.begin(), row.end());
          }
          std::vector<float> x(tokens * hidden), weights(tokens * top_k);
          std::uniform_real_distribution<float> value(-1.0f, 1.0f);
          for (float& v : x) v = value(gen);
          for (float& v : weights) v = value(gen);
          SCOPED_TRACE(testing::Message() << "world=" << world << " slots=" << slots
                                          << " k=" << top_k << " capacity=" << capacity);
          const Sent s = lay_out(ids, x, weights, top_k, hidden, m, capacity);
          ASSERT_EQ(s.errors, 0);

          // Direct construction: rank by rank, the tokens that have a choice there, in token
          // order; the row lists that token's choices on the rank in choice order.
          const int32_t stride = 2 * map.width + 1;
          int64_t pairs_total = 0, overflow = 0;
          for (int32_t r = 0; r < world; ++r) {
            int64_t row_in_rank = 0, pairs = 0;
            for (int64_t t = 0; t < tokens; ++t) {
              std::vector<int32_t> here;
              for (int32_t j = 0; j < top_k; ++j) {
                if (m.rank[ids[t * top_k + j]] == r) here.push_back(j);
              }
              if (here.empty()) continue;
              pairs += static_cast<int64_t>(here.size());
              const int64_t want_row =
                  capacity == 0 ? s.rank_offsets[r] + row_in_rank
                                : (row_in_rank < capacity ? r * capacity + row_in_rank : -1);
              ++row_in_rank;
              for (size_t i = 0; i < here.size(); ++i) {
                EXPECT_EQ(s.token_slot[t * top_k + here[i]], i == 0 ? want_row : -1);
              }
              if (want_row < 0) {
                ++overflow;
                continue;
              }
              const int32_t* meta = s.meta.data() + want_row * stride;
              for (int32_t slot = 0; slot < map.width; ++slot) {
                if (slot < static_cast<int32_t>(here.size())) {
                  const int32_t j = here[slot];
                  EXPECT_EQ(meta[slot], m.local[ids[t * top_k + j]]);
                  EXPECT_EQ(from_bits(meta[map.width + slot]), weights[t * top_k + j]);
                } else {
                  EXPECT_EQ(meta[slot], -1);
                  EXPECT_EQ(meta[map.width + slot], 0);
                }
              }
              EXPECT_EQ(meta[2 * map.width], 77) << "the spare column is not written";
              for (int64_t h = 0; h < hidden; ++h) {
                EXPECT_EQ(s.x_send[want_row * hidden + h], x[t * hidden + h]);
              }
            }
            EXPECT_EQ(s.rank_offsets[r + 1] - s.rank_offsets[r], row_in_rank);
            EXPECT_EQ(s.entries[r], pairs);
            pairs_total += pairs;
          }
          EXPECT_EQ(pairs_total, tokens * top_k);
          EXPECT_EQ(overflow_pairs(s.rank_offsets.data(), world, capacity == 0 ? tokens : capacity),
                    capacity == 0 ? 0 : overflow);
        }
      }
    }
  }
}

TEST(DispatchLayout, MisuseSetsBitsAndStaysInBounds) {
  // Four slots on two ranks, two per rank; width = min(k, 2).
  const Map m{{0, 0, 1, 1}, {0, 1, 0, 1}, 2, 2};
  const std::vector<float> x(3 * 2, 1.0f), weights(3 * 3, 0.5f);
  // An id outside the map.
  EXPECT_EQ(lay_out({0, 4, 2}, x, weights, 3, 2, m, 0).errors & ~int64_t{kTooManyChoices},
            kIdOutOfRange);
  EXPECT_EQ(lay_out({0, -1}, std::vector<float>(2, 1.0f), {1.0f, 1.0f}, 2, 2, m, 0).errors,
            kIdOutOfRange);
  // Three choices on rank 0 with width 2 (slot 0 twice plus slot 1).
  EXPECT_EQ(lay_out({0, 1, 0}, x, weights, 3, 2, m, 0).errors, kTooManyChoices);
  // A map entry with a rank outside the group, and one with a local id out of range.
  const Map bad_rank{{0, 2, 1, 1}, {0, 1, 0, 1}, 2, 2};
  EXPECT_EQ(lay_out({1, 2}, std::vector<float>(2, 1.0f), {1.0f, 1.0f}, 2, 2, bad_rank, 0).errors,
            kBadRank);
  const Map bad_local{{0, 0, 1, 1}, {0, 1, 0, 5}, 2, 2};
  EXPECT_EQ(lay_out({3, 0}, std::vector<float>(2, 1.0f), {1.0f, 1.0f}, 2, 2, bad_local, 0).errors,
            kBadLocal);
}

TEST(DispatchLayout, ChecksumSeesEveryChangeOfTheMap) {
  const Map m{{0, 0, 1, 1, 2, 2}, {0, 1, 0, 1, 0, 1}, 3, 2};
  const uint64_t base = map_checksum(m.view(2));
  EXPECT_LE(base, kChecksumMask);
  std::set<uint64_t> seen{base};
  // Swapping two slots' homes, moving one slot, renumbering locals: all differ.
  Map swapped = m;
  std::swap(swapped.rank[0], swapped.rank[2]);
  std::swap(swapped.local[0], swapped.local[2]);
  Map moved = m;
  moved.rank[5] = 0;
  moved.local[5] = 2;
  Map renumbered = m;
  std::swap(renumbered.local[0], renumbered.local[1]);
  for (const Map* other : {&swapped, &moved, &renumbered}) {
    EXPECT_TRUE(seen.insert(map_checksum(other->view(2))).second);
  }
}

TEST(DispatchLayout, HeaderRowsCarryEachChunksCounts) {
  // Two chunks, three ranks.
  const std::vector<int64_t> offsets = {0, 2, 2, 5, /* chunk 1 */ 0, 1, 4, 4};
  const std::vector<int64_t> entries = {3, 0, 4, /* chunk 1 */ 1, 6, 0};
  for (int32_t peer = 0; peer < 3; ++peer) {
    std::vector<int64_t> row(kHeaderSize, -1);
    write_header_row(row.data(), peer, 3, 2, offsets.data(), entries.data(), 123, 456, 2);
    EXPECT_EQ(row[kHeaderConfig], 123);
    EXPECT_EQ(row[kHeaderMap], 456);
    EXPECT_EQ(row[kHeaderErrors], 2);
    EXPECT_EQ(row[kHeaderChunks], 2);
    EXPECT_EQ(row[kHeaderCounts], offsets[peer + 1] - offsets[peer]);
    EXPECT_EQ(row[kHeaderCounts + 1], entries[peer]);
    EXPECT_EQ(row[kHeaderCounts + 2], offsets[4 + peer + 1] - offsets[4 + peer]);
    EXPECT_EQ(row[kHeaderCounts + 3], entries[3 + peer]);
    for (int f = kHeaderCounts + 4; f < kHeaderSize; ++f) EXPECT_EQ(row[f], 0);
  }
}

}  // namespace
}  // namespace moe_ep::core

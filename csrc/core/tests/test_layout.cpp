// GoogleTest for core::stable_counting_sort, checked against std::stable_sort.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "core/layout.h"

namespace moe_ep::core {
namespace {

struct Sorted {
  std::vector<int64_t> offsets;
  std::vector<int32_t> position;
};

Sorted counting_sort(const std::vector<int32_t>& keys, int32_t num_keys) {
  // Fill with sentinels so that an unwritten entry shows up in the comparisons.
  Sorted s{std::vector<int64_t>(num_keys + 1, -7), std::vector<int32_t>(keys.size(), -7)};
  const int64_t skipped = stable_counting_sort(keys.data(), static_cast<int64_t>(keys.size()), 1, 1,
                                               num_keys, s.offsets.data(), s.position.data());
  EXPECT_EQ(skipped, 0);
  return s;
}

// The expected result from std::stable_sort of the item indices by key.
void expect_matches_stable_sort(const std::vector<int32_t>& keys, int32_t num_keys) {
  const Sorted got = counting_sort(keys, num_keys);
  const int64_t n = static_cast<int64_t>(keys.size());
  std::vector<int32_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&keys](int32_t a, int32_t b) { return keys[a] < keys[b]; });
  std::vector<int32_t> want_position(n);
  for (int64_t p = 0; p < n; ++p) want_position[order[p]] = static_cast<int32_t>(p);
  EXPECT_EQ(got.position, want_position);

  std::vector<int64_t> want_offsets(num_keys + 1, 0);
  for (int32_t k = 0; k < num_keys; ++k) {
    want_offsets[k + 1] = want_offsets[k] + std::count(keys.begin(), keys.end(), k);
  }
  EXPECT_EQ(got.offsets, want_offsets);
  // Each item lands inside its key's range.
  for (int64_t i = 0; i < n; ++i) {
    EXPECT_GE(got.position[i], got.offsets[keys[i]]);
    EXPECT_LT(got.position[i], got.offsets[keys[i] + 1]);
  }
}

TEST(StableCountingSort, RandomKeysMatchStdStableSort) {
  std::mt19937 gen(42);
  for (int32_t num_keys : {1, 2, 7, 64, 256, 1000}) {
    for (int64_t n : {1, 5, 100, 4096, 20000}) {
      std::uniform_int_distribution<int32_t> key(0, num_keys - 1);
      std::vector<int32_t> keys(n);
      for (int32_t& k : keys) k = key(gen);
      SCOPED_TRACE(testing::Message() << "num_keys=" << num_keys << " n=" << n);
      expect_matches_stable_sort(keys, num_keys);
    }
  }
}

TEST(StableCountingSort, SkewedKeysMatchStdStableSort) {
  // Most items on one key, as when the router sends nearly every token to one expert.
  std::mt19937 gen(3);
  std::geometric_distribution<int32_t> key(0.5);
  std::vector<int32_t> keys(5000);
  for (int32_t& k : keys) k = std::min(key(gen), 63);
  expect_matches_stable_sort(keys, 64);
}

TEST(StableCountingSort, EmptyInput) {
  const Sorted s = counting_sort({}, 5);
  EXPECT_EQ(s.offsets, (std::vector<int64_t>{0, 0, 0, 0, 0, 0}));
  EXPECT_TRUE(s.position.empty());
  // Null pointers are fine when n == 0.
  std::vector<int64_t> offsets(4, -1);
  EXPECT_EQ(stable_counting_sort(nullptr, 0, 2, 2, 3, offsets.data(), nullptr), 0);
  EXPECT_EQ(offsets, (std::vector<int64_t>{0, 0, 0, 0}));
}

TEST(StableCountingSort, AllKeysEqualKeepInputOrder) {
  for (int32_t key : {0, 3, 7}) {
    const std::vector<int32_t> keys(100, key);
    const Sorted s = counting_sort(keys, 8);
    std::vector<int32_t> identity(100);
    std::iota(identity.begin(), identity.end(), 0);
    EXPECT_EQ(s.position, identity);
    for (int32_t k = 0; k <= 8; ++k) EXPECT_EQ(s.offsets[k], k <= key ? 0 : 100) << "k=" << k;
  }
}

TEST(StableCountingSort, KeysThatNeverAppearHaveEmptyRanges) {
  // Keys 0, 2, 5 and 6 never appear (5 and 6 at the end, 0 at the start).
  const std::vector<int32_t> keys = {4, 1, 3, 1, 4, 3, 1};
  const Sorted s = counting_sort(keys, 7);
  EXPECT_EQ(s.offsets, (std::vector<int64_t>{0, 0, 3, 3, 5, 7, 7, 7}));
  // Key 1 items (0-based 1, 3, 6) -> 0, 1, 2; key 3 (2, 5) -> 3, 4; key 4 (0, 4) -> 5, 6.
  EXPECT_EQ(s.position, (std::vector<int32_t>{5, 0, 3, 1, 6, 4, 2}));
  expect_matches_stable_sort(keys, 7);
}

TEST(StableCountingSort, OutOfRangeKeysAreSkippedAndCounted) {
  // -1 marks padding (a metadata slot without a choice); other bad keys are skipped alike.
  for (int32_t bad : {-1, 4, 1000, INT32_MIN}) {
    const std::vector<int32_t> keys = {2, bad, 0, 2, bad};
    std::vector<int64_t> offsets(5, -7);
    std::vector<int32_t> position(5, -7);
    EXPECT_EQ(stable_counting_sort(keys.data(), 5, 1, 1, 4, offsets.data(), position.data()), 2)
        << "key " << bad;
    EXPECT_EQ(offsets, (std::vector<int64_t>{0, 1, 1, 3, 3}));
    EXPECT_EQ(position, (std::vector<int32_t>{1, -1, 0, 2, -1}));
  }
}

TEST(StableCountingSort, StridedKeysSortTheFirstWidthColumns) {
  // A table of rows x row_stride with the keys in its first `width` columns (the local expert
  // ids of received metadata rows, followed by other fields): only those columns are items.
  std::mt19937 gen(11);
  const int64_t rows = 300;
  const int32_t width = 3, stride = 7, num_keys = 5;
  std::uniform_int_distribution<int32_t> key(-1, num_keys - 1), other(100, 200);
  std::vector<int32_t> table(rows * stride);
  std::vector<int32_t> items;
  for (int64_t r = 0; r < rows; ++r) {
    for (int32_t c = 0; c < stride; ++c) {
      table[r * stride + c] = c < width ? key(gen) : other(gen);
      if (c < width) items.push_back(table[r * stride + c]);
    }
  }
  // Expected: items key by key, in input order within a key; padding last and unplaced.
  std::vector<int64_t> want_offsets(num_keys + 1, 0);
  std::vector<int32_t> want_position(items.size(), -1);
  int32_t next = 0;
  for (int32_t k = 0; k < num_keys; ++k) {
    for (size_t i = 0; i < items.size(); ++i) {
      if (items[i] == k) want_position[i] = next++;
    }
    want_offsets[k + 1] = next;
  }
  std::vector<int64_t> offsets(num_keys + 1);
  std::vector<int32_t> position(items.size());
  const int64_t skipped = stable_counting_sort(table.data(), rows, width, stride, num_keys,
                                               offsets.data(), position.data());
  EXPECT_EQ(skipped, std::count(items.begin(), items.end(), -1));
  EXPECT_EQ(offsets, want_offsets);
  EXPECT_EQ(position, want_position);
}

}  // namespace
}  // namespace moe_ep::core

// GoogleTest for core/fp8: the e4m3fn conversions against a brute-force nearest code (ties to
// even), the block scales, and the FP8 pack (one quantization per token, copied to each rank).
#include "core/fp8.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "core/dispatch_layout.h"
#include "core/layout.h"

namespace moe_ep::core {
namespace {

bool is_nan_code(uint8_t code) { return (code & 0x7f) == 0x7f; }

// The value of code written from the format's definition (independent of e4m3fn_to_float).
double code_value(uint8_t code) {
  const int exponent = (code >> 3) & 0xf, mantissa = code & 0x7;
  const double magnitude =
      exponent == 0 ? std::ldexp(mantissa, -9) : std::ldexp(1.0 + mantissa / 8.0, exponent - 7);
  return (code & 0x80) ? -magnitude : magnitude;
}

// The nearest finite code to x by exhaustive search (ties to the even code), saturating.
uint8_t nearest_code(float x) {
  uint8_t best = 0;
  double best_distance = std::numeric_limits<double>::infinity();
  for (int c = 0; c < 256; ++c) {
    const auto code = static_cast<uint8_t>(c);
    if (is_nan_code(code) || (std::signbit(x) != ((code & 0x80) != 0))) continue;
    const double distance = std::fabs(code_value(code) - static_cast<double>(x));
    if (distance < best_distance || (distance == best_distance && (code & 1) == 0)) {
      best = code;
      best_distance = distance;
    }
  }
  return best;
}

TEST(Fp8, EveryCodeDecodesToItsValueAndBack) {
  for (int c = 0; c < 256; ++c) {
    const auto code = static_cast<uint8_t>(c);
    const float value = e4m3fn_to_float(code);
    if (is_nan_code(code)) {
      EXPECT_TRUE(std::isnan(value)) << c;
      continue;
    }
    EXPECT_EQ(static_cast<double>(value), code_value(code)) << c;
    EXPECT_EQ(e4m3fn_from_float(value), code) << c;
  }
}

TEST(Fp8, RoundsToTheNearestCodeTiesToEven) {
  std::mt19937 gen(11);
  std::vector<float> xs;
  // Every midpoint between neighbouring codes (the ties) and points just beside it.
  for (int c = 0; c < 0x7e; ++c) {
    const auto low = static_cast<float>(code_value(static_cast<uint8_t>(c)));
    const auto high = static_cast<float>(code_value(static_cast<uint8_t>(c + 1)));
    const float mid = 0.5f * (low + high);
    xs.insert(xs.end(), {mid, std::nextafter(mid, 0.0f), std::nextafter(mid, 1e9f), -mid});
  }
  // Random magnitudes over e4m3's range and beyond, subnormals included.
  std::uniform_real_distribution<float> exponent(-14.0f, 10.0f);
  for (int i = 0; i < 20000; ++i) {
    const float x = std::exp2(exponent(gen));
    xs.push_back(i % 2 ? x : -x);
  }
  xs.insert(xs.end(),
            {0.0f, -0.0f, 448.0f, 463.9f, 464.0f, 1e30f, std::numeric_limits<float>::infinity(),
             -std::numeric_limits<float>::infinity(), 1e-45f});
  for (const float x : xs) EXPECT_EQ(e4m3fn_from_float(x), nearest_code(x)) << x;
  EXPECT_EQ(e4m3fn_from_float(std::numeric_limits<float>::quiet_NaN()), 0x7f);
  EXPECT_EQ(e4m3fn_from_float(-std::numeric_limits<float>::quiet_NaN()), 0x7f);
}

TEST(Fp8, BlockScaleMapsTheLargestMagnitudeTo448) {
  EXPECT_EQ(fp8_block_scale(448.0f), 1.0f);
  EXPECT_EQ(fp8_block_scale(3.5f), 3.5f / 448.0f);
  // Zeros and tiny blocks get 2^-126, so that the inverse stays finite.
  EXPECT_EQ(fp8_block_scale(0.0f), std::ldexp(1.0f, -126));
  EXPECT_EQ(fp8_block_scale(1e-40f), std::ldexp(1.0f, -126));
  EXPECT_TRUE(std::isfinite(1.0f / fp8_block_scale(0.0f)));
  EXPECT_EQ(fp8_scale_blocks(7168), 56);
  EXPECT_EQ(fp8_scale_blocks(200), 2);
  EXPECT_EQ(fp8_scale_blocks(0), 0);
}

float scale_of(const uint8_t* bytes, int64_t block) {
  float scale;
  std::memcpy(&scale, bytes + block * sizeof(float), sizeof(float));
  return scale;
}

TEST(Fp8, QuantizedRowsStayWithinHalfACodeOfTheInput) {
  std::mt19937 gen(3);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (const int64_t hidden : {1, 127, 128, 200, 1024}) {
    std::vector<float> x(hidden);
    for (float& v : x) v = normal(gen);
    x[0] *= 1000.0f;  // an outlier channel: its block's scale grows, the others' do not
    std::vector<uint8_t> values(hidden), scales(4 * fp8_scale_blocks(hidden));
    quantize_row(x.data(), hidden, values.data(), scales.data());
    std::vector<float> back(hidden);
    dequantize_row(values.data(), scales.data(), hidden, back.data());
    for (int64_t i = 0; i < hidden; ++i) {
      const float scale = scale_of(scales.data(), i / kFp8BlockSize);
      // Half a code: 2^-4 of the value (3 mantissa bits), or 2^-10 x scale among the
      // subnormals; float32 roundings of the scaled value add a few 2^-24.
      const double bound = std::max(std::ldexp(std::fabs(x[i]), -4), std::ldexp(scale, -10)) +
                           std::ldexp(std::fabs(x[i]), -21);
      EXPECT_LE(std::fabs(static_cast<double>(back[i]) - x[i]), bound) << hidden << " " << i;
    }
  }
}

TEST(Fp8, PackQuantizesEachTokenOnceForEveryRankItGoesTo) {
  // Two ranks, two slots each; token 0 goes to both ranks, token 1 to rank 1 only.
  const std::vector<int32_t> slot_rank{0, 0, 1, 1}, slot_local{0, 1, 0, 1};
  const ExpertMap map{slot_rank.data(), slot_local.data(), 4, 2, 2, 2};
  const std::vector<int32_t> ids{0, 3, 2, 3};
  const int32_t top_k = 2;
  const int64_t tokens = 2, hidden = 200;
  std::vector<float> x(tokens * hidden), weights{0.25f, 0.75f, 0.5f, 0.5f};
  for (int64_t i = 0; i < tokens * hidden; ++i) x[i] = std::sin(0.37f * i) * (i % 7 + 1);
  std::vector<int32_t> dest_key(4), owner(4), slot(4), local(4), position(4);
  std::vector<int64_t> entries(2, 0), rank_offsets(3);
  ASSERT_EQ(
      route_choices(ids.data(), tokens, top_k, map,
                    {dest_key.data(), owner.data(), slot.data(), local.data()}, entries.data()),
      0);
  stable_counting_sort(dest_key.data(), 4, 1, 1, 2, rank_offsets.data(), position.data());
  ASSERT_EQ(rank_offsets[2], 3);  // rows: (0, rank 0), (0, rank 1), (1, rank 1)
  const int64_t blocks = fp8_scale_blocks(hidden);
  const int32_t scale_column = 2 * map.width, stride = scale_column + static_cast<int32_t>(blocks);
  std::vector<int32_t> meta(3 * stride, 77), token_slot(4);
  std::vector<uint8_t> x_send(3 * hidden, 0xaa);
  PackArgs args{reinterpret_cast<const uint8_t*>(x.data()),
                static_cast<int64_t>(hidden * sizeof(float)),
                weights.data(),
                tokens,
                top_k,
                dest_key.data(),
                owner.data(),
                slot.data(),
                local.data(),
                position.data(),
                rank_offsets.data(),
                0,
                map.width,
                stride,
                x_send.data(),
                meta.data(),
                token_slot.data()};
  args.scale_column = scale_column;
  pack_rows_fp8<float>(args);

  const int64_t row_of_token[3] = {0, 0, 1};
  for (int64_t row = 0; row < 3; ++row) {
    std::vector<uint8_t> values(hidden), scales(4 * blocks);
    quantize_row(x.data() + row_of_token[row] * hidden, hidden, values.data(), scales.data());
    EXPECT_EQ(std::memcmp(x_send.data() + row * hidden, values.data(), hidden), 0) << row;
    EXPECT_EQ(std::memcmp(meta.data() + row * stride + scale_column, scales.data(), 4 * blocks), 0)
        << row;
  }
  // The routing metadata is the exact mode's: rank 0 gets slot 0 (local 0) of token 0.
  EXPECT_EQ(meta[0], 0);
  EXPECT_EQ(meta[1], -1);
}

}  // namespace
}  // namespace moe_ep::core

// FP8 rows of the dispatch (docs/dispatch.md, "FP8 dispatch"): float8_e4m3fn values with one
// float32 scale per block of 128 channels of a token (the layout DeepEP and DeepGEMM use); a
// last block of fewer channels has its own scale. The scale maps the block's largest magnitude
// to e4m3's largest finite value, 448. Shared by the CPU ops (g++) and the CUDA kernels (nvcc),
// which must produce the same bits.
//
// e4m3fn: 1 sign, 4 exponent (bias 7) and 3 mantissa bits; no infinities; 0x7f and 0xff are
// NaN; largest finite 448, smallest normal 2^-6, subnormals k * 2^-9 (k = 1..7).
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "core/common.h"

namespace moe_ep::core {

constexpr int64_t kFp8BlockSize = 128;  // channels per scale
constexpr float kE4m3Max = 448.0f;
constexpr float kSmallestNormalFloat = 1.17549435e-38f;  // 2^-126

MOE_EP_HD inline int64_t fp8_scale_blocks(int64_t hidden) {
  return (hidden + kFp8BlockSize - 1) / kFp8BlockSize;
}

// x rounded to the nearest e4m3fn value (ties to even), saturating at +-448; NaN gives 0x7f,
// the canonical NaN that the hardware conversion (cvt.rn.satfinite.e4m3x2.f32) gives.
MOE_EP_HD inline uint8_t e4m3fn_from_float(float x) {
  uint32_t bits;
  memcpy(&bits, &x, sizeof(bits));
  const auto sign = static_cast<uint8_t>((bits >> 24) & 0x80u);
  const uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return 0x7f;           // NaN
  if (magnitude >= 0x43e00000u) return sign | 0x7eu;  // >= 448, infinity included
  if (magnitude < 0x3c800000u) {                      // < 2^-6: k * 2^-9, k rounded to even;
    return sign | static_cast<uint8_t>(rintf(fabsf(x) * 512.0f));  // k = 8 is 2^-6's code
  }
  // Keep 3 of float's 23 mantissa bits, ties to even on the 20 dropped (a carry into the
  // exponent is the right next value), and rebias the exponent from 127 to 7.
  const uint32_t rounded = (magnitude + 0x7ffffu + ((magnitude >> 20) & 1u)) >> 20;
  return sign | static_cast<uint8_t>(rounded - (120u << 3));
}

MOE_EP_HD inline float e4m3fn_to_float(uint8_t code) {
  const uint32_t exponent = (code >> 3) & 0xfu, mantissa = code & 0x7u;
  uint32_t bits;
  if (exponent == 0xfu && mantissa == 0x7u) {
    bits = 0x7fc00000u;  // NaN
  } else if (exponent == 0) {
    const float subnormal = static_cast<float>(mantissa) * (1.0f / 512.0f);
    memcpy(&bits, &subnormal, sizeof(bits));
  } else {
    bits = ((exponent + 120u) << 23) | (mantissa << 20);
  }
  bits |= static_cast<uint32_t>(code & 0x80u) << 24;
  float value;
  memcpy(&value, &bits, sizeof(value));
  return value;
}

// The scale of a block whose largest magnitude is amax (a NaN element does not count:
// fmaxf skips it): amax / 448. A block of zeros, or one so small that amax / 448 is not a
// normal float, gets 2^-126, whose inverse stays finite. An infinite amax gives an infinite
// scale: the block dequantizes to NaN.
MOE_EP_HD inline float fp8_block_scale(float amax) {
  const float scale = amax / kE4m3Max;
  return scale >= kSmallestNormalFloat ? scale : kSmallestNormalFloat;
}

// CPU versions of the row loops (the CUDA kernels spread a row over a block's threads and use
// the same per-element functions). T converts to and from float (float, c10::Half,
// c10::BFloat16). The scales go to bytes: they travel in an int32 metadata row.

// One token's row x[hidden] as e4m3fn codes values[hidden] and the blocks' scales.
template <typename T>
void quantize_row(const T* x, int64_t hidden, uint8_t* values, uint8_t* scale_bytes) {
  for (int64_t begin = 0, block = 0; begin < hidden; begin += kFp8BlockSize, ++block) {
    const int64_t end = begin + kFp8BlockSize < hidden ? begin + kFp8BlockSize : hidden;
    float amax = 0.0f;
    for (int64_t i = begin; i < end; ++i) amax = fmaxf(amax, fabsf(static_cast<float>(x[i])));
    const float scale = fp8_block_scale(amax), inverse = 1.0f / scale;
    for (int64_t i = begin; i < end; ++i) {
      values[i] = e4m3fn_from_float(static_cast<float>(x[i]) * inverse);
    }
    memcpy(scale_bytes + block * sizeof(float), &scale, sizeof(float));
  }
}

// e4m3fn_to_float of every code: the CPU decodes by table.
inline const float* e4m3fn_values() {
  static const auto table = [] {
    std::array<float, 256> values{};
    for (int code = 0; code < 256; ++code) {
      values[code] = e4m3fn_to_float(static_cast<uint8_t>(code));
    }
    return values;
  }();
  return table.data();
}

// The inverse: out[i] = value * scale of its block, rounded once to T.
template <typename T>
void dequantize_row(const uint8_t* values, const uint8_t* scale_bytes, int64_t hidden, T* out) {
  const float* decoded = e4m3fn_values();
  for (int64_t begin = 0, block = 0; begin < hidden; begin += kFp8BlockSize, ++block) {
    const int64_t end = begin + kFp8BlockSize < hidden ? begin + kFp8BlockSize : hidden;
    float scale;
    memcpy(&scale, scale_bytes + block * sizeof(float), sizeof(float));
    for (int64_t i = begin; i < end; ++i) out[i] = static_cast<T>(decoded[values[i]] * scale);
  }
}

}  // namespace moe_ep::core

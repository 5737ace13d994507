// Top-k gating for one token, shared by the CPU op (g++) and the CUDA kernel (nvcc).
//
// Semantics (DeepSeek-V3 style when a bias and groups are given):
//   score(e)     = softmax(logits)[e] or sigmoid(logits[e])       (fp32)
//   select(e)    = score(e) + bias[e]                              (bias only steers the choice)
//   groups       : the experts are split into n_group equal groups; a group's score is its best
//                  select() value (GroupScore::kMax, DeepSeek-V2) or the sum of its two best
//                  (GroupScore::kTopTwoSum, DeepSeek-V3; its best alone for one-expert groups),
//                  with or without a bias; only experts of the topk_group best groups can be
//                  chosen
//   ids          : the top_k experts by select(), best first; ties go to the lower index
//   weights      : score(id) (never the bias), divided by their sum when renormalize is set,
//                  then multiplied by scaling
// Scores are recomputed on the fly instead of stored, so one token needs O(top_k + n_group)
// registers for any number of experts: one pass over the experts for the softmax sum, one for
// the group scores (when grouped) and one for the top-k, plus top_k scores for the weights.
// NaN logits give unspecified (but in-range or -1) ids.
#pragma once

#include <cmath>
#include <cstdint>

#include "core/common.h"

namespace moe_ep::core {

enum class ScoreFunction : int { kSoftmax = 0, kSigmoid = 1 };
enum class GroupScore : int { kMax = 0, kTopTwoSum = 1 };

constexpr int kMaxTopK = 16;
constexpr int kMaxGroups = 64;

struct RouteConfig {
  int num_experts = 0;
  int top_k = 1;
  ScoreFunction score = ScoreFunction::kSoftmax;
  int n_group = 1;     // 1 = no group limit
  int topk_group = 1;  // ignored when n_group == 1
  GroupScore group_score = GroupScore::kMax;
  bool renormalize = true;
  float scaling = 1.0f;
};

// True when (value_a, index_a) is ranked before (value_b, index_b): larger value first,
// lower index first among equal values.
MOE_EP_HD inline bool ranks_before(float value_a, int index_a, float value_b, int index_b) {
  return value_a > value_b || (value_a == value_b && index_a < index_b);
}

// logit(e) returns expert e's logit as a float (the caller owns the element type).
template <typename LogitFn>
MOE_EP_HD inline void route_token(LogitFn logit, const float* bias, const RouteConfig& cfg,
                                  int32_t* ids, float* weights) {
  const int num_experts = cfg.num_experts;
  float max_logit = -INFINITY;
  float denominator = 1.0f;
  if (cfg.score == ScoreFunction::kSoftmax) {
    for (int e = 0; e < num_experts; ++e) max_logit = fmaxf(max_logit, logit(e));
    denominator = 0.0f;
    for (int e = 0; e < num_experts; ++e) denominator += expf(logit(e) - max_logit);
  }
  auto score = [&](int e) {
    const float x = logit(e);
    return cfg.score == ScoreFunction::kSoftmax ? expf(x - max_logit) / denominator
                                                : 1.0f / (1.0f + expf(-x));
  };
  auto select = [&](int e) { return bias != nullptr ? score(e) + bias[e] : score(e); };

  // Group limit: a bit per allowed group.
  uint64_t allowed_groups = ~uint64_t{0};
  const int group_size = num_experts / cfg.n_group;
  if (cfg.n_group > 1) {
    float group_score[kMaxGroups];
    for (int g = 0; g < cfg.n_group; ++g) {
      float best = -INFINITY, second = -INFINITY;
      for (int e = g * group_size; e < (g + 1) * group_size; ++e) {
        const float v = select(e);
        if (v > best) {
          second = best;
          best = v;
        } else if (v > second) {
          second = v;
        }
      }
      group_score[g] =
          (cfg.group_score == GroupScore::kTopTwoSum && group_size > 1) ? best + second : best;
    }
    allowed_groups = 0;
    float last_value = INFINITY;
    int last_index = -1;
    for (int j = 0; j < cfg.topk_group; ++j) {
      int pick = -1;
      for (int g = 0; g < cfg.n_group; ++g) {
        const bool after_last = j == 0 || ranks_before(last_value, last_index, group_score[g], g);
        if (after_last && (pick < 0 || ranks_before(group_score[g], g, group_score[pick], pick))) {
          pick = g;
        }
      }
      if (pick < 0) break;
      allowed_groups |= uint64_t{1} << pick;
      last_value = group_score[pick];
      last_index = pick;
    }
  }

  // Top-k in one pass: an insertion into the sorted list of the best so far. Experts come in
  // ascending order, so an equal value never displaces an earlier (lower) index.
  float best[kMaxTopK];
  int filled = 0;
  for (int e = 0; e < num_experts; ++e) {
    if (cfg.n_group > 1 && !((allowed_groups >> (e / group_size)) & 1u)) continue;
    const float v = select(e);
    if (filled == cfg.top_k && !ranks_before(v, e, best[filled - 1], ids[filled - 1])) continue;
    int slot = filled < cfg.top_k ? filled++ : filled - 1;
    for (; slot > 0 && ranks_before(v, e, best[slot - 1], ids[slot - 1]); --slot) {
      best[slot] = best[slot - 1];
      ids[slot] = ids[slot - 1];
    }
    best[slot] = v;
    ids[slot] = e;
  }
  float weight_sum = 0.0f;
  for (int j = 0; j < cfg.top_k; ++j) {
    if (j >= filled) ids[j] = -1;  // fewer candidates than top_k: never for valid arguments
    weights[j] = ids[j] < 0 ? 0.0f : score(ids[j]);
    weight_sum += weights[j];
  }
  const float factor =
      (cfg.renormalize && weight_sum > 0.0f) ? cfg.scaling / weight_sum : cfg.scaling;
  for (int j = 0; j < cfg.top_k; ++j) weights[j] *= factor;
}

}  // namespace moe_ep::core

// GoogleTest for core::route_token: the per-token gating arithmetic shared by the CPU op and
// the CUDA kernel. Reference values are computed here in double precision, or worked by hand
// for the small group-limited cases (the reasoning is in the comments).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "core/routing.h"

namespace moe_ep::core {
namespace {

struct Routed {
  std::vector<int32_t> ids;
  std::vector<float> weights;
};

Routed route(const std::vector<float>& logits, const RouteConfig& cfg,
             const std::vector<float>* bias = nullptr) {
  Routed r{std::vector<int32_t>(cfg.top_k, -2), std::vector<float>(cfg.top_k, -1.0f)};
  route_token([&logits](int e) { return logits[e]; }, bias ? bias->data() : nullptr, cfg,
              r.ids.data(), r.weights.data());
  return r;
}

RouteConfig config(int num_experts, int top_k, ScoreFunction score, bool renormalize = true,
                   float scaling = 1.0f) {
  RouteConfig cfg;
  cfg.num_experts = num_experts;
  cfg.top_k = top_k;
  cfg.score = score;
  cfg.renormalize = renormalize;
  cfg.scaling = scaling;
  return cfg;
}

// Double-precision reference without group limit: scores, stable descending order of the
// selection scores (ties to the lower index), weights from the unbiased scores.
Routed reference(const std::vector<float>& logits, const RouteConfig& cfg,
                 const std::vector<float>* bias = nullptr) {
  const int n = cfg.num_experts;
  std::vector<double> score(n);
  if (cfg.score == ScoreFunction::kSoftmax) {
    const double max_logit = *std::max_element(logits.begin(), logits.end());
    double sum = 0.0;
    for (int e = 0; e < n; ++e) sum += std::exp(static_cast<double>(logits[e]) - max_logit);
    for (int e = 0; e < n; ++e) score[e] = std::exp(logits[e] - max_logit) / sum;
  } else {
    for (int e = 0; e < n; ++e) score[e] = 1.0 / (1.0 + std::exp(-static_cast<double>(logits[e])));
  }
  std::vector<double> select = score;
  if (bias != nullptr) {
    for (int e = 0; e < n; ++e) select[e] += (*bias)[e];
  }
  std::vector<int> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&select](int a, int b) { return select[a] > select[b]; });
  Routed r;
  double sum = 0.0;
  for (int j = 0; j < cfg.top_k; ++j) sum += score[order[j]];
  const double factor = cfg.renormalize ? cfg.scaling / sum : cfg.scaling;
  for (int j = 0; j < cfg.top_k; ++j) {
    r.ids.push_back(order[j]);
    r.weights.push_back(static_cast<float>(score[order[j]] * factor));
  }
  return r;
}

double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

std::vector<float> random_logits(std::mt19937& gen, int n, float stddev) {
  std::normal_distribution<float> dist(0.0f, stddev);
  std::vector<float> logits(n);
  for (float& v : logits) v = dist(gen);
  return logits;
}

void expect_weights_near(const std::vector<float>& got, const std::vector<float>& want,
                         double rel = 1e-5) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t j = 0; j < got.size(); ++j) {
    EXPECT_NEAR(got[j], want[j], rel * std::max(1e-6, std::fabs(static_cast<double>(want[j]))))
        << "weight " << j;
  }
}

TEST(RouteToken, SoftmaxMatchesDoubleReference) {
  std::mt19937 gen(1234);
  for (int num_experts : {1, 8, 64, 256}) {
    for (int top_k : {1, 2, 8, 16}) {
      if (top_k > num_experts) continue;
      for (bool renormalize : {true, false}) {
        for (int trial = 0; trial < 20; ++trial) {
          const auto logits = random_logits(gen, num_experts, 2.0f);
          const auto cfg = config(num_experts, top_k, ScoreFunction::kSoftmax, renormalize);
          const Routed got = route(logits, cfg), want = reference(logits, cfg);
          SCOPED_TRACE(testing::Message() << "E=" << num_experts << " k=" << top_k
                                          << " renormalize=" << renormalize << " trial=" << trial);
          EXPECT_EQ(got.ids, want.ids);
          expect_weights_near(got.weights, want.weights);
        }
      }
    }
  }
}

TEST(RouteToken, SigmoidMatchesDoubleReference) {
  std::mt19937 gen(99);
  for (int num_experts : {1, 8, 64, 256}) {
    for (int top_k : {1, 2, 8, 16}) {
      if (top_k > num_experts) continue;
      for (bool renormalize : {true, false}) {
        for (int trial = 0; trial < 20; ++trial) {
          const auto logits = random_logits(gen, num_experts, 3.0f);
          const auto cfg = config(num_experts, top_k, ScoreFunction::kSigmoid, renormalize);
          const Routed got = route(logits, cfg), want = reference(logits, cfg);
          SCOPED_TRACE(testing::Message() << "E=" << num_experts << " k=" << top_k
                                          << " renormalize=" << renormalize << " trial=" << trial);
          EXPECT_EQ(got.ids, want.ids);
          expect_weights_near(got.weights, want.weights);
        }
      }
    }
  }
}

TEST(RouteToken, LargeLogitsDoNotOverflowSoftmax) {
  const std::vector<float> logits = {1000.0f, 999.0f, -1000.0f, 998.0f};
  const auto cfg = config(4, 2, ScoreFunction::kSoftmax, /*renormalize=*/false);
  const Routed got = route(logits, cfg), want = reference(logits, cfg);
  EXPECT_EQ(got.ids, (std::vector<int32_t>{0, 1}));
  expect_weights_near(got.weights, want.weights);
}

TEST(RouteToken, TiesGoToTheLowerIndex) {
  for (ScoreFunction score : {ScoreFunction::kSoftmax, ScoreFunction::kSigmoid}) {
    // All equal: the first k experts, equal weights.
    const Routed all = route(std::vector<float>(8, 0.5f), config(8, 3, score));
    EXPECT_EQ(all.ids, (std::vector<int32_t>{0, 1, 2}));
    expect_weights_near(all.weights, {1.0f / 3, 1.0f / 3, 1.0f / 3});

    // Ties among the best and at the cut: 3 (index 1, 2, 4), then 1 (index 0, 5).
    const std::vector<float> logits = {1.0f, 3.0f, 3.0f, 0.0f, 3.0f, 1.0f};
    EXPECT_EQ(route(logits, config(6, 2, score)).ids, (std::vector<int32_t>{1, 2}));
    EXPECT_EQ(route(logits, config(6, 3, score)).ids, (std::vector<int32_t>{1, 2, 4}));
    EXPECT_EQ(route(logits, config(6, 4, score)).ids, (std::vector<int32_t>{1, 2, 4, 0}));
    EXPECT_EQ(route(logits, config(6, 5, score)).ids, (std::vector<int32_t>{1, 2, 4, 0, 5}));
  }
}

TEST(RouteToken, BiasChangesTheChoiceButNotTheWeights) {
  // sigmoid scores: 0.881, 0.731, 0.5, 0.269; the bias lifts expert 3 to 1.269 (the best).
  const std::vector<float> logits = {2.0f, 1.0f, 0.0f, -1.0f};
  const std::vector<float> bias = {0.0f, 0.0f, 0.0f, 1.0f};
  const auto raw = config(4, 2, ScoreFunction::kSigmoid, /*renormalize=*/false);
  const Routed unbiased = route(logits, raw);
  EXPECT_EQ(unbiased.ids, (std::vector<int32_t>{0, 1}));
  const Routed biased = route(logits, raw, &bias);
  EXPECT_EQ(biased.ids, (std::vector<int32_t>{3, 0}));
  expect_weights_near(biased.weights,
                      {static_cast<float>(sigmoid(-1.0)), static_cast<float>(sigmoid(2.0))});

  const auto renorm = config(4, 2, ScoreFunction::kSigmoid, /*renormalize=*/true);
  const Routed normalized = route(logits, renorm, &bias);
  EXPECT_EQ(normalized.ids, (std::vector<int32_t>{3, 0}));
  const double sum = sigmoid(-1.0) + sigmoid(2.0);
  expect_weights_near(normalized.weights, {static_cast<float>(sigmoid(-1.0) / sum),
                                           static_cast<float>(sigmoid(2.0) / sum)});

  // Softmax with a random bias, against the double reference.
  std::mt19937 gen(7);
  std::normal_distribution<float> small(0.0f, 0.05f);
  for (int trial = 0; trial < 50; ++trial) {
    const auto values = random_logits(gen, 64, 1.0f);
    std::vector<float> b(64);
    for (float& v : b) v = small(gen);
    for (ScoreFunction score : {ScoreFunction::kSoftmax, ScoreFunction::kSigmoid}) {
      const auto cfg = config(64, 8, score, /*renormalize=*/trial % 2 == 0);
      const Routed got = route(values, cfg, &b), want = reference(values, cfg, &b);
      EXPECT_EQ(got.ids, want.ids) << "trial " << trial;
      expect_weights_near(got.weights, want.weights);
    }
  }
}

// Eight experts in four groups of two: g0 = {0, 1}, g1 = {2, 3}, g2 = {4, 5}, g3 = {6, 7}.
RouteConfig grouped(int top_k, ScoreFunction score) {
  RouteConfig cfg = config(8, top_k, score);
  cfg.n_group = 4;
  cfg.topk_group = 2;
  return cfg;
}

TEST(RouteToken, GroupLimitWithoutBiasUsesEachGroupsBestScore) {
  // Group maxima (logits): g0 2.2, g1 3, g2 2.5, g3 0.5 -> groups g1 and g2 are allowed.
  // Unrestricted top-3 by logit would be 2 (3), 4 (2.5), 0 (2.2); restricted: 2, 4, 5 (2).
  const std::vector<float> logits = {2.2f, 0.9f, 3.0f, 0.0f, 2.5f, 2.0f, 0.5f, -1.0f};
  EXPECT_EQ(route(logits, config(8, 3, ScoreFunction::kSoftmax)).ids,
            (std::vector<int32_t>{2, 4, 0}));
  for (ScoreFunction score : {ScoreFunction::kSoftmax, ScoreFunction::kSigmoid}) {
    const Routed got = route(logits, grouped(3, score));
    EXPECT_EQ(got.ids, (std::vector<int32_t>{2, 4, 5}));
  }
  // Weights are the chosen experts' scores renormalised: softmax over all 8, then / sum.
  const Routed got = route(logits, grouped(3, ScoreFunction::kSoftmax));
  const double e2 = std::exp(3.0), e4 = std::exp(2.5), e5 = std::exp(2.0);
  const double sum = e2 + e4 + e5;
  expect_weights_near(got.weights, {static_cast<float>(e2 / sum), static_cast<float>(e4 / sum),
                                    static_cast<float>(e5 / sum)});
}

TEST(RouteToken, GroupScoreRuleIsExplicitAndIndependentOfTheBias) {
  // Sigmoid scores: g0 = {s(2.2), s(2.1)} = {0.900, 0.891}, g1 = {s(3), s(-5)} = {0.953, 0.007},
  // g2 = {s(2.5), s(-5)} = {0.924, 0.007}, g3 = {s(0), s(0)} = {0.5, 0.5}.
  const std::vector<float> logits = {2.2f, 2.1f, 3.0f, -5.0f, 2.5f, -5.0f, 0.0f, 0.0f};
  const std::vector<float> zero(8, 0.0f);
  RouteConfig top_two = grouped(2, ScoreFunction::kSigmoid);
  top_two.group_score = GroupScore::kTopTwoSum;
  // kMax: a group scores its best, bias or not: g1 (0.953) and g2 (0.924) -> experts 2, 4.
  EXPECT_EQ(route(logits, grouped(2, ScoreFunction::kSigmoid)).ids, (std::vector<int32_t>{2, 4}));
  EXPECT_EQ(route(logits, grouped(2, ScoreFunction::kSigmoid), &zero).ids,
            (std::vector<int32_t>{2, 4}));
  // kTopTwoSum: a group scores its two best, bias or not: g0 1.791, g3 1.0, g1 0.960,
  // g2 0.931 -> groups g0 and g3 -> experts 0, 1.
  EXPECT_EQ(route(logits, top_two).ids, (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(route(logits, top_two, &zero).ids, (std::vector<int32_t>{0, 1}));
  // A bias of +2 on expert 6: g3 = 2.5 + 0.5 = 3.0 is now the best group, then g0 (1.791);
  // top-2 by biased score: 6 (2.5), 0 (0.900). Weights: s(0), s(2.2), renormalised, x 2.5.
  std::vector<float> bias(8, 0.0f);
  bias[6] = 2.0f;
  top_two.scaling = 2.5f;
  const Routed got = route(logits, top_two, &bias);
  EXPECT_EQ(got.ids, (std::vector<int32_t>{6, 0}));
  const double sum = sigmoid(0.0) + sigmoid(2.2);
  expect_weights_near(got.weights, {static_cast<float>(2.5 * sigmoid(0.0) / sum),
                                    static_cast<float>(2.5 * sigmoid(2.2) / sum)});
}

TEST(RouteToken, GroupTiesGoToTheLowerGroup) {
  // All equal: groups g0 and g1 win the tie, then experts 0..3 in order.
  const std::vector<float> zero(8, 0.0f);
  for (GroupScore rule : {GroupScore::kMax, GroupScore::kTopTwoSum}) {
    RouteConfig cfg = grouped(4, ScoreFunction::kSigmoid);
    cfg.group_score = rule;
    const Routed got = route(std::vector<float>(8, 1.0f), cfg, &zero);
    EXPECT_EQ(got.ids, (std::vector<int32_t>{0, 1, 2, 3}));
    expect_weights_near(got.weights, {0.25f, 0.25f, 0.25f, 0.25f});
  }
}

TEST(RouteToken, GroupLimitDeepSeekShapeMatchesBruteForce) {
  // 256 experts, 8 groups of 32, 4 groups chosen, top-8, sigmoid, bias, scaling 2.5:
  // the reference masks experts outside the chosen groups and reuses the plain reference.
  std::mt19937 gen(2024);
  std::normal_distribution<float> small(0.0f, 0.1f);
  for (int trial = 0; trial < 30; ++trial) {
    const auto logits = random_logits(gen, 256, 2.0f);
    std::vector<float> bias(256);
    for (float& v : bias) v = small(gen);
    RouteConfig cfg = config(256, 8, ScoreFunction::kSigmoid, true, 2.5f);
    cfg.n_group = 8;
    cfg.topk_group = 4;
    cfg.group_score = GroupScore::kTopTwoSum;
    // Group scores in double: sum of the two best biased scores.
    std::vector<std::pair<double, int>> groups;
    for (int g = 0; g < 8; ++g) {
      std::vector<double> v;
      for (int e = g * 32; e < (g + 1) * 32; ++e) v.push_back(sigmoid(logits[e]) + bias[e]);
      std::sort(v.rbegin(), v.rend());
      groups.push_back({v[0] + v[1], g});
    }
    std::stable_sort(groups.begin(), groups.end(),
                     [](const auto& a, const auto& b) { return a.first > b.first; });
    std::vector<bool> allowed(8, false);
    for (int j = 0; j < 4; ++j) allowed[groups[j].second] = true;
    // Mask disallowed experts with a bias far below any score.
    std::vector<float> masked = bias;
    for (int e = 0; e < 256; ++e) {
      if (!allowed[e / 32]) masked[e] = -100.0f;
    }
    const Routed got = route(logits, cfg, &bias);
    const Routed want =
        reference(logits, config(256, 8, ScoreFunction::kSigmoid, true, 2.5f), &masked);
    EXPECT_EQ(got.ids, want.ids) << "trial " << trial;
    expect_weights_near(got.weights, want.weights);
  }
}

TEST(RouteToken, RenormalizeAndScaling) {
  const std::vector<float> logits = {0.3f, -1.2f, 2.0f, 0.7f, -0.1f};
  for (ScoreFunction score : {ScoreFunction::kSoftmax, ScoreFunction::kSigmoid}) {
    const Routed raw = route(logits, config(5, 3, score, /*renormalize=*/false, 1.0f));
    const Routed scaled = route(logits, config(5, 3, score, /*renormalize=*/false, 2.0f));
    const Routed norm = route(logits, config(5, 3, score, /*renormalize=*/true, 1.0f));
    const Routed norm_scaled = route(logits, config(5, 3, score, /*renormalize=*/true, 2.5f));
    EXPECT_EQ(raw.ids, (std::vector<int32_t>{2, 3, 0}));
    EXPECT_EQ(norm_scaled.ids, raw.ids);
    const float sum = raw.weights[0] + raw.weights[1] + raw.weights[2];
    for (int j = 0; j < 3; ++j) {
      EXPECT_NEAR(scaled.weights[j], 2.0f * raw.weights[j], 1e-6f);
      EXPECT_NEAR(norm.weights[j], raw.weights[j] / sum, 1e-6f);
      EXPECT_NEAR(norm_scaled.weights[j], 2.5f * raw.weights[j] / sum, 1e-6f);
    }
    EXPECT_NEAR(norm_scaled.weights[0] + norm_scaled.weights[1] + norm_scaled.weights[2], 2.5f,
                1e-5f);
  }
}

TEST(RouteToken, TopKEqualsNumExperts) {
  std::mt19937 gen(5);
  for (int num_experts : {1, 4, 16}) {
    const auto logits = random_logits(gen, num_experts, 1.0f);
    // Softmax: every expert, best first; the raw weights already sum to 1.
    const auto cfg = config(num_experts, num_experts, ScoreFunction::kSoftmax, false);
    const Routed got = route(logits, cfg), want = reference(logits, cfg);
    EXPECT_EQ(got.ids, want.ids);
    std::vector<int32_t> sorted = got.ids;
    std::sort(sorted.begin(), sorted.end());
    std::vector<int32_t> all(num_experts);
    std::iota(all.begin(), all.end(), 0);
    EXPECT_EQ(sorted, all);
    EXPECT_NEAR(std::accumulate(got.weights.begin(), got.weights.end(), 0.0), 1.0, 1e-5);
    // Sigmoid, renormalised.
    const auto sig = config(num_experts, num_experts, ScoreFunction::kSigmoid, true);
    const Routed s = route(logits, sig), s_want = reference(logits, sig);
    EXPECT_EQ(s.ids, s_want.ids);
    expect_weights_near(s.weights, s_want.weights);
  }
}

}  // namespace
}  // namespace moe_ep::core

#include "core/fault_domains.h"

#include <algorithm>
#include <numeric>

#include "core/placement_common.h"

namespace moe_ep::core {
namespace {

// One layer's slots with the indexes the three steps read.
class DomainLayout {
 public:
  DomainLayout(const std::vector<std::pair<int, int>>& gpu_expert, const std::vector<double>& load,
               int num_gpus, int per_domain)
      : load_(load),
        per_domain_(per_domain),
        gpu_(gpu_expert.size()),
        expert_(gpu_expert.size()),
        slots_of_gpu_(num_gpus),
        slots_of_expert_(load.size()),
        gpu_load_(num_gpus, 0.0) {
    for (size_t s = 0; s < gpu_expert.size(); ++s) {
      gpu_[s] = gpu_expert[s].first;
      expert_[s] = gpu_expert[s].second;
      slots_of_gpu_[gpu_[s]].push_back(static_cast<int>(s));
      slots_of_expert_[expert_[s]].push_back(static_cast<int>(s));
    }
    refresh_loads();
  }

  void add_copies() {
    std::vector<char> tried(load_.size(), 0);
    for (;;) {
      int target = -1;
      for (int e = 0; e < num_experts(); ++e) {
        if (count(e) == 1 && !tried[e] && (target < 0 || load_[e] > load_[target])) target = e;
      }
      if (target < 0) return;
      tried[target] = 1;
      const int home = domain(gpu_[slots_of_expert_[target][0]]);
      std::vector<int> donors;
      for (int e = 0; e < num_experts(); ++e) {
        if (count(e) >= 3) donors.push_back(e);
      }
      std::sort(donors.begin(), donors.end(), [&](int a, int b) {
        const double lost_a = load_[a] / (count(a) - 1), lost_b = load_[b] / (count(b) - 1);
        return lost_a < lost_b || (lost_a == lost_b && a < b);
      });
      for (int donor : donors) {
        int slot = -1;
        for (int s : slots_of_expert_[donor]) {
          const int g = gpu_[s];
          if (domain(g) == home || holds(g, target)) continue;
          if (slot < 0 || gpu_load_[g] < gpu_load_[gpu_[slot]]) slot = s;
        }
        if (slot < 0) continue;
        retarget(slot, target);
        break;
      }
    }
  }

  // EPLB's rule for the copies beyond two: a slot of B (the expert losing least load per
  // replica, three copies or more) becomes one of A (the most load per replica) while B's
  // load per replica after the loss stays below A's now; the largest load per replica falls.
  void move_spare_copies() {
    for (int step = 0; step < num_slots() * num_experts(); ++step) {
      int a = 0;
      for (int e = 1; e < num_experts(); ++e) {
        if (per_replica(e) > per_replica(a)) a = e;
      }
      int slot = -1;
      double lost = 0.0;
      for (int s = 0; s < num_slots(); ++s) {
        const int b = expert_[s];
        if (b == a || count(b) < 3 || holds(gpu_[s], a)) continue;
        const double after = load_[b] / (count(b) - 1);
        if (slot < 0 || after < lost ||
            (after == lost && gpu_load_[gpu_[s]] < gpu_load_[gpu_[slot]])) {
          slot = s;
          lost = after;
        }
      }
      if (slot < 0 || !(lost < per_replica(a) - improvement_epsilon(per_replica(a)))) return;
      retarget(slot, a);
    }
  }

  void spread_over_domains() {
    std::vector<int> order(num_experts());
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return load_[a] > load_[b]; });
    for (int e : order) {
      if (count(e) < 2 || spans_domains(e)) continue;
      int best_s = -1, best_t = -1;
      double best = 0.0;
      for (int s : slots_of_expert_[e]) {
        for (int t = 0; t < num_slots(); ++t) {
          const int f = expert_[t], from = gpu_[s], to = gpu_[t];
          if (f == e || domain(to) == domain(from) || holds(to, e) || holds(from, f)) continue;
          if (count(f) >= 2 && spans_domains(f) && !spans_domains(f, t, from)) continue;
          const double shift = per_replica(e) - per_replica(f);
          const double worst = std::max(gpu_load_[from] - shift, gpu_load_[to] + shift);
          if (best_s < 0 || worst < best) {
            best = worst;
            best_s = s;
            best_t = t;
          }
        }
      }
      if (best_s >= 0) exchange(best_s, best_t);
    }
  }

  void balance() {
    for (int iteration = 0; iteration < 4 * num_gpus(); ++iteration) {
      const int heavy = static_cast<int>(std::max_element(gpu_load_.begin(), gpu_load_.end()) -
                                         gpu_load_.begin());
      const double top = gpu_load_[heavy];
      double best = top - improvement_epsilon(top);
      int best_x = -1, best_y = -1;
      for (int light = 0; light < num_gpus(); ++light) {
        if (light == heavy || gpu_load_[light] >= best) continue;
        for (int x : slots_of_gpu_[heavy]) {
          for (int y : slots_of_gpu_[light]) {
            const double shift = per_replica(expert_[x]) - per_replica(expert_[y]);
            if (shift <= 0) continue;
            const double worst = std::max(top - shift, gpu_load_[light] + shift);
            if (worst < best && keeps_protection(x, y)) {
              best = worst;
              best_x = x;
              best_y = y;
            }
          }
        }
      }
      if (best_x < 0) return;
      exchange(best_x, best_y);
    }
  }

  std::vector<std::pair<int, int>> pairs() const {
    std::vector<std::pair<int, int>> out;
    for (int s = 0; s < num_slots(); ++s) out.emplace_back(gpu_[s], expert_[s]);
    return out;
  }

 private:
  int num_experts() const { return static_cast<int>(load_.size()); }
  int num_gpus() const { return static_cast<int>(slots_of_gpu_.size()); }
  int num_slots() const { return static_cast<int>(gpu_.size()); }
  int domain(int g) const { return g / per_domain_; }
  int count(int e) const { return static_cast<int>(slots_of_expert_[e].size()); }
  double per_replica(int e) const { return load_[e] / count(e); }

  bool holds(int g, int e) const {
    for (int s : slots_of_gpu_[g]) {
      if (expert_[s] == e) return true;
    }
    return false;
  }

  // Whether e's slots lie in two domains or more, with slot `moved` on GPU `to` if given.
  bool spans_domains(int e, int moved = -1, int to = -1) const {
    int first = -1;
    for (int s : slots_of_expert_[e]) {
      const int d = domain(s == moved ? to : gpu_[s]);
      if (first < 0) {
        first = d;
      } else if (d != first) {
        return true;
      }
    }
    return false;
  }

  // Slots x and y may trade GPUs: no double, and neither expert loses its protection.
  bool keeps_protection(int x, int y) const {
    const int e = expert_[x], f = expert_[y], gx = gpu_[x], gy = gpu_[y];
    if (e == f || holds(gy, e) || holds(gx, f)) return false;
    return (!spans_domains(e) || spans_domains(e, x, gy)) &&
           (!spans_domains(f) || spans_domains(f, y, gx));
  }

  void retarget(int slot, int expert) {
    auto& old = slots_of_expert_[expert_[slot]];
    old.erase(std::find(old.begin(), old.end(), slot));
    slots_of_expert_[expert].push_back(slot);
    expert_[slot] = expert;
    refresh_loads();
  }

  // Slots x and y trade GPUs.
  void exchange(int x, int y) {
    const int gx = gpu_[x], gy = gpu_[y];
    std::replace(slots_of_gpu_[gx].begin(), slots_of_gpu_[gx].end(), x, y);
    std::replace(slots_of_gpu_[gy].begin(), slots_of_gpu_[gy].end(), y, x);
    gpu_[x] = gy;
    gpu_[y] = gx;
    const double shift = per_replica(expert_[x]) - per_replica(expert_[y]);
    gpu_load_[gx] -= shift;
    gpu_load_[gy] += shift;
  }

  void refresh_loads() {
    std::fill(gpu_load_.begin(), gpu_load_.end(), 0.0);
    for (int s = 0; s < num_slots(); ++s) gpu_load_[gpu_[s]] += per_replica(expert_[s]);
  }

  const std::vector<double>& load_;
  int per_domain_;
  std::vector<int> gpu_, expert_;
  std::vector<std::vector<int>> slots_of_gpu_, slots_of_expert_;
  std::vector<double> gpu_load_;
};

}  // namespace

int gpus_per_domain(FaultDomain domain, int gpus_per_node) {
  switch (domain) {
    case FaultDomain::kGpu:
      return 1;
    case FaultDomain::kNode:
      return gpus_per_node;
    case FaultDomain::kNone:
      break;
  }
  return 0;
}

void protect_against_domain_loss(std::vector<std::pair<int, int>>& gpu_expert,
                                 const std::vector<double>& load, int num_gpus,
                                 int gpus_per_domain) {
  if (gpus_per_domain < 1 || gpus_per_domain >= num_gpus) return;  // one domain: nothing helps
  DomainLayout layout(gpu_expert, load, num_gpus, gpus_per_domain);
  layout.add_copies();
  layout.move_spare_copies();
  layout.spread_over_domains();
  layout.balance();
  gpu_expert = layout.pairs();
}

std::vector<int> unprotected_experts(const std::vector<std::pair<int, int>>& gpu_expert,
                                     int num_experts, int gpus_per_domain) {
  std::vector<int> first(num_experts, -1);
  std::vector<char> spans(num_experts, 0);
  for (const auto& [gpu, expert] : gpu_expert) {
    const int d = gpus_per_domain > 0 ? gpu / gpus_per_domain : 0;
    if (first[expert] < 0) {
      first[expert] = d;
    } else if (first[expert] != d) {
      spans[expert] = 1;
    }
  }
  std::vector<int> out;
  for (int e = 0; e < num_experts; ++e) {
    if (!spans[e]) out.push_back(e);
  }
  return out;
}

}  // namespace moe_ep::core

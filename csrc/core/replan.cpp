#include "core/replan.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <tuple>

#include "core/link_search.h"
#include "core/node_hits.h"
#include "core/placement_common.h"

namespace moe_ep::core {
namespace {

// Works on (GPU, expert) pairs; a move is a pair the previous placement lacked. Every
// optional step is recorded, so that the plan for a budget is the best recorded state
// within it: the search itself never looks at the budget, and a larger budget can only
// choose among more states (never a worse plan).
class Replan {
 public:
  Replan(const LayerStats& stats, const std::vector<double>& load, const std::vector<int>& capacity,
         int max_count)
      : load_(load),
        capacity_(capacity),
        num_experts_(static_cast<int>(load.size())),
        num_gpus_(static_cast<int>(capacity.size())),
        max_count_(max_count),
        count_(num_experts_, 0),
        experts_of_gpu_(num_gpus_),
        gpus_of_expert_(num_experts_),
        gpu_load_(num_gpus_, 0.0),
        previous_(static_cast<size_t>(num_gpus_) * num_experts_, 0) {
    for (size_t s = 0; s < stats.previous_gpus.size(); ++s) {
      const int g = stats.previous_gpus[s], e = stats.previous_phy2log[s];
      previous_[index(g, e)] = 1;
      experts_of_gpu_[g].push_back(e);
      gpus_of_expert_[e].push_back(g);
      ++count_[e];
    }
    for (int g = 0; g < num_gpus_; ++g) refresh_gpu(g);
    const double total = std::accumulate(load.begin(), load.end(), 0.0);
    load_unit_ = total > 0 ? 1e-9 * total / num_gpus_ : 1.0;
  }

  // Forced changes: drops replicas beyond `slots` (less the experts without a slot, which
  // take one each), sheds the slots of GPUs over capacity and fills every GPU's room.
  void take_previous(int64_t slots) {
    const int64_t homeless = std::count(count_.begin(), count_.end(), 0);
    while (total_slots() + homeless > slots) {  // free: fewest load lost per replica first
      int expert = -1;
      for (int e = 0; e < num_experts_; ++e) {
        if (count_[e] > 1 &&
            (expert < 0 || load_[e] / (count_[e] - 1) < load_[expert] / (count_[expert] - 1))) {
          expert = e;
        }
      }
      remove(heaviest_holder(expert, true), expert);
    }
    for (int g = 0; g < num_gpus_; ++g) {
      while (static_cast<int>(experts_of_gpu_[g].size()) > capacity_[g]) {
        const auto& held = experts_of_gpu_[g];
        remove(g, *std::max_element(held.begin(), held.end(), [&](int a, int b) {
                 return per_replica(a) < per_replica(b) ||
                        (per_replica(a) == per_replica(b) && a > b);
               }));
      }
    }
    while (total_slots() < slots) {
      int expert = static_cast<int>(std::find(count_.begin(), count_.end(), 0) - count_.begin());
      if (expert == num_experts_) {  // every expert has a slot: the most loaded per replica
        expert = -1;
        for (int e = 0; e < num_experts_; ++e) {
          if (count_[e] < max_count_ && (expert < 0 || per_replica(e) > per_replica(expert))) {
            expert = e;
          }
        }
      }
      if (expert < 0) throw std::logic_error("placement: no expert can take another replica");
      add_to_lightest(expert);
    }
  }

  // The optional steps, each recorded: replica transfers, slot swaps for the GPU load,
  // then (node_step) slot swaps between nodes for the link load.
  void search(const ClusterSpec& cluster, bool node_step, const std::vector<int>& samples,
              int top_k) {
    cluster_ = &cluster;
    samples_ = &samples;
    top_k_ = top_k;
    link_matters_ = node_step && cluster.num_nodes > 1;
    start_ = {experts_of_gpu_, gpus_of_expert_, count_, gpu_load_, moves_};
    forced_ = moves_;
    recording_ = true;
    record(kUnknownLink);
    transfer_replicas();
    swap_slots();
    if (link_matters_) lower_link_load();
    recording_ = false;
  }

  // Goes to the best recorded state whose optional moves fit `budget` (-1: any): the lowest
  // GPU maximum, then the lowest link load (computed here for the states that tie and had
  // none), then the fewest moves.
  void rewind(int budget) {
    std::vector<size_t> tied;
    for (size_t i = 0; i < states_.size(); ++i) {
      if (budget >= 0 && states_[i].moves - forced_ > budget) continue;
      if (!tied.empty() && states_[i].gpu_max > states_[tied[0]].gpu_max) continue;
      if (!tied.empty() && states_[i].gpu_max < states_[tied[0]].gpu_max) tied.clear();
      tied.push_back(i);
    }
    size_t best = tied[0];
    if (tied.size() > 1 && link_matters_) {
      for (size_t i : tied) {
        if (states_[i].link == kUnknownLink) {
          go_to(i);
          states_[i].link = busiest_node_copies();
        }
      }
    }
    for (size_t i : tied) {
      if (std::tie(states_[i].link, states_[i].moves) <
          std::tie(states_[best].link, states_[best].moves)) {
        best = i;
      }
    }
    go_to(best);
  }

  int moves() const { return moves_; }
  const std::vector<int>& count() const { return count_; }
  const std::vector<std::vector<int>>& experts_of_gpu() const { return experts_of_gpu_; }

 private:
  static constexpr double kUnknownLink = std::numeric_limits<double>::infinity();
  struct Op {
    int gpu, expert;
    bool add;
  };
  struct State {
    size_t ops;       // ops_ applied from the start
    int64_t gpu_max;  // the largest GPU load in units of load_unit_ (ties are ties)
    double link;      // the busiest node's copies (kUnknownLink: not computed yet)
    int moves;
  };
  struct Snapshot {
    std::vector<std::vector<int>> experts_of_gpu, gpus_of_expert;
    std::vector<int> count;
    std::vector<double> gpu_load;
    int moves = 0;
  };

  size_t index(int g, int e) const { return static_cast<size_t>(g) * num_experts_ + e; }
  double per_replica(int e) const { return count_[e] ? load_[e] / count_[e] : load_[e]; }
  int64_t total_slots() const { return std::accumulate(count_.begin(), count_.end(), int64_t{0}); }
  bool holds(int g, int e) const {
    const auto& held = experts_of_gpu_[g];
    return std::find(held.begin(), held.end(), e) != held.end();
  }
  // The move-count change of placing (+1) or removing (-1) expert e on GPU g.
  int cost(int g, int e) const { return previous_[index(g, e)] ? 0 : 1; }
  double gpu_max() const { return *std::max_element(gpu_load_.begin(), gpu_load_.end()); }

  void record(double link) {
    states_.push_back({ops_.size(), std::llround(gpu_max() / load_unit_), link, moves_});
  }
  void refresh_gpu(int g) {
    double sum = 0.0;
    for (int e : experts_of_gpu_[g]) sum += per_replica(e);
    gpu_load_[g] = sum;
  }
  void refresh_expert(int e) {
    for (int g : gpus_of_expert_[e]) refresh_gpu(g);
  }
  void add(int g, int e) {
    if (recording_) ops_.push_back({g, e, true});
    experts_of_gpu_[g].push_back(e);
    gpus_of_expert_[e].push_back(g);
    ++count_[e];
    moves_ += cost(g, e);
    refresh_expert(e);
  }
  void remove(int g, int e) {
    if (recording_) ops_.push_back({g, e, false});
    auto& held = experts_of_gpu_[g];
    held.erase(std::find(held.begin(), held.end(), e));
    auto& hosts = gpus_of_expert_[e];
    hosts.erase(std::find(hosts.begin(), hosts.end(), g));
    --count_[e];
    moves_ -= cost(g, e);
    refresh_gpu(g);
    refresh_expert(e);
  }
  bool has_room(int g) const { return static_cast<int>(experts_of_gpu_[g].size()) < capacity_[g]; }

  // The holder of e with the highest load (over capacity first when asked); ties to the
  // lower GPU.
  int heaviest_holder(int e, bool over_capacity_first) const {
    int best = -1;
    auto key = [&](int g) {
      const bool over =
          over_capacity_first && static_cast<int>(experts_of_gpu_[g].size()) > capacity_[g];
      return std::make_pair(over, gpu_load_[g]);
    };
    for (int g : gpus_of_expert_[e]) {
      if (best < 0 || key(g) > key(best) || (key(g) == key(best) && g < best)) best = g;
    }
    return best;
  }

  // A new slot of e on the lightest GPU with room that lacks e; when every GPU with room
  // holds e, a slot of a full GPU moves into the room first and e takes its place.
  void add_to_lightest(int e) {
    int target = -1;
    for (int g = 0; g < num_gpus_; ++g) {
      if (has_room(g) && !holds(g, e) && (target < 0 || gpu_load_[g] < gpu_load_[target])) {
        target = g;
      }
    }
    if (target >= 0) return add(target, e);
    for (int room = 0; room < num_gpus_; ++room) {
      if (!has_room(room)) continue;
      for (int full = 0; full < num_gpus_; ++full) {
        if (has_room(full) || capacity_[full] == 0 || holds(full, e)) continue;
        for (int moved : experts_of_gpu_[full]) {
          if (holds(room, moved)) continue;
          remove(full, moved);
          add(room, moved);
          return add(full, e);
        }
      }
    }
    throw std::logic_error("placement: no GPU can take another replica");
  }

  // A replica of B (the least load per replica after losing one) becomes one of A (the
  // most load per replica) on the same GPU, while B's new load per replica stays below A's
  // current one: the largest load per replica never rises and the sorted loads per replica
  // fall, so this ends at the counts of a fresh plan.
  void transfer_replicas() {
    std::vector<char> skipped(num_experts_);
    for (;;) {
      int a = -1;
      for (int e = 0; e < num_experts_; ++e) {
        if (count_[e] < max_count_ && (a < 0 || per_replica(e) > per_replica(a))) a = e;
      }
      if (a < 0) return;
      const double top = per_replica(a);
      // The donor losing least, skipping donors whose GPUs all hold a already.
      std::fill(skipped.begin(), skipped.end(), 0);
      int b = -1, gpu = -1;
      for (;;) {
        b = -1;
        for (int e = 0; e < num_experts_; ++e) {
          if (e == a || count_[e] < 2 || skipped[e]) continue;
          if (b < 0 || load_[e] / (count_[e] - 1) < load_[b] / (count_[b] - 1)) b = e;
        }
        if (b < 0 || !(load_[b] / (count_[b] - 1) < top - improvement_epsilon(top))) return;
        gpu = cheapest_lightest_holder(b, a);
        if (gpu >= 0) break;
        skipped[b] = 1;
      }
      remove(gpu, b);
      add(gpu, a);
      record(kUnknownLink);
    }
  }

  // The holder of b that lacks a where placing a costs fewest moves, then the lightest (it
  // trades b's slot for a heavier one of a); -1 when every holder of b holds a.
  int cheapest_lightest_holder(int b, int a) const {
    int gpu = -1;
    for (int g : gpus_of_expert_[b]) {
      if (holds(g, a)) continue;
      const int c = cost(g, a) - cost(g, b);
      const int best = gpu < 0 ? 0 : cost(gpu, a) - cost(gpu, b);
      if (gpu < 0 || c < best ||
          (c == best &&
           (gpu_load_[g] < gpu_load_[gpu] || (gpu_load_[g] == gpu_load_[gpu] && g < gpu)))) {
        gpu = g;
      }
    }
    return gpu;
  }

  // Swaps a slot of the heaviest GPU with one of another GPU while that lowers the heaviest
  // GPU's load: the lowest resulting maximum first, ties to the fewest moves.
  void swap_slots() {
    for (int iteration = 0; iteration < 4 * num_gpus_; ++iteration) {
      const int heavy = static_cast<int>(std::max_element(gpu_load_.begin(), gpu_load_.end()) -
                                         gpu_load_.begin());
      const double top = gpu_load_[heavy];
      double best = top - improvement_epsilon(top);
      int best_cost = 0, best_light = -1, best_x = -1, best_y = -1;
      for (int light = 0; light < num_gpus_; ++light) {
        if (light == heavy || gpu_load_[light] >= best) continue;
        for (int x : experts_of_gpu_[heavy]) {
          if (holds(light, x)) continue;
          for (int y : experts_of_gpu_[light]) {
            const double shift = per_replica(x) - per_replica(y);
            if (shift <= 0 || holds(heavy, y)) continue;
            const double worst = std::max(top - shift, gpu_load_[light] + shift);
            const int c = cost(light, x) + cost(heavy, y) - cost(heavy, x) - cost(light, y);
            if (worst < best || (worst == best && best_light >= 0 && c < best_cost)) {
              best = worst;
              best_cost = c;
              best_light = light;
              best_x = x;
              best_y = y;
            }
          }
        }
      }
      if (best_light < 0) return;
      exchange(heavy, best_x, best_light, best_y);
      record(kUnknownLink);
    }
  }

  // GPU gx's replica of x and GPU gy's replica of y trade places.
  void exchange(int gx, int x, int gy, int y) {
    remove(gx, x);
    remove(gy, y);
    add(gx, y);
    add(gy, x);
  }

  // The state after the first states_[i].ops recorded operations.
  void go_to(size_t i) {
    experts_of_gpu_ = start_.experts_of_gpu;
    gpus_of_expert_ = start_.gpus_of_expert;
    count_ = start_.count;
    gpu_load_ = start_.gpu_load;
    moves_ = start_.moves;
    const bool recording = recording_;
    recording_ = false;
    for (size_t k = 0; k < states_[i].ops; ++k) {
      const Op& op = ops_[k];
      if (op.add) {
        add(op.gpu, op.expert);
      } else {
        remove(op.gpu, op.expert);
      }
    }
    recording_ = recording;
  }

  SlotLayout current_layout() const {
    SlotLayout layout(num_gpus_);
    for (int g = 0; g < num_gpus_; ++g) {
      for (int e : experts_of_gpu_[g]) layout.add(e, per_replica(e), g);
    }
    return layout;
  }

  double busiest_node_copies() const {
    const NodeHits hits(current_layout(), count_, load_, *cluster_, *samples_, top_k_);
    return hits.hits()[hits.busiest()];
  }

  // The node step: slot swaps between nodes that lower the busiest node's copies without
  // raising the largest GPU load (link_search.h).
  void lower_link_load() {
    SlotLayout layout = current_layout();
    NodeHits hits(layout, count_, load_, *cluster_, *samples_, top_k_);
    auto busiest = [&] { return hits.hits()[hits.busiest()]; };
    states_.back().link = busiest();
    LinkSearchOptions options;
    options.gpu_cap = gpu_max();
    options.max_swaps = std::max(2 * cluster_->num_nodes, layout.num_slots());
    lower_busiest_node(layout, hits, *cluster_, options, [&](int x, int y) {
      // Slot x now sits where y was and the other way round.
      exchange(layout.slot_gpu[y], layout.slot_expert[x], layout.slot_gpu[x],
               layout.slot_expert[y]);
      record(busiest());
    });
  }

  const std::vector<double>& load_;
  const std::vector<int>& capacity_;
  int num_experts_, num_gpus_, max_count_;
  std::vector<int> count_;
  std::vector<std::vector<int>> experts_of_gpu_;
  std::vector<std::vector<int>> gpus_of_expert_;
  std::vector<double> gpu_load_;
  std::vector<char> previous_;  // G x E: the pair was in the previous placement
  int moves_ = 0;
  double load_unit_ = 1.0;
  bool recording_ = false;
  int forced_ = 0;
  const ClusterSpec* cluster_ = nullptr;
  const std::vector<int>* samples_ = nullptr;
  int top_k_ = 1;
  bool link_matters_ = false;
  Snapshot start_;
  std::vector<Op> ops_;
  std::vector<State> states_;
};

}  // namespace

Replanned replan_layer(const LayerStats& stats, const std::vector<double>& load,
                       const std::vector<int>& capacity, int max_moves, const ClusterSpec& cluster,
                       bool node_step, int top_k) {
  const int gpus_with_room = static_cast<int>(
      std::count_if(capacity.begin(), capacity.end(), [](int c) { return c > 0; }));
  const int64_t slots = std::accumulate(capacity.begin(), capacity.end(), int64_t{0});
  Replan replan(stats, load, capacity, gpus_with_room);
  replan.take_previous(slots);
  replan.search(cluster, node_step, stats.coactivation, top_k);
  replan.rewind(max_moves);
  Replanned result;
  result.count = replan.count();
  result.moves = replan.moves();
  for (int g = 0; g < static_cast<int>(capacity.size()); ++g) {
    for (int e : replan.experts_of_gpu()[g]) result.gpu_expert.emplace_back(g, e);
  }
  return result;
}

}  // namespace moe_ep::core

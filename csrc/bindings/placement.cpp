// Bindings of the placement planner (csrc/core/placement.h). Plain dicts and lists cross the
// boundary (moe_ep/plan.py wraps them in dataclasses), so no C++ class is registered twice
// when other modules bind the shared ClusterSpec.
#include "core/placement.h"

#include <pybind11/stl.h>

#include <string>

#include "bindings/bindings.h"

namespace py = pybind11;

namespace moe_ep::bindings {
namespace {

template <typename T>
T field(const py::dict& dict, const char* name, T fallback) {
  return dict.contains(name) ? dict[name].cast<T>() : fallback;
}

core::PlacementModel to_model(const py::dict& d) {
  core::PlacementModel m;
  m.num_layers = field(d, "num_layers", m.num_layers);
  m.dense_layers = field(d, "dense_layers", m.dense_layers);
  m.experts_per_layer = field(d, "experts_per_layer", m.experts_per_layer);
  m.top_k = field(d, "top_k", m.top_k);
  m.bytes_per_expert = field(d, "bytes_per_expert", m.bytes_per_expert);
  m.dense_layer_bytes = field(d, "dense_layer_bytes", m.dense_layer_bytes);
  m.n_group = field(d, "n_group", m.n_group);
  m.topk_group = field(d, "topk_group", m.topk_group);
  m.expert_group = field(d, "expert_group", m.expert_group);
  return m;
}

core::ClusterSpec to_cluster(const py::dict& d) {
  core::ClusterSpec c;
  c.num_nodes = field(d, "num_nodes", c.num_nodes);
  c.gpus_per_node = field(d, "gpus_per_node", c.gpus_per_node);
  c.intra_node.bandwidth_bytes_per_s = field(d, "intra_node_bandwidth", 0.0);
  c.intra_node.latency_s = field(d, "intra_node_latency", 0.0);
  c.inter_node.bandwidth_bytes_per_s = field(d, "inter_node_bandwidth", 0.0);
  c.inter_node.latency_s = field(d, "inter_node_latency", 0.0);
  c.gpu_memory_bytes = field(d, "gpu_memory_bytes", c.gpu_memory_bytes);
  return c;
}

core::PlanOptions to_options(const py::dict& d) {
  core::PlanOptions o;
  const auto policy = field<std::string>(d, "policy", "balanced");
  if (policy == "balanced") {
    o.policy = core::Policy::kBalanced;
  } else if (policy == "greedy") {
    o.policy = core::Policy::kGreedy;
  } else if (policy == "sequential") {
    o.policy = core::Policy::kSequential;
  } else {
    throw std::invalid_argument("policy: expected balanced, greedy or sequential, got " + policy);
  }
  o.redundant_experts = field(d, "redundant_experts", o.redundant_experts);
  o.memory_reserve_bytes = field(d, "memory_reserve_bytes", o.memory_reserve_bytes);
  o.topology_aware = field(d, "topology_aware", o.topology_aware);
  o.max_moves = field(d, "max_moves", o.max_moves);
  const auto domain = field<std::string>(d, "fault_domain", "none");
  if (domain == "gpu") {
    o.fault_domain = core::FaultDomain::kGpu;
  } else if (domain == "node") {
    o.fault_domain = core::FaultDomain::kNode;
  } else if (domain != "none") {
    throw std::invalid_argument("fault_domain: expected none, gpu or node, got " + domain);
  }
  return o;
}

std::vector<core::LayerStats> to_stats(const py::list& list) {
  std::vector<core::LayerStats> stats;
  for (const auto& item : list) {
    const auto d = item.cast<py::dict>();
    core::LayerStats s;
    s.expert_load = field(d, "expert_load", s.expert_load);
    s.coactivation = field(d, "coactivation", s.coactivation);
    s.previous_gpus = field(d, "previous_gpus", s.previous_gpus);
    s.previous_phy2log = field(d, "previous_phy2log", s.previous_phy2log);
    stats.push_back(std::move(s));
  }
  return stats;
}

py::dict to_dict(const core::LayerMetrics& m) {
  py::dict d;
  d["max_gpu_load"] = m.max_gpu_load;
  d["mean_gpu_load"] = m.mean_gpu_load;
  d["max_link_load"] = m.max_link_load;
  d["max_nvlink_load"] = m.max_nvlink_load;
  return d;
}

py::dict to_dict(const core::Placement& plan) {
  py::list layers;
  for (const auto& layer : plan.layers) {
    py::dict d;
    d["layer"] = layer.layer;
    d["dense"] = layer.dense;
    d["phy2log"] = layer.phy2log;
    d["log2phy"] = layer.log2phy;
    d["replica_count"] = layer.replica_count;
    d["gpus"] = layer.gpus;
    d["moves"] = layer.moves;
    d["metrics"] = to_dict(layer.metrics);
    layers.append(d);
  }
  py::dict d;
  d["layers"] = layers;
  d["gpu_memory_used"] = plan.gpu_memory_used;
  return d;
}

}  // namespace

void bind_placement(py::module_& m) {
  m.def(
      "plan_placement",
      [](const py::dict& model, const py::dict& cluster, const py::list& stats,
         const py::dict& options) {
        const auto core_model = to_model(model);
        const auto core_cluster = to_cluster(cluster);
        const auto core_stats = to_stats(stats);
        const auto core_options = to_options(options);
        core::Placement plan;
        {
          py::gil_scoped_release release;  // the planner touches no Python object
          plan = core::plan_placement(core_model, core_cluster, core_stats, core_options);
        }
        return to_dict(plan);
      },
      py::arg("model"), py::arg("cluster"), py::arg("stats"), py::arg("options"),
      "Plans every layer (see csrc/core/placement.h); plain dicts in and out. Raises "
      "ValueError naming the bad field.");
  m.def("gated_ffn_bytes", &core::gated_ffn_bytes, py::arg("hidden"), py::arg("ffn_hidden"),
        py::arg("dtype_bytes"), "Weight bytes of one gated FFN expert: 3 x hidden x ffn x dtype.");
}

}  // namespace moe_ep::bindings

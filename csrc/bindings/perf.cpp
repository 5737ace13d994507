// Bindings of the cost model (csrc/core/perf.h). ClusterSpec and LinkSpec are shared with the
// placement bindings, so HardwareSpec exposes their fields flat instead of registering the types
// a second time (pybind11 refuses two registrations of one C++ type).
#include <pybind11/stl.h>

#include "bindings/bindings.h"
#include "core/perf.h"

namespace py = pybind11;

namespace moe_ep::bindings {
namespace {

using core::HardwareSpec;

template <typename T>
void flat_field(py::class_<HardwareSpec>& cls, const char* name, T core::ClusterSpec::*field) {
  cls.def_property(
      name, [field](const HardwareSpec& hw) { return hw.cluster.*field; },
      [field](HardwareSpec& hw, T value) { hw.cluster.*field = value; });
}

void link_fields(py::class_<HardwareSpec>& cls, const std::string& prefix,
                 core::LinkSpec core::ClusterSpec::*link) {
  cls.def_property(
      (prefix + "_bandwidth").c_str(),
      [link](const HardwareSpec& hw) { return (hw.cluster.*link).bandwidth_bytes_per_s; },
      [link](HardwareSpec& hw, double value) { (hw.cluster.*link).bandwidth_bytes_per_s = value; });
  cls.def_property(
      (prefix + "_latency").c_str(),
      [link](const HardwareSpec& hw) { return (hw.cluster.*link).latency_s; },
      [link](HardwareSpec& hw, double value) { (hw.cluster.*link).latency_s = value; });
}

}  // namespace

void bind_perf(py::module_& m) {
  using namespace core;
  py::class_<ModelSpec>(m, "ModelSpec")
      .def(py::init<>())
      .def_readwrite("num_layers", &ModelSpec::num_layers)
      .def_readwrite("num_dense_layers", &ModelSpec::num_dense_layers)
      .def_readwrite("hidden", &ModelSpec::hidden)
      .def_readwrite("num_heads", &ModelSpec::num_heads)
      .def_readwrite("head_dim", &ModelSpec::head_dim)
      .def_readwrite("num_kv_heads", &ModelSpec::num_kv_heads)
      .def_readwrite("q_lora_rank", &ModelSpec::q_lora_rank)
      .def_readwrite("kv_lora_rank", &ModelSpec::kv_lora_rank)
      .def_readwrite("rope_head_dim", &ModelSpec::rope_head_dim)
      .def_readwrite("dense_ffn_hidden", &ModelSpec::dense_ffn_hidden)
      .def_readwrite("expert_ffn_hidden", &ModelSpec::expert_ffn_hidden)
      .def_readwrite("num_experts", &ModelSpec::num_experts)
      .def_readwrite("top_k", &ModelSpec::top_k)
      .def_readwrite("num_shared_experts", &ModelSpec::num_shared_experts)
      .def_readwrite("vocab_size", &ModelSpec::vocab_size)
      .def_readwrite("weight_bytes", &ModelSpec::weight_bytes)
      .def_readwrite("activation_bytes", &ModelSpec::activation_bytes);

  py::class_<GpuSpec>(m, "GpuSpec")
      .def(py::init<>())
      .def_readwrite("peak_flops", &GpuSpec::peak_flops)
      .def_readwrite("mfu", &GpuSpec::mfu)
      .def_readwrite("memory_bandwidth", &GpuSpec::memory_bandwidth)
      .def_readwrite("memory_efficiency", &GpuSpec::memory_efficiency);

  py::class_<HardwareSpec> hardware(m, "HardwareSpec");
  hardware.def(py::init<>())
      .def_readwrite("gpu", &HardwareSpec::gpu)
      .def_readwrite("intra_node_efficiency", &HardwareSpec::intra_node_efficiency)
      .def_readwrite("inter_node_efficiency", &HardwareSpec::inter_node_efficiency);
  flat_field(hardware, "num_nodes", &ClusterSpec::num_nodes);
  flat_field(hardware, "gpus_per_node", &ClusterSpec::gpus_per_node);
  flat_field(hardware, "gpu_memory_bytes", &ClusterSpec::gpu_memory_bytes);
  link_fields(hardware, "intra_node", &ClusterSpec::intra_node);
  link_fields(hardware, "inter_node", &ClusterSpec::inter_node);

  py::class_<StrategySpec>(m, "StrategySpec")
      .def(py::init<>())
      .def_readwrite("tp", &StrategySpec::tp)
      .def_readwrite("pp", &StrategySpec::pp)
      .def_readwrite("ep", &StrategySpec::ep)
      .def_readwrite("dp", &StrategySpec::dp)
      .def_readwrite("micro_batches", &StrategySpec::micro_batches)
      .def_readwrite("overlap", &StrategySpec::overlap)
      .def_readwrite("dedup_tokens", &StrategySpec::dedup_tokens)
      .def_readwrite("expert_imbalance", &StrategySpec::expert_imbalance)
      .def_readwrite("link_imbalance", &StrategySpec::link_imbalance)
      .def_readwrite("dispatch_bytes", &StrategySpec::dispatch_bytes)
      .def_readwrite("combine_bytes", &StrategySpec::combine_bytes);

  py::enum_<Phase>(m, "Phase").value("prefill", Phase::kPrefill).value("decode", Phase::kDecode);

  py::class_<WorkloadSpec>(m, "WorkloadSpec")
      .def(py::init<>())
      .def_readwrite("phase", &WorkloadSpec::phase)
      .def_readwrite("batch", &WorkloadSpec::batch)
      .def_readwrite("sequence_length", &WorkloadSpec::sequence_length);

  py::class_<AllToAllCost>(m, "AllToAllCost")
      .def_readonly("intra_node_bytes", &AllToAllCost::intra_node_bytes)
      .def_readonly("inter_node_bytes", &AllToAllCost::inter_node_bytes)
      .def_readonly("time_s", &AllToAllCost::time_s);

  py::class_<Prediction>(m, "Prediction")
      .def_readonly("step_time_s", &Prediction::step_time_s)
      .def_readonly("latency_s", &Prediction::latency_s)
      .def_readonly("tokens_per_s", &Prediction::tokens_per_s)
      .def_readonly("tokens_per_s_per_gpu", &Prediction::tokens_per_s_per_gpu)
      .def_readonly("num_gpus", &Prediction::num_gpus)
      .def_readonly("breakdown", &Prediction::breakdown)
      .def_readonly("bottleneck", &Prediction::bottleneck)
      .def_readonly("intra_node_bytes_per_gpu", &Prediction::intra_node_bytes_per_gpu)
      .def_readonly("inter_node_bytes_per_gpu", &Prediction::inter_node_bytes_per_gpu)
      .def_readonly("busiest_link_bytes", &Prediction::busiest_link_bytes)
      .def_readonly("memory_bytes_per_gpu", &Prediction::memory_bytes_per_gpu)
      .def_readonly("weight_bytes_per_gpu", &Prediction::weight_bytes_per_gpu)
      .def_readonly("kv_cache_bytes_per_gpu", &Prediction::kv_cache_bytes_per_gpu)
      .def_readonly("fits_in_memory", &Prediction::fits_in_memory);

  m.def("perf_predict", &predict, py::arg("model"), py::arg("hardware"), py::arg("strategy"),
        py::arg("workload"), "Predict one deployment's step time, throughput and breakdown");
  m.def("perf_all_to_all_cost", &all_to_all_cost, py::arg("tokens_per_gpu"),
        py::arg("bytes_per_token"), py::arg("num_experts"), py::arg("top_k"), py::arg("ep"),
        py::arg("dedup_tokens"), py::arg("link_imbalance"), py::arg("hardware"),
        "One dispatch-like all-to-all as seen by the busiest GPU");
  m.def("perf_probability_group_hit", &probability_group_hit, py::arg("num_experts"),
        py::arg("group_experts"), py::arg("top_k"));
  m.def("perf_attention_params_per_layer", &attention_params_per_layer, py::arg("model"));
  m.def("perf_kv_cache_bytes_per_token_per_layer", &kv_cache_bytes_per_token_per_layer,
        py::arg("model"));
  m.def("perf_expert_params", &expert_params, py::arg("model"));
}

}  // namespace moe_ep::bindings

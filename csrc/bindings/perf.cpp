// Bindings of the cost model (csrc/core/perf*.h). ClusterSpec and LinkSpec are shared with the
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

void link_bandwidth(py::class_<HardwareSpec>& cls, const char* name,
                    core::LinkSpec core::ClusterSpec::*link) {
  cls.def_property(
      name, [link](const HardwareSpec& hw) { return (hw.cluster.*link).bandwidth_bytes_per_s; },
      [link](HardwareSpec& hw, double value) { (hw.cluster.*link).bandwidth_bytes_per_s = value; });
}

void bind_specs(py::module_& m) {
  using namespace core;
  py::class_<GpuSpec>(m, "GpuSpec")
      .def(py::init<>())
      .def_readwrite("peak_flops", &GpuSpec::peak_flops)
      .def_readwrite("fp8_speedup", &GpuSpec::fp8_speedup)
      .def_readwrite("memory_bandwidth", &GpuSpec::memory_bandwidth)
      .def_readwrite("num_sms", &GpuSpec::num_sms)
      .def_readwrite("gemm_peak_efficiency", &GpuSpec::gemm_peak_efficiency)
      .def_readwrite("gemm_half_rows", &GpuSpec::gemm_half_rows)
      .def_readwrite("gemm_half_depth", &GpuSpec::gemm_half_depth)
      .def_readwrite("memory_efficiency", &GpuSpec::memory_efficiency)
      .def_readwrite("kernel_fixed_s", &GpuSpec::kernel_fixed_s)
      .def_readwrite("attention_compute_efficiency", &GpuSpec::attention_compute_efficiency)
      .def_readwrite("attention_memory_efficiency", &GpuSpec::attention_memory_efficiency);

  py::class_<HardwareSpec> hardware(m, "HardwareSpec");
  hardware.def(py::init<>())
      .def_readwrite("gpu", &HardwareSpec::gpu)
      .def_readwrite("intra_node_efficiency", &HardwareSpec::intra_node_efficiency)
      .def_readwrite("inter_node_efficiency", &HardwareSpec::inter_node_efficiency);
  flat_field(hardware, "num_nodes", &ClusterSpec::num_nodes);
  flat_field(hardware, "gpus_per_node", &ClusterSpec::gpus_per_node);
  flat_field(hardware, "gpu_memory_bytes", &ClusterSpec::gpu_memory_bytes);
  link_bandwidth(hardware, "intra_node_bandwidth", &ClusterSpec::intra_node);
  link_bandwidth(hardware, "inter_node_bandwidth", &ClusterSpec::inter_node);

  py::class_<TransportSpec>(m, "TransportSpec")
      .def(py::init<>())
      .def_readwrite("nvlink_fixed_s", &TransportSpec::nvlink_fixed_s)
      .def_readwrite("network_fixed_s", &TransportSpec::network_fixed_s)
      .def_readwrite("per_peer_s", &TransportSpec::per_peer_s)
      .def_readwrite("sms", &TransportSpec::sms);

  py::class_<RoutingSpec>(m, "RoutingSpec")
      .def(py::init<>())
      .def_readwrite("num_experts", &RoutingSpec::num_experts)
      .def_readwrite("top_k", &RoutingSpec::top_k)
      .def_readwrite("num_groups", &RoutingSpec::num_groups)
      .def_readwrite("topk_groups", &RoutingSpec::topk_groups);

  py::enum_<Dedup>(m, "Dedup")
      .value("expert", Dedup::kExpert)
      .value("rank", Dedup::kRank)
      .value("node", Dedup::kNode);

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
      .def_readwrite("num_expert_groups", &ModelSpec::num_expert_groups)
      .def_readwrite("topk_groups", &ModelSpec::topk_groups)
      .def_readwrite("num_shared_experts", &ModelSpec::num_shared_experts)
      .def_readwrite("vocab_size", &ModelSpec::vocab_size)
      .def_readwrite("weight_bytes", &ModelSpec::weight_bytes)
      .def_readwrite("activation_bytes", &ModelSpec::activation_bytes);

  py::class_<StrategySpec>(m, "StrategySpec")
      .def(py::init<>())
      .def_readwrite("tp", &StrategySpec::tp)
      .def_readwrite("pp", &StrategySpec::pp)
      .def_readwrite("ep", &StrategySpec::ep)
      .def_readwrite("dp", &StrategySpec::dp)
      .def_readwrite("micro_batches", &StrategySpec::micro_batches)
      .def_readwrite("overlap", &StrategySpec::overlap)
      .def_readwrite("dedup", &StrategySpec::dedup)
      .def_readwrite("redundant_experts", &StrategySpec::redundant_experts)
      .def_readwrite("expert_imbalance", &StrategySpec::expert_imbalance)
      .def_readwrite("link_imbalance", &StrategySpec::link_imbalance)
      .def_readwrite("attention_imbalance", &StrategySpec::attention_imbalance)
      .def_readwrite("dispatch_bytes", &StrategySpec::dispatch_bytes)
      .def_readwrite("combine_bytes", &StrategySpec::combine_bytes)
      .def_readwrite("all_to_all", &StrategySpec::all_to_all)
      .def_readwrite("collectives", &StrategySpec::collectives);

  py::enum_<Phase>(m, "Phase").value("prefill", Phase::kPrefill).value("decode", Phase::kDecode);

  py::class_<WorkloadSpec>(m, "WorkloadSpec")
      .def(py::init<>())
      .def_readwrite("phase", &WorkloadSpec::phase)
      .def_readwrite("batch", &WorkloadSpec::batch)
      .def_readwrite("sequence_length", &WorkloadSpec::sequence_length)
      .def_readwrite("draft_tokens", &WorkloadSpec::draft_tokens)
      .def_readwrite("acceptance_rate", &WorkloadSpec::acceptance_rate)
      .def_readwrite("disaggregated", &WorkloadSpec::disaggregated)
      .def("output_tokens_per_step", &WorkloadSpec::output_tokens_per_step);
}

void bind_results(py::module_& m) {
  using namespace core;
  py::class_<KernelCost>(m, "KernelCost")
      .def_readonly("flops", &KernelCost::flops)
      .def_readonly("bytes", &KernelCost::bytes)
      .def_readonly("time_s", &KernelCost::time_s);

  py::class_<AllToAllCost>(m, "AllToAllCost")
      .def_readonly("intra_node_bytes", &AllToAllCost::intra_node_bytes)
      .def_readonly("inter_node_bytes", &AllToAllCost::inter_node_bytes)
      .def_readonly("peers", &AllToAllCost::peers)
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
}

}  // namespace

void bind_perf(py::module_& m) {
  using namespace core;
  bind_specs(m);
  bind_results(m);
  m.def("perf_predict", &predict, py::arg("model"), py::arg("hardware"), py::arg("strategy"),
        py::arg("workload"), "Predict one deployment's step time, throughput and breakdown");
  m.def("perf_gemm_cost", &gemm_cost, py::arg("rows"), py::arg("cols"), py::arg("depth"),
        py::arg("groups"), py::arg("input_bytes"), py::arg("output_bytes"), py::arg("gpu"),
        "One (grouped) GEMM kernel on one GPU");
  m.def("perf_gemm_efficiency", &gemm_efficiency, py::arg("rows"), py::arg("depth"),
        py::arg("gpu"));
  m.def("perf_attention_cost", &attention_cost, py::arg("flops"), py::arg("bytes"), py::arg("gpu"));
  m.def("perf_all_to_all_cost", &all_to_all_cost, py::arg("tokens_per_gpu"),
        py::arg("bytes_per_token"), py::arg("routing"), py::arg("ep"), py::arg("dedup"),
        py::arg("link_imbalance"), py::arg("hardware"), py::arg("transport"),
        "One dispatch-like all-to-all as seen by the busiest GPU");
  m.def("perf_ring_collective_time", &ring_collective_time, py::arg("buffer_bytes"),
        py::arg("ranks"), py::arg("phases"), py::arg("within_node"), py::arg("hardware"),
        py::arg("transport"));
  m.def("perf_overlapped_time", &overlapped_time, py::arg("compute_s"), py::arg("comm_s"),
        py::arg("sm_fraction"));
  m.def("perf_probability_block_hit", &probability_block_hit, py::arg("routing"), py::arg("block"));
  m.def("perf_attention_params_per_layer", &attention_params_per_layer, py::arg("model"));
  m.def("perf_kv_cache_bytes_per_token_per_layer", &kv_cache_bytes_per_token_per_layer,
        py::arg("model"));
  m.def("perf_expert_params", &expert_params, py::arg("model"));
}

}  // namespace moe_ep::bindings

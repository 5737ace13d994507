#include "ops/dispatch_config.h"

#include <mutex>
#include <set>
#include <sstream>
#include <utility>

#include "core/dispatch_layout.h"
#include "ops/checks.h"
#include "ops/host_reads.h"
#include "ops/layout_kernels.h"

namespace moe_ep::ops {
namespace {

constexpr const char* kArgNames[] = {"",
                                     "x",
                                     "topk_ids",
                                     "topk_weights",
                                     "expert_rank",
                                     "expert_local",
                                     "num_local_experts",
                                     "num_chunks",
                                     "capacity",
                                     "w13",
                                     "w2",
                                     "slot_counts",
                                     "dispatch_dtype"};

constexpr const char* kFieldNames[kConfigSize] = {
    "dispatch mode (exact or fixed-capacity)",
    "hidden size (argument 'x')",
    "dtype of argument 'x'",
    "number of expert slots (the expert map, argument 'expert_rank')",
    "number of choices per token (argument 'topk_ids')",
    "argument 'num_local_experts'",
    "argument 'capacity'",
    "argument 'num_chunks'",
    "FP8 dispatch (argument 'dispatch_dtype': 1 is float8_e4m3fn, 0 the dtype of 'x')",
};

std::string rank_source(int64_t peer) { return "rank " + std::to_string(peer) + "'s "; }

// Each rank's record: the fields, then its argument problem bits.
constexpr int64_t kRecordSize = kConfigSize + 1;

at::Tensor record_row(const DispatchConfig& config, const ArgProblem& problem,
                      const c10::Device& device) {
  at::Tensor row = at::empty({kRecordSize}, at::kLong);
  std::copy(config.fields.begin(), config.fields.end(), row.data_ptr<int64_t>());
  row.data_ptr<int64_t>()[kConfigSize] = problem.error_bits();
  return row.to(device);
}

// Raises on every rank alike for the first field where the exchanged records differ.
void check_records_agree(const std::vector<int64_t>& records, int64_t world) {
  for (int field = 0; field < kConfigSize; ++field) {
    for (int64_t peer = 1; peer < world; ++peer) {
      const int64_t a = records[field], b = records[peer * kRecordSize + field];
      TORCH_CHECK(a == b, "moe_ep: dispatch: ranks disagree on the ", kFieldNames[field],
                  ": rank 0 has ", a, ", rank ", peer, " has ", b);
    }
  }
}

}  // namespace

int64_t ArgProblem::error_bits() const {
  return arg == Arg::kNone
             ? 0
             : core::kBadArgument | (static_cast<int64_t>(arg) << core::kBadArgumentShift);
}

void validate_dispatch_args(ArgProblem& problem, const at::Tensor& x, const at::Tensor& topk_ids,
                            const at::Tensor& topk_weights, const at::Tensor& expert_rank,
                            const at::Tensor& expert_local, int64_t num_local_experts,
                            int64_t world) {
  validate(problem, Arg::kX, [&] {
    check_dim(x, 2, "x");
    check_float_dtype(x, "x");
  });
  validate(problem, Arg::kTopkIds, [&] {
    check_dim(topk_ids, 2, "topk_ids");
    check_index_dtype(topk_ids, "topk_ids");
    check_size(topk_ids, 0, x.size(0), "topk_ids");
    check_same_device(topk_ids, x, "topk_ids", "x");
    TORCH_CHECK(topk_ids.size(1) >= 1 && topk_ids.size(1) <= core::kMaxTopK,
                "moe_ep: argument 'topk_ids' must have 1 to ", core::kMaxTopK,
                " choices per token, got ", topk_ids.size(1));
  });
  validate(problem, Arg::kTopkWeights, [&] {
    check_dim(topk_weights, 2, "topk_weights");
    check_float_dtype(topk_weights, "topk_weights");
    TORCH_CHECK(topk_weights.sizes() == topk_ids.sizes(), "moe_ep: argument 'topk_weights' ",
                "must have the shape of 'topk_ids' ", topk_ids.sizes(), ", got ",
                topk_weights.sizes());
    check_same_device(topk_weights, x, "topk_weights", "x");
  });
  validate(problem, Arg::kExpertRank, [&] {
    check_dim(expert_rank, 1, "expert_rank");
    check_dtype(expert_rank, at::kInt, "expert_rank");
    TORCH_CHECK(expert_rank.size(0) >= 1, "moe_ep: argument 'expert_rank' must map at least ",
                "one expert");
    check_same_device(expert_rank, x, "expert_rank", "x");
  });
  validate(problem, Arg::kExpertLocal, [&] {
    check_dim(expert_local, 1, "expert_local");
    check_dtype(expert_local, at::kInt, "expert_local");
    check_size(expert_local, 0, expert_rank.size(0), "expert_local");
    check_same_device(expert_local, x, "expert_local", "x");
  });
  validate(problem, Arg::kNumLocalExperts, [&] {
    TORCH_CHECK(num_local_experts >= 1, "moe_ep: argument 'num_local_experts' must be >= 1, ",
                "got ", num_local_experts);
    // The CUDA layout kernels sort by rank and by local expert.
    TORCH_CHECK(
        !x.is_cuda() || (world <= kMaxCudaSortKeys && num_local_experts <= kMaxCudaSortKeys),
        "moe_ep: a CUDA dispatch supports up to ", kMaxCudaSortKeys, " ranks and ",
        kMaxCudaSortKeys, " local experts, got ", world, " and ", num_local_experts);
  });
}

bool validate_dispatch_dtype(ArgProblem& problem, const at::Tensor& x,
                             std::optional<at::ScalarType> dispatch_dtype) {
  validate(problem, Arg::kDispatchDtype, [&] {
    TORCH_CHECK(!dispatch_dtype || *dispatch_dtype == x.scalar_type() ||
                    *dispatch_dtype == at::kFloat8_e4m3fn,
                "moe_ep: argument 'dispatch_dtype' must be None, the dtype of 'x' (",
                x.scalar_type(), ") or float8_e4m3fn, got ", *dispatch_dtype);
  });
  return dispatch_dtype == at::kFloat8_e4m3fn;
}

int64_t DispatchConfig::hash() const {
  uint64_t h = 1469598103934665603ull;  // FNV-1a over the fields' bytes
  for (const int64_t field : fields) {
    for (int byte = 0; byte < 8; ++byte) {
      h ^= (static_cast<uint64_t>(field) >> (8 * byte)) & 0xff;
      h *= 1099511628211ull;
    }
  }
  return static_cast<int64_t>((h ^ (h >> 31)) & core::kChecksumMask);
}

DispatchConfig dispatch_config(Mode mode, const at::Tensor& x, const at::Tensor& topk_ids,
                               const at::Tensor& expert_rank, int64_t num_local_experts,
                               int64_t capacity, int64_t num_chunks, bool fp8) {
  DispatchConfig c;
  c.fields[kConfigMode] = static_cast<int64_t>(mode);
  c.fields[kConfigHidden] = x.dim() == 2 ? x.size(1) : -1;
  c.fields[kConfigDtype] = static_cast<int64_t>(x.scalar_type());
  c.fields[kConfigSlots] = expert_rank.dim() == 1 ? expert_rank.size(0) : -1;
  c.fields[kConfigTopK] = topk_ids.dim() == 2 ? topk_ids.size(1) : -1;
  c.fields[kConfigLocal] = num_local_experts;
  c.fields[kConfigCapacity] = capacity;
  c.fields[kConfigChunks] = num_chunks;
  c.fields[kConfigFp8] = fp8 ? 1 : 0;
  return c;
}

std::string describe_errors(int64_t errors, int64_t num_experts) {
  std::ostringstream out;
  const char* separator = "";
  auto add = [&](int64_t bit, const std::string& what) {
    if (errors & bit) {
      out << separator << what;
      separator = "; ";
    }
  };
  const int64_t arg = errors >> core::kBadArgumentShift;
  add(core::kBadArgument,
      std::string("a malformed argument '") +
          (arg > 0 && arg < static_cast<int64_t>(std::size(kArgNames)) ? kArgNames[arg] : "?") +
          "'");
  add(core::kBadRank, "argument 'expert_rank' (the expert map) holds a rank outside the group");
  add(core::kBadLocal,
      "argument 'expert_local' (the expert map) holds a local expert id outside [0, "
      "num_local_experts)");
  add(core::kIdOutOfRange,
      "argument 'topk_ids' holds an expert id outside " +
          (num_experts > 0 ? "[0, " + std::to_string(num_experts) + ")" : "the expert map"));
  add(core::kTooManyChoices,
      "argument 'topk_ids' gives a token more choices on one rank than 'num_local_experts' "
      "allows");
  return out.str();
}

void raise_for_errors(int64_t errors, int64_t peer, const Group& group, int64_t num_experts,
                      const ArgProblem& mine) {
  if (errors == 0) return;
  if (peer == group->getRank() && mine) TORCH_CHECK(false, mine.message);
  TORCH_CHECK(false, "moe_ep: dispatch: ", rank_source(peer),
              "arguments are wrong: ", describe_errors(errors, num_experts),
              peer == group->getRank() ? "" : " (every rank of the group raises this error)");
}

[[noreturn]] void raise_config_mismatch(const Group& group, const DispatchConfig& mine) {
  const at::Tensor row = record_row(mine, {}, collective_device(group, c10::Device(at::kCPU)));
  check_records_agree(
      read_to_host(exchange_with_all("dispatch: the configuration records", group, row)),
      group->getSize());
  TORCH_CHECK(false, "moe_ep: dispatch: ranks disagree on the dispatch configuration");
}

void agree_once(const Group& group, std::string_view group_name, const DispatchConfig& config,
                const ArgProblem& problem) {
  static std::mutex mutex;
  static std::set<std::pair<std::string, std::array<int64_t, kConfigSize>>> agreed;
  const auto key = std::make_pair(std::string(group_name), config.fields);
  {
    std::lock_guard<std::mutex> lock(mutex);
    if (!problem && agreed.count(key)) return;
  }
  const at::Tensor row =
      record_row(config, problem, collective_device(group, c10::Device(at::kCPU)));
  const std::vector<int64_t> records = read_to_host(
      exchange_with_all("dispatch (fixed capacity): the configuration handshake", group, row));
  for (int64_t peer = 0; peer < group->getSize(); ++peer) {
    raise_for_errors(records[peer * kRecordSize + kConfigSize], peer, group,
                     config.fields[kConfigSlots], problem);
  }
  check_records_agree(records, group->getSize());
  std::lock_guard<std::mutex> lock(mutex);
  agreed.insert(key);
}

}  // namespace moe_ep::ops

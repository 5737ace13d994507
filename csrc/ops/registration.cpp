// All schemas of torch.ops.moe_ep, in one place. Implementations are registered per
// dispatch key next to each kernel (CPU: csrc/ops/<op>.cpp, CUDA: csrc/ops/cuda/<op>.cpp);
// fake kernels for torch.compile live in moe_ep/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(moe_ep, m) {
  // Top-k gating. Returns (topk_ids int32 [T, k], topk_weights float32 [T, k]).
  m.def(
      "route(Tensor logits, int top_k, str score_func=\"softmax\", Tensor? bias=None, "
      "int n_group=1, int topk_group=1, bool renormalize=True, float scaling=1.0, "
      "str group_score=\"max\") -> (Tensor, Tensor)");
  // Groups the (token, choice) pairs by expert (stable counting sort). Returns
  // (permuted [T*k, H], expert_offsets int64 [E+1], row_of int32 [T, k]). check_ids=False
  // skips the range check of topk_ids (a device-to-host read on CUDA) for ids produced by
  // route: an id outside [0, num_experts) is then left out (row_of -1).
  m.def(
      "permute(Tensor hidden, Tensor topk_ids, int num_experts, bool check_ids=True) "
      "-> (Tensor, Tensor, Tensor)");
  // Gated expert FFN over rows grouped by expert: y = (act(x W1^T) * (x W3^T)) W2^T, for the
  // rows below expert_offsets[E] only (the rest of y is unspecified). The offsets may be on the
  // CPU or x's device; check_offsets=False trusts device offsets instead of validating them (a
  // device-to-host read) for offsets produced by moe_ep itself.
  m.def(
      "expert_ffn(Tensor x, Tensor expert_offsets, Tensor w13, Tensor w2, "
      "str activation=\"silu\", bool check_offsets=True) -> Tensor");
  // Local combine: out[t] = sum_j topk_weights[t, j] * expert_out[row_of[t, j]].
  // check_rows=False skips the range check of row_of (a device-to-host read on CUDA) for
  // indices produced by moe_ep itself.
  m.def(
      "unpermute(Tensor expert_out, Tensor row_of, Tensor topk_weights, bool check_rows=True) "
      "-> Tensor");

  // Expert parallelism (csrc/ops/dispatch.cpp, dispatch_capacity.cpp, combine.cpp; the
  // protocol is drawn in docs/dispatch.md). The expert map gives, for each expert (slot) id that
  // topk_ids may hold, its rank (expert_rank) and its index among that rank's experts
  // (expert_local). A token goes once to each rank that hosts one of its choices, with
  // W = min(k, num_local_experts) metadata slots. Misuse on one rank (a malformed argument, an
  // id outside the map, ranks that disagree on the configuration or the map) raises on every
  // rank of the group.
  // dispatch_layout: what dispatch would send, without communicating (one host read). Returns
  // (send_counts int64 [world], entry_counts int64 [world], send_token int64 [S],
  //  send_local_ids int32 [S, W], send_choice int64 [S, W], token_slot int32 [T, k]).
  m.def(
      "dispatch_layout(Tensor topk_ids, Tensor expert_rank, Tensor expert_local, int world_size, "
      "int num_local_experts) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Exact-size dispatch over the process group named group_name, one header exchange and one
  // host read. Returns the received rows grouped by local expert (x_sorted [V, H],
  // expert_offsets int64 [L+1] on x's device), what combine needs (recv_row_of int32 [R, W],
  // recv_weights float32 [R, W], recv_counts and send_counts int64 [world] on the CPU,
  // token_slot int32 [T, k]).
  m.def(
      "dispatch(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor expert_rank, "
      "Tensor expert_local, int num_local_experts, str group_name) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Fixed-capacity dispatch (decode, CUDA graphs): capacity rows to every rank, nothing read on
  // the host (the configuration is agreed once per group and configuration, before the first
  // transfer). Returns (x_sorted [world*capacity*W, H]: the received entries grouped by local
  // expert, valid up to expert_offsets[L]; expert_offsets int64 [L+1] on x's device;
  // recv_row_of int32 [world*capacity, W]; recv_weights float32 [world*capacity, W];
  // token_slot int32 [T, k]; status int32 [world, 4]: per source rank its overflow (pairs not
  // sent), configuration hash, misuse bits and expert-map checksum, the same on every rank).
  // Combine it with recv_counts = send_counts = [capacity] * world.
  m.def(
      "dispatch_capacity(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor expert_rank, "
      "Tensor expert_local, int num_local_experts, int capacity, str group_name) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Each of dispatch, dispatch_capacity and combine is also split in two for overlap: *_start
  // computes the layout and starts the transfers (their results are registered with c10d, as
  // functional collectives do), *_finish waits for them and completes the op. The caller
  // computes in between; every rank must issue the same sequence of starts. dispatch_start
  // splits x into num_chunks chunks with one header for all: 6 tensors per chunk (x_recv,
  // meta_recv, recv_counts, send_counts, token_slot, recv_entries).
  m.def(
      "dispatch_start(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor expert_rank, "
      "Tensor expert_local, int num_local_experts, int num_chunks, str group_name) -> Tensor[]");
  m.def(
      "dispatch_finish(Tensor x_recv, Tensor meta_recv, Tensor recv_entries, "
      "int num_local_experts) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "dispatch_capacity_start(Tensor x, Tensor topk_ids, Tensor topk_weights, "
      "Tensor expert_rank, Tensor expert_local, int num_local_experts, int capacity, "
      "str group_name) -> (Tensor, Tensor, Tensor)");
  m.def(
      "dispatch_capacity_finish(Tensor x_recv, Tensor meta_recv, int num_local_experts, "
      "int capacity) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "combine_start(Tensor y, Tensor recv_row_of, Tensor recv_weights, Tensor recv_counts, "
      "Tensor send_counts, str group_name) -> Tensor");
  m.def("combine_finish(Tensor returned, Tensor token_slot) -> Tensor");

  // One expert-parallel layer after routing (exact-size dispatch), in num_chunks chunks whose
  // communication overlaps the experts of other chunks (csrc/ops/moe_forward.cpp): [T, H].
  // slot_counts (int64 [w13 rows], on x's device), when given, accumulates the (token, choice)
  // entries each local slot received: the load balancer's counts, read from the offsets the
  // dispatch computes anyway (no collective, no host read).
  m.def(
      "moe_forward(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor expert_rank, "
      "Tensor expert_local, int num_local_experts, Tensor w13, Tensor w2, str activation, "
      "int num_chunks, str group_name, Tensor(a!)? slot_counts=None) -> Tensor");
  m.def(
      "combine(Tensor y_sorted, Tensor recv_row_of, Tensor recv_weights, Tensor recv_counts, "
      "Tensor send_counts, Tensor token_slot, str group_name) -> Tensor");
}

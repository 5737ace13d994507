// All schemas of torch.ops.moe_ep, in one place. Implementations are registered per
// dispatch key next to each kernel (CPU: csrc/ops/<op>.cpp, CUDA: csrc/ops/cuda/<op>.cpp);
// fake kernels for torch.compile live in moe_ep/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(moe_ep, m) {
  // Top-k gating. Returns (topk_ids int32 [T, k], topk_weights float32 [T, k]).
  m.def(
      "route(Tensor logits, int top_k, str score_func=\"softmax\", Tensor? bias=None, "
      "int n_group=1, int topk_group=1, bool renormalize=True, float scaling=1.0) "
      "-> (Tensor, Tensor)");
  // Groups the (token, choice) pairs by expert (stable counting sort). Returns
  // (permuted [T*k, H], expert_offsets int64 [E+1], row_of int32 [T, k]).
  m.def("permute(Tensor hidden, Tensor topk_ids, int num_experts) -> (Tensor, Tensor, Tensor)");
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

  // Expert parallelism (csrc/ops/dispatch.cpp). The expert map gives, for each expert id that
  // topk_ids may hold, its rank (expert_rank) and its index among that rank's experts
  // (expert_local). A token goes once to each rank that hosts one of its choices.
  // dispatch_layout: what dispatch would send, without communicating. Returns
  // (send_counts int64 [world], entry_counts int64 [world], send_token int64 [S],
  //  send_local_ids int32 [S, W], send_choice int64 [S, W], token_slot int32 [T, k]),
  // W = min(k, num_local_experts).
  m.def(
      "dispatch_layout(Tensor topk_ids, Tensor expert_rank, Tensor expert_local, int world_size, "
      "int num_local_experts) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Exact-size dispatch over the process group named group_name. Returns the received rows
  // grouped by local expert (x_sorted [V, H], expert_offsets int64 [L+1]), what combine needs
  // (recv_row_of int32 [R, W], recv_weights float32 [R, W], recv_counts and send_counts int64
  // [world] on the CPU, token_slot int32 [T, k]).
  m.def(
      "dispatch(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor expert_rank, "
      "Tensor expert_local, int num_local_experts, str group_name) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Fixed-capacity dispatch (decode, CUDA-graph friendly): capacity rows to every rank, no
  // count on the host. Returns (x_by_expert [L*M, H] with M = world*capacity rows per local
  // expert, zero-padded; expert_counts int64 [L]; recv_row_of int32 [M, W]; recv_weights
  // float32 [M, W]; token_slot int32 [T, k]; status int32 [world, 4]: per source rank its
  // overflow (pairs not sent), hidden size, expert count, misuse bits: 1 id out of range, 2 more
  // choices on one rank than num_local_experts, 4 / 8 expert_rank / expert_local out of range).
  // Combine it with recv_counts = send_counts = [capacity] * world.
  m.def(
      "dispatch_capacity(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor expert_rank, "
      "Tensor expert_local, int num_local_experts, int capacity, str group_name) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Weighted reduction of the expert outputs on the receiving rank, the reverse all-to-all,
  // and the sum of each token's partial rows in its original order: [T, H].
  // Each of dispatch, dispatch_capacity and combine is also split in two for overlap: *_start
  // computes the layout and starts the transfers (their results are registered with c10d, as
  // functional collectives do), *_finish waits for them and completes the op. The caller
  // computes in between; every rank must issue the same sequence of starts.
  m.def(
      "dispatch_start(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor expert_rank, "
      "Tensor expert_local, int num_local_experts, str group_name) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "dispatch_finish(Tensor x_recv, Tensor meta_recv, Tensor recv_entries, "
      "int num_local_experts) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "dispatch_capacity_start(Tensor x, Tensor topk_ids, Tensor topk_weights, "
      "Tensor expert_rank, Tensor expert_local, int num_local_experts, int capacity, "
      "str group_name) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "dispatch_capacity_finish(Tensor x_recv, Tensor meta_recv, int num_local_experts) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "combine_start(Tensor y, Tensor recv_row_of, Tensor recv_weights, Tensor recv_counts, "
      "Tensor send_counts, str group_name) -> Tensor");
  m.def("combine_finish(Tensor returned, Tensor token_slot) -> Tensor");

  // One expert-parallel layer after routing (exact-size dispatch), in num_chunks chunks whose
  // communication overlaps the experts of other chunks (csrc/ops/moe_forward.cpp): [T, H].
  m.def(
      "moe_forward(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor expert_rank, "
      "Tensor expert_local, int num_local_experts, Tensor w13, Tensor w2, str activation, "
      "int num_chunks, str group_name) -> Tensor");
  m.def(
      "combine(Tensor y_sorted, Tensor recv_row_of, Tensor recv_weights, Tensor recv_counts, "
      "Tensor send_counts, Tensor token_slot, str group_name) -> Tensor");
}

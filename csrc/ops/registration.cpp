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
  // Gated expert FFN over rows grouped by expert: y = (act(x W1^T) * (x W3^T)) W2^T.
  m.def(
      "expert_ffn(Tensor x, Tensor expert_offsets, Tensor w13, Tensor w2, "
      "str activation=\"silu\") -> Tensor");
  // Local combine: out[t] = sum_j topk_weights[t, j] * expert_out[row_of[t, j]].
  m.def("unpermute(Tensor expert_out, Tensor row_of, Tensor topk_weights) -> Tensor");
}

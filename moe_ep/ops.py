"""Typed wrappers over torch.ops.moe_ep, and their fake kernels for torch.compile.

Shapes use T tokens, H hidden, F expert FFN hidden, E experts (local experts for
expert_ffn), k choices per token. Every op accepts float32, float16 and bfloat16 hidden
states, any T including 0, and non-contiguous inputs; bad arguments raise a RuntimeError
that names the argument.
"""

from __future__ import annotations

import torch

import moe_ep._C  # noqa: F401  (registers torch.ops.moe_ep)

__all__ = ["route", "permute", "expert_ffn", "unpermute"]


def route(
    logits: torch.Tensor,
    top_k: int,
    *,
    score_func: str = "softmax",
    bias: torch.Tensor | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    renormalize: bool = True,
    scaling: float = 1.0,
    group_score: str = "max",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k gating.

    Args:
        logits: [T, E] router logits (any float dtype; scores are computed in float32).
        top_k: experts per token, 1..16 and <= E.
        score_func: "softmax" over the E logits, or "sigmoid" per logit.
        bias: optional float32 [E] added to the scores for the choice only (DeepSeek-V3's
            load-balancing correction); the returned weights never include it.
        n_group, topk_group: group-limited choice: the E experts form n_group equal groups,
            only experts in the topk_group best groups can be chosen.
        group_score: how a group scores, from its experts' selection scores (bias included
            when given): "max", its best (DeepSeek-V2), or "top2_sum", the sum of its two best
            (DeepSeek-V3; the best alone for one-expert groups). The rule never depends on
            whether a bias is given.
        renormalize: divide the k weights by their sum.
        scaling: multiply the weights by this factor (after renormalisation).

    Returns:
        topk_ids: int32 [T, k], best first, ties to the lower expert id.
        topk_weights: float32 [T, k].
    """
    return torch.ops.moe_ep.route(
        logits, top_k, score_func, bias, n_group, topk_group, renormalize, scaling, group_score
    )


def permute(
    hidden: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, check_ids: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Groups each token's k copies by expert (stable: token order within an expert).

    Args:
        hidden: [T, H] hidden states.
        topk_ids: int32 or int64 [T, k], each in [0, num_experts).
        num_experts: E.
        check_ids: raise for ids outside [0, E) (one device-to-host read on CUDA); False
            for ids from route, which are in range (an id outside is then left out: its
            row_of is -1 and the rows of permuted are fewer than T*k).

    Returns:
        permuted: [T*k, H], rows of expert e at expert_offsets[e]:expert_offsets[e+1].
        expert_offsets: int64 [E+1], starting at 0 and ending at T*k.
        row_of: int32 [T, k], the row of permuted that holds copy (t, j): the index that
            unpermute needs to undo the permutation.
    """
    return torch.ops.moe_ep.permute(hidden, topk_ids, num_experts, check_ids)


def expert_ffn(
    x: torch.Tensor,
    expert_offsets: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    activation: str = "silu",
    check_offsets: bool = True,
) -> torch.Tensor:
    """Gated expert FFN over rows grouped by expert (a grouped GEMM, fp32 accumulation).

    For the rows r of expert e: y[r] = (act(x[r] @ w1[e].T) * (x[r] @ w3[e].T)) @ w2[e].T,
    where w13[e] = cat(w1[e], w3[e]); the gate/up product is rounded to x's dtype before
    the activation, as on the GPU. Only the rows below expert_offsets[E] are computed: a
    fixed-size buffer may carry unused trailing rows, and y's rows there are unspecified
    (not zero-filled).

    On CUDA the offsets may stay on the device: with MOE_EP_EXPERT_GEMM=grouped_mm (or the
    default, auto, where torch's grouped GEMM has its fast path: bf16 on compute capability
    9.x/10.x) nothing is read on the host and the call captures in a CUDA graph. See
    docs/expert_ffn.md for the variants and their host reads.

    Args:
        x: [N, H] rows grouped by expert.
        expert_offsets: int64 [E+1] on the CPU or x's device: 0 first, non-decreasing,
            at most N last.
        w13: [E, 2F, H] gate and up projections, x's dtype.
        w2: [E, H, F] down projections, x's dtype.
        activation: "silu" (SwiGLU) or "gelu" (GeGLU, exact erf GELU).
        check_offsets: validate offsets that live on a GPU (one device-to-host read); pass
            False only for offsets moe_ep produced itself. CPU offsets are always validated
            (free).

    Returns:
        [N, H] in x's dtype; rows from expert_offsets[E] on are unspecified.
    """
    return torch.ops.moe_ep.expert_ffn(x, expert_offsets, w13, w2, activation, check_offsets)


def unpermute(
    expert_out: torch.Tensor,
    row_of: torch.Tensor,
    topk_weights: torch.Tensor,
    check_rows: bool = True,
) -> torch.Tensor:
    """Local combine: out[t] = sum_j topk_weights[t, j] * expert_out[row_of[t, j]].

    Accumulates in float32 in one pass. A row of -1 contributes nothing.

    Args:
        expert_out: [N, H].
        row_of: int32 [T, k] rows of expert_out (from permute), or -1.
        topk_weights: [T, k] float weights.
        check_rows: verify that row_of lies in [-1, N) (on CUDA a device-to-host read);
            pass False only for indices moe_ep produced itself.

    Returns:
        [T, H] in expert_out's dtype.
    """
    return torch.ops.moe_ep.unpermute(expert_out, row_of, topk_weights, check_rows)


@torch.library.register_fake("moe_ep::route")
def _route_fake(
    logits,
    top_k,
    score_func="softmax",
    bias=None,
    n_group=1,
    topk_group=1,
    renormalize=True,
    scaling=1.0,
    group_score="max",
):
    shape = (logits.shape[0], top_k)
    return logits.new_empty(shape, dtype=torch.int32), logits.new_empty(shape, dtype=torch.float32)


@torch.library.register_fake("moe_ep::permute")
def _permute_fake(hidden, topk_ids, num_experts, check_ids=True):
    rows = topk_ids.shape[0] * topk_ids.shape[1]
    return (
        hidden.new_empty((rows, hidden.shape[1])),
        hidden.new_empty((num_experts + 1,), dtype=torch.int64),
        hidden.new_empty(tuple(topk_ids.shape), dtype=torch.int32),
    )


@torch.library.register_fake("moe_ep::expert_ffn")
def _expert_ffn_fake(x, expert_offsets, w13, w2, activation="silu", check_offsets=True):
    return x.new_empty(x.shape)


@torch.library.register_fake("moe_ep::unpermute")
def _unpermute_fake(expert_out, row_of, topk_weights, check_rows=True):
    return expert_out.new_empty((row_of.shape[0], expert_out.shape[1]))

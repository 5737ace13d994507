"""Plain PyTorch references for the moe_ep ops: float64 math, no moe_ep op involved.

Tests compare the ops against these; benchmarks and the demo time them side by side.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def route_select_scores(
    logits: torch.Tensor, score_func: str, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, selection scores) in float64: the weights come from the first, the choice
    from the second (scores plus the optional load-balancing bias)."""
    logits = logits.double()
    scores = logits.softmax(dim=-1) if score_func == "softmax" else logits.sigmoid()
    select = scores if bias is None else scores + bias.double()
    return scores, select


def route(
    logits: torch.Tensor,
    top_k: int,
    score_func: str = "softmax",
    bias: torch.Tensor | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    renormalize: bool = True,
    scaling: float = 1.0,
    group_score: str = "max",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k gating: int64 ids [T, k] (best first, ties to the lower id), float64 weights."""
    scores, select = route_select_scores(logits, score_func, bias)
    num_tokens, num_experts = select.shape
    if n_group > 1:
        grouped = select.view(num_tokens, n_group, num_experts // n_group)
        if group_score == "top2_sum" and grouped.shape[-1] > 1:
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        else:
            group_scores = grouped.max(dim=-1).values
        chosen = group_scores.sort(dim=-1, descending=True, stable=True).indices[:, :topk_group]
        allowed = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, chosen, True)
        allowed = allowed.repeat_interleave(num_experts // n_group, dim=1)
        select = select.masked_fill(~allowed, float("-inf"))
    ids = select.sort(dim=-1, descending=True, stable=True).indices[:, :top_k]
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-300)
    return ids, weights * scaling


def gated_ffn(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, activation: str
) -> torch.Tensor:
    """One expert in float64: (act(x w1^T) * (x w3^T)) w2^T with w13 = cat(w1, w3)."""
    gate, up = (x.double() @ w13.double().T).chunk(2, dim=-1)
    act = F.silu(gate) if activation == "silu" else F.gelu(gate)
    return (act * up) @ w2.double().T


def expert_ffn(
    x: torch.Tensor,
    expert_offsets: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    activation: str = "silu",
) -> torch.Tensor:
    """Rows grouped by expert, float64 result."""
    out = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    bounds = expert_offsets.tolist()
    for e in range(w13.shape[0]):
        rows = slice(bounds[e], bounds[e + 1])
        if bounds[e + 1] > bounds[e]:
            out[rows] = gated_ffn(x[rows], w13[e], w2[e], activation)
    return out


def moe(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    activation: str = "silu",
) -> torch.Tensor:
    """The whole routed MoE in float64: each token's weighted sum of its k experts."""
    out = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    ids = topk_ids.long()
    for e in ids.unique().tolist():
        token, choice = (ids == e).nonzero(as_tuple=True)
        y = gated_ffn(x[token], w13[e], w2[e], activation)
        out.index_add_(0, token, y * topk_weights[token, choice].double().unsqueeze(-1))
    return out


def moe_layer_torch(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    top_k: int,
    activation: str = "silu",
) -> torch.Tensor:
    """The baseline a user writes without moe_ep, in x's dtype: softmax top-k, renormalised,
    then a loop over experts with torch indexing. Used by the benchmarks as the reference
    to beat, not as a test oracle."""
    logits = F.linear(x.float(), gate_weight)
    weights, ids = logits.softmax(dim=-1).topk(top_k, dim=-1)
    weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
    out = torch.zeros_like(x)
    for e in ids.unique().tolist():
        token, choice = (ids == e).nonzero(as_tuple=True)
        gate, up = (x[token] @ w13[e].T).chunk(2, dim=-1)
        act = F.silu(gate) if activation == "silu" else F.gelu(gate)
        out.index_add_(0, token, ((act * up) @ w2[e].T) * weights[token, choice].unsqueeze(-1))
    return out

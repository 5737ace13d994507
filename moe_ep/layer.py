"""MoELayer: route -> permute -> grouped expert FFN -> unpermute, over torch.ops.moe_ep."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moe_ep import ops


class MoELayer(nn.Module):
    """A routed Mixture-of-Experts FFN (single rank: all experts local).

    Args:
        hidden: H, the token dimension.
        ffn_hidden: F, each expert's FFN hidden size (the gated FFN has 3 matrices).
        num_experts: E routed experts.
        top_k: experts per token.
        score_func, n_group, topk_group, renormalize, scaling: see moe_ep.ops.route.
        expert_bias: keep a float32 [E] selection bias buffer (DeepSeek-V3's
            e_score_correction_bias); it changes which experts are chosen, not the weights.
        activation: "silu" or "gelu" (gated).
        dtype, device: of the expert weights; the router weight is float32.

    Input [..., H] in the experts' dtype; output of the same shape and dtype.
    """

    def __init__(
        self,
        hidden: int,
        ffn_hidden: int,
        num_experts: int,
        top_k: int,
        *,
        score_func: str = "softmax",
        n_group: int = 1,
        topk_group: int = 1,
        renormalize: bool = True,
        scaling: float = 1.0,
        expert_bias: bool = False,
        activation: str = "silu",
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.hidden, self.ffn_hidden = hidden, ffn_hidden
        self.num_experts, self.top_k = num_experts, top_k
        self.score_func, self.n_group, self.topk_group = score_func, n_group, topk_group
        self.renormalize, self.scaling, self.activation = renormalize, scaling, activation
        # Inference weights: the ops have no backward.
        self.gate_weight = nn.Parameter(
            torch.empty(num_experts, hidden, dtype=torch.float32, device=device),
            requires_grad=False,
        )
        self.w13 = nn.Parameter(
            torch.empty(num_experts, 2 * ffn_hidden, hidden, dtype=dtype, device=device),
            requires_grad=False,
        )
        self.w2 = nn.Parameter(
            torch.empty(num_experts, hidden, ffn_hidden, dtype=dtype, device=device),
            requires_grad=False,
        )
        if expert_bias:
            self.register_buffer(
                "expert_bias", torch.zeros(num_experts, dtype=torch.float32, device=device)
            )
        else:
            self.expert_bias = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # Unit-variance activations through each matrix keep bf16 outputs well scaled.
        nn.init.normal_(self.gate_weight, std=1.0 / math.sqrt(self.hidden))
        nn.init.normal_(self.w13, std=1.0 / math.sqrt(self.hidden))
        nn.init.normal_(self.w2, std=1.0 / math.sqrt(self.ffn_hidden))

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """float32 [T, E] logits of the flattened tokens."""
        return F.linear(x.float(), self.gate_weight)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.route(
            self.router_logits(x),
            self.top_k,
            score_func=self.score_func,
            bias=self.expert_bias,
            n_group=self.n_group,
            topk_group=self.topk_group,
            renormalize=self.renormalize,
            scaling=self.scaling,
        )

    def experts(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        """The routed experts for given routing: permute, grouped FFN, weighted combine."""
        permuted, offsets, row_of = ops.permute(x, topk_ids, self.num_experts)
        y = ops.expert_ffn(permuted, offsets, self.w13, self.w2, self.activation)
        return ops.unpermute(y, row_of, topk_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, self.hidden)
        topk_ids, topk_weights = self.route(tokens)
        return self.experts(tokens, topk_ids, topk_weights).view(x.shape)

    def extra_repr(self) -> str:
        return (
            f"hidden={self.hidden}, ffn_hidden={self.ffn_hidden}, num_experts={self.num_experts}, "
            f"top_k={self.top_k}, score_func={self.score_func}, activation={self.activation}"
        )

"""What each supported transformers MoE family computes in its MoE block, as MoELayer
arguments: the router's rule (read from the model's config and the block's own modules) and
the shared expert that runs beside the routed ones.

* Mixtral: softmax, top-k weights always renormalised, logits in the router weight's dtype
  (the model's), no shared expert.
* Qwen2-MoE: softmax, renormalised if config.norm_topk_prob, logits in the model's dtype;
  shared expert sigmoid(shared_expert_gate(x)) * shared_expert(x).
* Qwen3-MoE: as Qwen2-MoE without a shared expert.
* DeepSeek-V3: sigmoid scores plus e_score_correction_bias for the choice only; groups
  (config.n_group, topk_group chosen) scored by the sum of their two best experts
  ("top2_sum"); renormalised if norm_topk_prob, times routed_scaling_factor; logits in
  float32; shared expert shared_experts(x).

Where a family casts its weights to the model's dtype before the experts (Qwen), moe_ep keeps
them in float32: the same in a float32 model, within the dtype's rounding in bfloat16.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

__all__ = ["FAMILIES", "Family", "family_of", "layer_arguments", "expert_activation"]


@dataclass(frozen=True)
class Family:
    """A MoE block class and the router rule its code implements (what the config cannot
    say: the config only sets the rule's numbers)."""

    name: str
    score_func: str
    group_score: str
    float32_logits: bool  # False: the logits are computed in the router weight's dtype
    always_renormalize: bool  # True: renormalised whatever the config says (Mixtral)
    # The shared expert as a function of the tokens [T, H] (None: none), from a module that
    # holds the block's shared children under their names.
    shared: Callable[[nn.Module], Callable[[torch.Tensor], torch.Tensor] | None]


def _no_shared(block: nn.Module) -> None:
    return None


def _qwen2_shared(block: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def shared(x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)

    return shared


def _deepseek_shared(block: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return block.shared_experts


FAMILIES: dict[type[nn.Module], Family] = {
    MixtralSparseMoeBlock: Family("Mixtral", "softmax", "max", False, True, _no_shared),
    Qwen2MoeSparseMoeBlock: Family("Qwen2-MoE", "softmax", "max", False, False, _qwen2_shared),
    Qwen3MoeSparseMoeBlock: Family("Qwen3-MoE", "softmax", "max", False, False, _no_shared),
    DeepseekV3MoE: Family("DeepSeek-V3", "sigmoid", "top2_sum", True, False, _deepseek_shared),
}


def family_of(block: nn.Module) -> Family | None:
    """The family of a MoE block, or None for any other module (exact class: a subclass may
    route differently)."""
    return FAMILIES.get(type(block))


def expert_activation(config) -> str:
    """moe_ep's gated activation for the config's hidden_act."""
    act = config.hidden_act
    if act not in ("silu", "gelu"):
        raise ValueError(
            f"config.hidden_act: moe_ep's experts run gated silu or gelu, the model uses {act!r}"
        )
    return act


def layer_arguments(block: nn.Module, config) -> dict:
    """MoELayer's constructor arguments (all but placement, group and device) that make it
    choose the same experts with the same weights as `block`, from the model's config and the
    block's router and experts."""
    family = FAMILIES[type(block)]
    router, experts = block.gate, block.experts
    if experts.is_transposed or not experts.is_concatenated or not experts.has_gate:
        raise ValueError(
            f"{family.name} experts: moe_ep takes fused [E, 2F, H] gate-then-up weights "
            f"(is_transposed={experts.is_transposed}, is_concatenated={experts.is_concatenated}, "
            f"has_gate={experts.has_gate})"
        )
    if getattr(experts, "has_bias", False):
        raise ValueError(f"{family.name} experts: moe_ep's experts have no bias terms")
    num_experts, two_ffn, hidden = experts.gate_up_proj.shape
    n_group = getattr(config, "n_group", None) or 1
    return dict(
        hidden=hidden,
        ffn_hidden=two_ffn // 2,
        num_experts=num_experts,
        top_k=config.num_experts_per_tok,
        score_func=family.score_func,
        n_group=n_group,
        topk_group=(getattr(config, "topk_group", None) or 1) if n_group > 1 else 1,
        group_score=family.group_score,
        renormalize=family.always_renormalize or bool(config.norm_topk_prob),
        scaling=float(getattr(config, "routed_scaling_factor", None) or 1.0),
        expert_bias=hasattr(router, "e_score_correction_bias"),
        router_dtype=torch.float32 if family.float32_logits else router.weight.dtype,
        activation=expert_activation(config),
        dtype=experts.gate_up_proj.dtype,
    )

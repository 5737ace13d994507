"""convert(): a transformers model's MoE blocks replaced by moe_ep MoELayers, for stacks that
do their own parallelism (data-parallel attention, each rank serving its own requests, and
expert-parallel MoE over a process group).

    model = convert(model, group=dist.group.WORLD, dispatch_mode="exact")

Each Mixtral, Qwen2-MoE, Qwen3-MoE or DeepSeek-V3 MoE block becomes a MoEBlock: a MoELayer
that routes as the family does (moe_ep.integrations.transformers.families) and holds this
rank's experts only, with the block's shared expert (if any) run through overlap_fn, in the
gaps of the expert-parallel step. Every rank of the group must run the model's forward the
same number of times (generate(..., synced_gpus=True) keeps finished ranks stepping).
Inference only: a block whose input requires gradients raises.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from moe_ep.integrations.transformers import families
from moe_ep.layer import MoELayer
from moe_ep.placement import ExpertPlacement

__all__ = ["MoEBlock", "convert", "moe_blocks"]


class MoEBlock(nn.Module):
    """A family's MoE block served by a MoELayer (`moe`); the block's other children (its
    shared expert) keep their names, so their checkpoint keys stay the same.

    `source_names` maps the original block's parameter names (relative to the block) to the
    MoELayer's: what a checkpoint loader needs to find the router and the experts.
    """

    def __init__(self, block: nn.Module, moe: MoELayer, source_names: dict[str, str]) -> None:
        super().__init__()
        family = families.family_of(block)
        self.family = family.name
        for name, child in block.named_children():
            if name not in ("gate", "experts"):
                self.add_module(name, child)
        self.moe = moe
        self.source_names = source_names
        shared = family.shared(self)  # on this block, which holds the same shared children
        self._overlap = None if shared is None else (lambda chunk, x: shared(x))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and hidden_states.requires_grad:
            raise RuntimeError(
                f"{self.family} MoE block served by moe_ep: inference only (its ops have no "
                "backward); call the model under torch.no_grad() or torch.inference_mode()"
            )
        return self.moe(hidden_states, self._overlap)


def moe_blocks(model: nn.Module) -> list[MoEBlock]:
    """The MoEBlocks of a converted model, in module order."""
    return [m for m in model.modules() if isinstance(m, MoEBlock)]


@torch.no_grad()
def convert(
    model: nn.Module,
    *,
    group: dist.ProcessGroup | None = None,
    placement: ExpertPlacement | Sequence[ExpertPlacement] | None = None,
    dispatch_mode: str = "exact",
    capacity: int | None = None,
    num_chunks: int | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Replaces, in place, every MoE block of a supported family with a MoEBlock and returns
    the model.

    Args:
        model: a transformers model (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3); its
            config sets the routing (top-k, groups, renormalisation, scaling).
        group: the expert-parallel process group (None: every expert on this rank).
        placement: one ExpertPlacement for every MoE layer, or one per MoE layer in module
            order (the planner's, say); default contiguous blocks.
        dispatch_mode, capacity, num_chunks: MoELayer's.
        device: of the MoELayers (default: the device of the block's router weight, or the
            CPU when the model was built on the meta device).

    The MoELayers copy this rank's experts from the blocks' weights, unless those are on the
    meta device (a model built empty to load from shards): then
    moe_ep.integrations.transformers.load_pretrained fills them.
    """
    blocks = [
        (name, module) for name, module in model.named_modules() if families.family_of(module)
    ]
    if not blocks:
        raise ValueError(
            "model: no MoE block of a supported family (Mixtral, Qwen2-MoE, Qwen3-MoE, "
            "DeepSeek-V3) found"
        )
    placements = list(placement) if isinstance(placement, Sequence) else [placement] * len(blocks)
    if len(placements) != len(blocks):
        raise ValueError(f"placement: {len(placements)} placements for {len(blocks)} MoE layers")
    for (name, block), layer_placement in zip(blocks, placements, strict=True):
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(
            parent,
            child_name,
            _convert_block(
                block,
                model.config,
                group,
                layer_placement,
                dispatch_mode,
                capacity,
                num_chunks,
                device,
            ),
        )
    return model


def _convert_block(block, config, group, placement, dispatch_mode, capacity, num_chunks, device):
    router, experts = block.gate, block.experts
    on_meta = experts.gate_up_proj.is_meta
    if device is None:
        device = "cpu" if on_meta else router.weight.device
    moe = MoELayer(
        **families.layer_arguments(block, config),
        device=device,
        group=group,
        placement=placement,
        dispatch_mode=dispatch_mode,
        capacity=capacity,
        num_chunks=num_chunks,
    )
    bias_name = "e_score_correction_bias"
    source_names = {
        "gate.weight": "gate_weight",
        "experts.gate_up_proj": "w13",
        "experts.down_proj": "w2",
    }
    if moe.expert_bias is not None:
        source_names[f"gate.{bias_name}"] = "expert_bias"
    if not on_meta:
        # Only this rank's rows are selected (on the weights' device) and copied.
        moe.load_full_weights(
            router.weight,
            experts.gate_up_proj,
            experts.down_proj,
            getattr(router, bias_name) if moe.expert_bias is not None else None,
            transposed=False,
        )
    return MoEBlock(block, moe, source_names)

"""Sharded loading: a rank reads only its own experts' weights from a model's safetensors
shards, so that no rank ever holds every expert.

    model = from_pretrained(path, group=dist.group.WORLD)    # build empty, convert, load

or, step by step, for a model built on the meta device and converted:

    load_pretrained(model, path)

Checkpoint keys are mapped to the model's names with transformers' own conversion rules
(transformers.conversion_mapping, the rules its from_pretrained applies): a checkpoint that
stores one tensor per expert (Mixtral's experts.N.w1/w3/w2, Qwen's and DeepSeek's
experts.N.gate_proj/up_proj/down_proj) is read tensor by tensor, and the tensors of other
ranks' experts are never read; a checkpoint that stores fused [E, 2F, H] experts is read one
expert at a time through safetensors' slices. The files are memory-mapped: what a rank reads
is what it touches.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    Concatenate,
    MergeModulelist,
    WeightConverter,
    rename_source_key,
)

from moe_ep.integrations.transformers.convert import MoEBlock, convert

__all__ = ["LoadReport", "empty_model", "from_pretrained", "load_pretrained"]


@dataclass
class LoadReport:
    """What load_pretrained read: bytes from the files (experts apart), and which experts
    of each MoE layer (by the layer's module name)."""

    bytes_read: int = 0
    expert_bytes_read: int = 0
    experts_read: dict[str, set[int]] = field(default_factory=dict)
    unexpected_keys: list[str] = field(default_factory=list)


def empty_model(config, dtype: torch.dtype | None = None) -> nn.Module:
    """A causal LM for `config` whose parameters are on the meta device (buffers are real:
    rotary tables and the like are computed, not loaded)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def from_pretrained(
    path: str,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    **convert_args,
) -> nn.Module:
    """The model saved at `path` (save_pretrained's directory), converted (convert's
    arguments: group, placement, dispatch_mode, ...) and loaded with this rank's experts
    only. dtype defaults to the checkpoint's config.dtype. In eval mode."""
    config = AutoConfig.from_pretrained(path)
    model = empty_model(config, dtype or getattr(config, "dtype", None))
    convert(model, device=device, **convert_args)
    load_pretrained(model, path, device=device)
    return model.eval()


@torch.no_grad()
def load_pretrained(
    model: nn.Module, path: str, *, device: torch.device | str = "cpu"
) -> LoadReport:
    """Loads the safetensors checkpoint at `path` into a converted model: every parameter
    it holds (meta parameters are materialised on `device`), the MoE layers' routers, and
    each MoE layer's local experts only. Raises naming what the checkpoint did not provide."""
    blocks = {name: m for name, m in model.named_modules() if isinstance(m, MoEBlock)}
    if not blocks:
        raise ValueError("model: no MoEBlock; convert(model, ...) it first")
    transforms = get_model_conversion_mapping(model)
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    filled = {name: _ExpertsLoaded() for name in blocks}
    report = LoadReport(experts_read={name: set() for name in blocks})
    for file in _checkpoint_files(path):
        with safe_open(file, framework="pt", device="cpu") as checkpoint:
            for key in checkpoint.keys():
                target, pattern = rename_source_key(key, renamings, converters)
                owner = next((n for n in blocks if target.startswith(n + ".")), None)
                role = blocks[owner].source_names.get(target[len(owner) + 1 :]) if owner else None
                if role in ("w13", "w2"):
                    converter = by_pattern.get(pattern)
                    _load_experts(
                        checkpoint, key, blocks[owner].moe, role, converter, pattern,
                        filled[owner], report, report.experts_read[owner],
                    )  # fmt: skip
                elif role is not None:
                    tensor = checkpoint.get_tensor(key)
                    report.bytes_read += tensor.nbytes
                    _copy(f"{owner}.moe.{role}", getattr(blocks[owner].moe, role), tensor)
                elif not _load_dense(model, target, checkpoint, key, device, report):
                    report.unexpected_keys.append(key)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    missing += [
        f"{name}.moe.{role} (experts {experts})"
        for name, block in blocks.items()
        for role, experts in filled[name].missing(block.moe.local_expert_ids).items()
    ]
    if missing:
        raise ValueError(f"path: the checkpoint at {path} has no weights for {missing}")
    return report


def _checkpoint_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, name) for name in names]
    single = os.path.join(path, "model.safetensors")
    if not os.path.exists(single):
        raise FileNotFoundError(f"path: no model.safetensors(.index.json) in {path}")
    return [single]


class _ExpertsLoaded:
    """The parts of each local expert's w13 and w2 loaded so far (per-expert checkpoints
    hold w13 in two parts, gate and up)."""

    def __init__(self) -> None:
        self.parts: dict[tuple[str, int], set[int]] = {}
        self.needed = {"w13": 1, "w2": 1}

    def add(self, role: str, expert: int, part: int, parts: int) -> None:
        self.parts.setdefault((role, expert), set()).add(part)
        self.needed[role] = parts

    def missing(self, experts: list[int]) -> dict[str, list[int]]:
        return {
            role: absent
            for role, needed in self.needed.items()
            if (absent := [e for e in experts if len(self.parts.get((role, e), ())) < needed])
        }


def _load_experts(checkpoint, key, moe, role, converter, pattern, filled, report, read):
    """One checkpoint tensor of experts into the layer's local slots: a per-expert tensor
    (converter and pattern given) only if this rank hosts that expert, a fused one expert by
    expert."""
    local = moe.local_expert_ids
    weights = getattr(moe, role)
    if converter is None:  # fused [E, ...]: slice this rank's experts out of the file
        source = checkpoint.get_slice(key)
        for slot, expert in enumerate(local):
            tensor = source[expert : expert + 1][0]
            report.expert_bytes_read += tensor.nbytes
            _copy(f"{key}[{expert}]", weights[slot], tensor)
            read.add(expert)
            filled.add(role, expert, 0, 1)
        return
    _check_operations(converter, role)
    expert = int(re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), key).group(1))
    slots = [slot for slot, e in enumerate(local) if e == expert]
    if not slots:
        return  # another rank's expert: not read
    tensor = checkpoint.get_tensor(key)
    report.expert_bytes_read += tensor.nbytes
    read.add(expert)
    part = converter.source_patterns.index(pattern)  # gate, then up (Concatenate's order)
    rows = tensor.shape[0]
    for slot in slots:
        _copy(key, weights[slot, part * rows : (part + 1) * rows], tensor)
    filled.add(role, expert, part, len(converter.source_patterns))


def _check_operations(converter: WeightConverter, role: str) -> None:
    """The per-expert layouts this loader knows: experts stacked (MergeModulelist), for w13
    then the gate and up parts concatenated along the output rows."""
    kinds = [type(op) for op in converter.operations]
    expected = [MergeModulelist, Concatenate] if role == "w13" else [MergeModulelist]
    if kinds != expected or any(
        getattr(op, "dim", 0) != d for op, d in zip(converter.operations, (0, 1), strict=False)
    ):
        raise NotImplementedError(
            f"checkpoint: experts converted by {converter.operations} into {role}; moe_ep's "
            "loader reads per-expert tensors stacked on dim 0 (and gate/up concatenated on dim 1)"
        )


def _load_dense(model, name, checkpoint, key, device, report) -> bool:
    """A parameter or buffer of the model by name, from the file; False if the model has
    none of that name."""
    module_name, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return False
    if attr in module._parameters and module._parameters[attr] is not None:
        current = module._parameters[attr]
    elif attr in module._buffers and module._buffers[attr] is not None:
        current = module._buffers[attr]
    else:
        return False
    tensor = checkpoint.get_tensor(key)
    report.bytes_read += tensor.nbytes
    if not current.is_meta:
        _copy(name, current, tensor)
    elif attr in module._parameters:
        value = tensor.to(device=device, dtype=current.dtype)
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attr] = tensor.to(device=device, dtype=current.dtype)
    return True


def _copy(name: str, destination: torch.Tensor, tensor: torch.Tensor) -> None:
    if destination.shape != tensor.shape:
        raise ValueError(
            f"checkpoint: {name} has shape {list(tensor.shape)}, the model expects "
            f"{list(destination.shape)}"
        )
    destination.copy_(tensor)

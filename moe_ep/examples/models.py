"""Small MoE models of each supported family with random weights (the machines have no model
hub): configs, models, and a checkpoint directory that every rank of a group sees."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator

import torch
import torch.distributed as dist
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    MixtralConfig,
    PretrainedConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3")


def small_config(
    family: str,
    *,
    hidden: int = 64,
    ffn: int = 32,
    experts: int = 8,
    top_k: int = 2,
    layers: int = 2,
    heads: int = 4,
    vocab: int = 256,
    groups: int = 4,
) -> PretrainedConfig:
    """A config of the family; ffn is each expert's (the dense and shared FFNs are 2 or 1.5
    times it). DeepSeek-V3 gets its routing: sigmoid, `groups` expert groups of which half
    are chosen, scaling 2.5, one shared expert, the first layer dense."""
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        initializer_range=0.1,  # decisive routing and logits: no near-ties at float32 rounding
        eos_token_id=None,  # every rank generates the same number of tokens
        bos_token_id=None,
        num_experts_per_tok=top_k,
    )
    if family == "mixtral":
        return MixtralConfig(**common, intermediate_size=ffn, num_local_experts=experts)
    qwen = dict(intermediate_size=2 * ffn, moe_intermediate_size=ffn, num_experts=experts)
    if family == "qwen2_moe":
        return Qwen2MoeConfig(
            **common, **qwen, shared_expert_intermediate_size=3 * ffn // 2, norm_topk_prob=False
        )
    if family == "qwen3_moe":
        return Qwen3MoeConfig(**common, **qwen, head_dim=hidden // heads, norm_topk_prob=True)
    if family == "deepseek_v3":
        head = hidden // heads
        return DeepseekV3Config(
            **common,
            intermediate_size=3 * ffn,
            moe_intermediate_size=ffn,
            first_k_dense_replace=1,
            n_routed_experts=experts,
            n_group=groups,
            topk_group=groups // 2,
            n_shared_experts=1,
            routed_scaling_factor=2.5,
            q_lora_rank=hidden // 2,
            kv_lora_rank=hidden // 4,
            qk_rope_head_dim=head // 2,
            qk_nope_head_dim=head // 2,
            v_head_dim=head,
        )
    raise ValueError(f"family: one of {FAMILIES}, got {family!r}")


def random_model(config: PretrainedConfig, dtype=torch.float32, seed: int = 0) -> torch.nn.Module:
    """The config's causal LM with seeded random weights and, for DeepSeek-V3, a non-zero
    correction bias (so that loading it and its effect on the choice are exercised)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn_like(buffer) * 0.05)
    return model


@contextlib.contextmanager
def shared_directory(directory: str | None = None) -> Iterator[str]:
    """A directory every rank of the default group sees (rank 0's temporary one unless
    given), removed when every rank is done with it (collective on entry and exit)."""
    with tempfile.TemporaryDirectory() as scratch:
        chosen = [directory or scratch]
        dist.broadcast_object_list(chosen, src=0)
        try:
            yield chosen[0]
        finally:
            dist.barrier()


def save_random_model(
    config: PretrainedConfig, path: str, dtype=torch.float32, seed: int = 0
) -> None:
    """Rank 0 saves random_model(config) at path (save_pretrained); every rank returns once it
    is there (collective)."""
    if dist.get_rank() == 0:
        random_model(config, dtype, seed).save_pretrained(path)
    dist.barrier()

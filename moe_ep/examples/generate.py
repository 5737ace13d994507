"""Greedy generation with moe_ep inside Hugging Face transformers models, checked against
the same models without expert parallelism.

    torchrun --standalone --nproc-per-node 4 -m moe_ep.examples.generate
    python -m moe_ep.examples.generate                      # one rank

For each family (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3) a small model is built from a
config with random weights (no download), saved with save_pretrained, and loaded:

* "reference": plain from_pretrained, every expert on every rank, no moe_ep;
* "transformers-ep" (2 ranks or more): from_pretrained with
  DistributedConfig(ep_size=N, tp_size=N, ep_implementation="moe_ep"): every rank holds
  the same prompts, its slice of them goes through moe_ep;
* "convert": moe_ep.integrations.transformers.from_pretrained(path, group=WORLD):
  data-parallel attention (each rank its own prompts) and expert-parallel MoE, each rank
  reading only its own experts from the checkpoint (at one rank too: a group of one).

Each path generates greedily; its tokens must equal the reference's and its logits lie
within --rtol of them (max |difference| over max |reference logit|, per step).
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import transformers
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    DistributedConfig,
    MixtralConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

import moe_ep.integrations.transformers as moe_ep_transformers
from moe_ep import debug

COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    initializer_range=0.1,  # decisive routing and logits: no near-ties at float32 rounding
    eos_token_id=None,  # every rank generates the same number of tokens
    bos_token_id=None,
)


def small_config(family: str):
    """A small config of the family: 8 to 16 experts, top-2 to top-4, two layers."""
    if family == "mixtral":
        return MixtralConfig(
            **COMMON, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2
        )
    if family == "qwen2_moe":
        return Qwen2MoeConfig(
            **COMMON,
            intermediate_size=64,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
        )
    if family == "qwen3_moe":
        return Qwen3MoeConfig(
            **COMMON,
            head_dim=16,
            intermediate_size=64,
            moe_intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
        )
    if family == "deepseek_v3":
        return DeepseekV3Config(
            **COMMON,
            intermediate_size=96,
            moe_intermediate_size=32,
            first_k_dense_replace=1,
            n_routed_experts=16,
            num_experts_per_tok=4,
            n_group=4,
            topk_group=2,
            n_shared_experts=1,
            routed_scaling_factor=2.5,
            q_lora_rank=32,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
        )
    raise ValueError(f"family: one of {FAMILIES}, got {family!r}")


FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3")


def save_small_model(family: str, path: str, seed: int = 0) -> None:
    """Random weights (seeded), with a non-zero DeepSeek-V3 correction bias so that its
    loading and its effect on the choice are exercised."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(small_config(family), dtype=torch.float32)
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buffer.copy_(torch.randn_like(buffer) * 0.05)
    model.save_pretrained(path)


@dataclass
class Check:
    family: str
    path: str
    world: int
    tokens_equal: bool
    logits_error: float  # max over steps of max |diff| / max |reference|
    host_reads_per_layer: float  # moe_ep host reads per MoE layer forward
    experts_read_local: bool  # the checkpoint reader read exactly this rank's experts

    def passed(self, rtol: float) -> bool:
        return self.tokens_equal and self.logits_error <= rtol and self.experts_read_local


def greedy(model, prompts: torch.Tensor, new_tokens: int, **kwargs):
    with torch.no_grad():
        out = model.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
            **kwargs,
        )
    return out.sequences, torch.stack(out.logits)


def logits_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    errors = (actual.double() - expected.double()).abs().amax(dim=(1, 2))
    scales = expected.double().abs().amax(dim=(1, 2)).clamp_min(1e-12)
    return float((errors / scales).max())


def compare(family, path, model, reference, prompts, new_tokens, layers, **kwargs) -> Check:
    expected_tokens, expected_logits = greedy(reference, prompts, new_tokens)
    before = debug.host_reads()
    tokens, logits = greedy(model, prompts, new_tokens, **kwargs)
    reads = debug.host_reads() - before
    return Check(
        family,
        path,
        dist.get_world_size(),
        torch.equal(tokens, expected_tokens),
        logits_error(logits, expected_logits),
        reads / (layers * new_tokens),
        True,
    )


def check_family(family: str, directory: str, new_tokens: int, batch: int) -> list[Check]:
    rank, world = dist.get_rank(), dist.get_world_size()
    path = os.path.join(directory, family)
    if rank == 0:
        save_small_model(family, path)
    dist.barrier()
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    config = reference.config
    layers = sum(1 for m in reference.modules() if moe_ep_transformers.families.family_of(m))
    checks = []
    if world > 1:
        shared = torch.Generator().manual_seed(100)  # the same prompts on every rank
        prompts = torch.randint(config.vocab_size, (batch, 6), generator=shared)
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=torch.float32,
            distributed_config=DistributedConfig(
                ep_size=world, tp_size=world, ep_implementation="moe_ep"
            ),
        ).eval()
        checks.append(
            compare(family, "transformers-ep", model, reference, prompts, new_tokens, layers)
        )
        del model
    own = torch.Generator().manual_seed(200 + rank)  # each rank its own prompts
    prompts = torch.randint(config.vocab_size, (batch, 4 + rank), generator=own)
    model = moe_ep_transformers.empty_model(config, torch.float32)
    moe_ep_transformers.convert(model, group=dist.group.WORLD)
    report = moe_ep_transformers.load_pretrained(model, path)
    model.eval()
    check = compare(
        family, "convert", model, reference, prompts, new_tokens, layers, synced_gpus=world > 1
    )
    check.experts_read_local = all(
        block.moe.local_expert_ids and set(block.moe.local_expert_ids) == report.experts_read[name]
        for name, block in model.named_modules()
        if isinstance(block, moe_ep_transformers.MoEBlock)
    )
    checks.append(check)
    return checks


def init_distributed() -> None:
    """torchrun's environment, or a group of one for a plain `python -m`."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
        )
    dist.init_process_group("gloo", timeout=timedelta(minutes=5))


def run(families, new_tokens: int = 6, batch: int = 2, directory: str | None = None):
    """Every family's checks on this rank (collective: every rank calls it alike)."""
    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as scratch:
        shared = [directory or scratch]
        dist.broadcast_object_list(shared, src=0)  # rank 0's directory for everyone
        return [c for f in families for c in check_family(f, shared[0], new_tokens, batch)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--new-tokens", type=int, default=6)
    p.add_argument("--batch", type=int, default=2, help="prompts per rank")
    p.add_argument("--rtol", type=float, default=1e-4)
    p.add_argument("--dir", help="where to save the models (default: a temporary directory)")
    args = p.parse_args()
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    checks = run(args.families.split(","), args.new_tokens, args.batch, args.dir)
    gathered = [None] * world
    dist.all_gather_object(gathered, checks)
    failed = False
    if rank == 0:
        print(f"moe_ep in transformers: {world} rank(s), CPU/Gloo, float32, greedy")
        print("family       path             rank  tokens  logits rel err  host reads/layer")
    for r, rank_checks in enumerate(gathered):
        for c in rank_checks:
            ok = c.passed(args.rtol)
            failed |= not ok
            if rank == 0:
                print(
                    f"{c.family:<12} {c.path:<16} {r:>4}  "
                    f"{'equal' if c.tokens_equal else 'DIFFER':<6}"
                    f"  {c.logits_error:>14.2e}  {c.host_reads_per_layer:>16.2f}"
                    f"{'' if ok else '  FAIL'}"
                )
    if rank == 0:
        print(
            f"check against the models without expert parallelism: {'FAIL' if failed else 'PASS'}"
        )
    dist.destroy_process_group()
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()

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
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import transformers
from transformers import AutoModelForCausalLM, DistributedConfig

import moe_ep.integrations.transformers as moe_ep_transformers
from moe_ep import debug
from moe_ep.examples import models


def family_config(family: str):
    """The family's small model: 8 experts top-2, DeepSeek-V3 16 experts top-4 in 2 of 4
    groups."""
    if family == "deepseek_v3":
        return models.small_config(family, experts=16, top_k=4)
    return models.small_config(family)


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
    models.save_random_model(family_config(family), path)
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
    with models.shared_directory(directory) as shared:
        return [c for f in families for c in check_family(f, shared, new_tokens, batch)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--families", default=",".join(models.FAMILIES))
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

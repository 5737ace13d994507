"""Spawned by test_transformers.py: moe_ep inside transformers models over a Gloo group,
against the same models without expert parallelism (moe_ep.examples.generate's checks), and
the misuse that must raise on every rank."""

import os
import sys

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import process_group  # noqa: E402

from moe_ep.examples import generate, models  # noqa: E402


def check_generation(families):
    """Greedy tokens equal, float32 logits within 1e-4 relative, one host read per MoE
    layer forward, and each rank read exactly its own experts from the checkpoint."""
    checks = generate.run(families, new_tokens=4, batch=2)
    paths = {c.path for c in checks}
    assert paths == ({"convert", "transformers-ep"} if dist.get_world_size() > 1 else {"convert"})
    for c in checks:
        assert c.tokens_equal, c
        assert c.logits_error <= 1e-4, c
        assert c.host_reads_per_layer == 1.0, c
        assert c.experts_read_local, c


def check_misuse(tmp_dir):
    """Gradients through ep_implementation='moe_ep' and a float32 input to a bfloat16
    expert-parallel layer raise on every rank, naming the cause."""
    from transformers import AutoModelForCausalLM, DistributedConfig

    import moe_ep.integrations.transformers  # noqa: F401

    world = dist.get_world_size()
    path = os.path.join(tmp_dir, "misuse")
    models.save_random_model(generate.family_config("qwen3_moe"), path)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=torch.float32,
        distributed_config=DistributedConfig(
            ep_size=world, tp_size=world, ep_implementation="moe_ep"
        ),
    )
    with pytest.raises(RuntimeError, match="inference only"):
        model(torch.zeros(1, 3, dtype=torch.long))  # parameters require grad, grad mode on
    for mode in ("exact", "capacity"):
        layer = moe_ep.MoELayer(
            32, 8, 2 * world, 2, dtype=torch.bfloat16, group=dist.group.WORLD,
            dispatch_mode=mode, capacity=8,
        )  # fmt: skip
        # A rank names its own dtype, or the first rank whose x is wrong.
        with pytest.raises(RuntimeError, match="argument 'x'"):
            layer(torch.randn(5, 32))


def worker(rank: int, world: int, init_file: str, families: list[str]):
    with process_group(rank, world, init_file):
        check_generation(families)
        if world > 1:
            check_misuse(os.path.dirname(init_file))

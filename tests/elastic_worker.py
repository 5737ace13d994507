"""A rank dies (or stalls) while a two-layer expert-parallel model serves; the survivors
recover with moe_ep.elastic.ElasticEP and keep serving (run by tests/test_elastic.py and
benchmarks/bench_elastic.py through tests/launcher.py). Every step's output on every rank
is compared with a float64 reference that routes from the router weights itself; each rank
writes what it saw to <results>/rank<r>.json (the victim its time of death)."""

from __future__ import annotations

import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from launcher import join_group
from torch import nn

import moe_ep
from moe_ep import reference
from moe_ep.elastic import ElasticEP
from moe_ep.examples.elastic_serving import HIDDEN, TOP_K, make_layers, weights
from moe_ep.roll_call import RankExcluded

TOLERANCE = 2e-5  # float32, relative to each output row's largest reference magnitude


class Block(nn.Module):
    """The example's two layers (exact size, then fixed capacity) in a row."""

    def __init__(self, world: int, kind: str) -> None:
        super().__init__()
        self.layers = nn.ModuleList(make_layers(world, kind, dist.group.WORLD))

    def forward(self, x: torch.Tensor, hook=None) -> list[torch.Tensor]:
        """The input and output of every layer."""
        seen = [x]
        for layer in self.layers:
            seen.append(layer(seen[-1], overlap_fn=hook))
            if layer.dispatch_mode == "capacity":
                layer.check_dispatch_status()
        return seen


def expected(layer: moe_ep.MoELayer, index: int, x: torch.Tensor) -> torch.Tensor:
    """The layer in float64, routed here from its router weights."""
    gate, w13, w2 = weights(layer.num_experts, index)
    ids, topk_weights = reference.route(F.linear(x.double(), gate.double()), TOP_K)
    return reference.moe(x, ids, topk_weights, w13, w2)


def matches(block: Block, seen: list[torch.Tensor]) -> bool:
    for index, layer in enumerate(block.layers):
        want = expected(layer, index, seen[index])
        error = (seen[index + 1].double() - want).abs().amax(dim=1)
        if bool((error > TOLERANCE * want.abs().amax(dim=1).clamp_min(1e-6)).any()):
            return False
    return True


def run(
    rank: int,
    world: int,
    init_file: str,
    results: str,
    kind: str,
    fault: str,
    when: str,
    victims: list[int],
    steps: int,
    fault_steps: list[int],
    deadline: float,
) -> None:
    """victims[i] fails at step fault_steps[i]."""
    moe_ep.deadline.set_default(deadline)
    join_group(rank, world, init_file)
    block = Block(world, kind)
    # The host-side copy: all experts' weights of a layer, as read from a checkpoint.
    elastic = ElasticEP(
        block, lambda layer: weights(layer.num_experts, int(layer.name.removeprefix("layer")))[1:]
    )
    step = 0

    def fail_here(now: str) -> None:
        if (rank, step) not in zip(victims, fault_steps, strict=True) or now != when:
            return
        if fault == "die":
            with open(os.path.join(results, f"rank{rank}.json"), "w") as f:
                json.dump({"died": time.time()}, f)
            os._exit(0)
        time.sleep(deadline + moe_ep.deadline.grace(deadline) + 2.0)

    def mid_step(chunk: int, x_chunk: torch.Tensor) -> None:
        if chunk == 0:
            fail_here("middle")

    log = []
    try:
        for step in range(steps):
            g = torch.Generator().manual_seed(step * 97 + rank)
            x = torch.randn(8 + (3 * step + rank) % 9, HIDDEN, generator=g)
            fail_here("between")
            seen = elastic.run(lambda x=x: block(x, mid_step))
            log.append({"step": step, "done": time.time(), "correct": matches(block, seen)})
    except RankExcluded as error:
        log.append({"step": step, "excluded": str(error)})
    recoveries = [r.__dict__ for r in elastic.recoveries]
    with open(os.path.join(results, f"rank{rank}.json"), "w") as f:
        json.dump(
            {"log": log, "recoveries": recoveries, "world_after": block.layers[0].group.size()}, f
        )
    os._exit(0)

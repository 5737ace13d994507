"""A rank dies (or stalls) while a two-layer expert-parallel model serves; the survivors
recover with moe_ep.elastic.ElasticEP and keep serving (run by tests/test_elastic.py and
benchmarks/bench_elastic.py through tests/launcher.py). Every step's output on every rank
is compared with a float64 reference that routes from the router weights itself; each rank
writes what it saw to <results>/rank<r>.json (the victim its time of death)."""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import moe_ep
from moe_ep import plan, reference
from moe_ep.elastic import ElasticEP
from moe_ep.placement import ExpertPlacement
from moe_ep.roll_call import RankExcluded

HIDDEN, FFN, TOP_K = 32, 16, 2
TOLERANCE = 2e-5  # float32, relative to each output row's largest reference magnitude


def full_weights(experts: int, layer: int):
    g = torch.Generator().manual_seed(100 + layer)
    gate = torch.randn(experts, HIDDEN, generator=g) / HIDDEN**0.5
    w13 = torch.randn(experts, 2 * FFN, HIDDEN, generator=g) / HIDDEN**0.5
    w2 = torch.randn(experts, HIDDEN, FFN, generator=g) / FFN**0.5
    return gate, w13, w2


def placement_for(kind: str, experts: int, world: int) -> ExpertPlacement:
    if kind == "contiguous":  # one copy of each expert: a lost one comes from the host copy
        return ExpertPlacement.contiguous(experts, world)
    # Two copies of every expert, never both on one rank: a lost one comes from a survivor.
    model = plan.Model(1, (), experts, TOP_K, bytes_per_expert=1.0)
    cluster = plan.Cluster(num_nodes=1, gpus_per_node=world, gpu_memory_bytes=0)
    planned = plan.plan(model, cluster, redundant_experts=experts, fault_domain="gpu")
    return ExpertPlacement.from_plan(planned.layers[0], world)


class Block(nn.Module):
    """Two MoE layers in a row: exact size (two chunks) then fixed capacity."""

    def __init__(self, world: int, kind: str) -> None:
        super().__init__()
        experts = 2 * world
        self.layers = nn.ModuleList(
            moe_ep.MoELayer(
                HIDDEN,
                FFN,
                experts,
                TOP_K,
                dtype=torch.float32,
                group=dist.group.WORLD,
                placement=placement_for(kind, experts, world),
                dispatch_mode=mode,
                capacity=32,
                num_chunks=chunks,
                name=f"block.{index}",
            )
            for index, (mode, chunks) in enumerate((("exact", 2), ("capacity", 1)))
        )
        for index, layer in enumerate(self.layers):
            layer.load_full_weights(*full_weights(experts, index))

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
    gate, w13, w2 = full_weights(layer.num_experts, index)
    ids, weights = reference.route(F.linear(x.double(), gate.double()), TOP_K)
    return reference.moe(x, ids, weights, w13, w2)


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
    torch.set_num_threads(1)
    moe_ep.deadline.set_default(deadline)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=120),
    )
    block = Block(world, kind)
    # The host-side copy: all experts' weights of a layer, as read from a checkpoint.
    elastic = ElasticEP(
        block, lambda layer: full_weights(layer.num_experts, int(layer.name.split(".")[1]))[1:]
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

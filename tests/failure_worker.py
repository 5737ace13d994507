"""One rank of an expert-parallel group dies or stalls (run by tests/test_deadline.py through
tests/launcher.py): every survivor must raise CollectiveFailure naming the layer, the
operation and the lost rank within the deadline plus the roll call's grace, and no rank may
hang. Each rank writes what it saw to <results>/rank<r>.json."""

from __future__ import annotations

import json
import os
import time

import torch
import torch.distributed as dist
from launcher import join_group

import moe_ep
from moe_ep.deadline import CollectiveFailure
from moe_ep.roll_call import RankExcluded

HIDDEN, FFN = 32, 16
LAYER_NAME = "decoder.3.moe"
FAULT_STEP = 2  # the faulty rank behaves for two steps, then fails in the third
VICTIM_EXIT_CODE = 17


def record(results: str, rank: int, **fields) -> None:
    with open(os.path.join(results, f"rank{rank}.json"), "w") as f:
        json.dump(fields, f)


def make_layer(world: int, mode: str, layer_deadline: float | None) -> moe_ep.MoELayer:
    experts = 2 * world
    layer = moe_ep.MoELayer(
        HIDDEN,
        FFN,
        experts,
        2,
        dtype=torch.float32,
        group=dist.group.WORLD,
        dispatch_mode=mode,
        capacity=16,
        num_chunks=2,  # the faulty rank fails between the two chunks of a step ("middle")
        deadline=layer_deadline,
        name=LAYER_NAME,
    )
    g = torch.Generator().manual_seed(5)
    layer.load_full_weights(
        torch.randn(experts, HIDDEN, generator=g),
        torch.randn(experts, 2 * FFN, HIDDEN, generator=g) / HIDDEN**0.5,
        torch.randn(experts, HIDDEN, FFN, generator=g) / FFN**0.5,
        transposed=False,  # [E, out, in]; square here (2F == H)
    )
    return layer


def run(
    rank: int,
    world: int,
    init_file: str,
    results: str,
    mode: str,
    fault: str,
    when: str,
    victim: int,
    default_deadline: float,
    layer_deadline: float | None,
    stall_seconds: float,
) -> None:
    """mode: "exact" or "capacity"; fault: "die" (os._exit) or "stall" (sleep, then carry
    on); when: "between" (before a step), "middle" (after the step's first chunk) or
    "balancer" (before the LoadBalancer's boundary, whose window all-reduce then fails)."""
    moe_ep.deadline.set_default(default_deadline)
    join_group(rank, world, init_file)
    layer = make_layer(world, mode, layer_deadline)
    # A window of one step: every boundary all-reduces the counts (no re-plan, no migration).
    balancer = moe_ep.LoadBalancer(layer, window=1, threshold=None, background=False)
    x = torch.randn(12, HIDDEN)
    step = 0

    def fail_here(now: str) -> None:
        if rank != victim or step != FAULT_STEP or now != when:
            return
        if fault == "die":
            os._exit(VICTIM_EXIT_CODE)
        time.sleep(stall_seconds)

    def after_first_chunk(chunk: int, x_chunk: torch.Tensor) -> None:
        if chunk == 0:
            fail_here("middle")

    for step in range(FAULT_STEP + 2):
        fail_here("between")
        start = time.monotonic()
        try:
            layer(x, overlap_fn=after_first_chunk)
            if mode == "capacity":
                layer.check_dispatch_status()
            fail_here("balancer")
            balancer.step()
        except CollectiveFailure as error:
            record(
                results,
                rank,
                outcome="raised",
                step=step,
                seconds=time.monotonic() - start,
                missing=list(error.missing),
                layer=error.layer,
                operation=error.operation,
                message=str(error),
            )
            os._exit(0)
        except RankExcluded as error:
            record(results, rank, outcome="excluded", step=step, message=str(error))
            os._exit(0)
    record(results, rank, outcome="finished", step=step)
    os._exit(0)

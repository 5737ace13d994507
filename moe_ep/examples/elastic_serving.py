"""Serving that survives a rank's death (moe_ep.elastic), under torchrun:

    torchrun --nproc-per-node 4 -m moe_ep.examples.elastic_serving --kill-rank 2 --kill-step 5

Every rank serves a stream of requests through a block of two expert-parallel MoE layers
(exact size, then fixed capacity) and checks each answer against a float64 reference that
routes from the router weights itself. At --kill-step, --kill-rank exits without a word (its
process is gone, its sockets close). The others raise CollectiveFailure in the step they are
in, agree through the store that the rank is gone, form a group of the survivors, re-plan the
placement, copy or restore the experts it held, retry the step and keep serving. Rank 0 (or
the lowest survivor) prints the time from the death to the first correct answer after it and
the requests lost.

--placement replicas (default) plans two copies of every expert, never both on one rank
(plan(..., fault_domain="gpu")), so the lost experts are copied from a survivor; contiguous
keeps one copy, and the lost experts are read from the host-side copy of the weights.

The victim exits with status 0: torchrun's agent stops every worker when one fails with an
error (its own restart policy), so a status 0 is how this example lets the survivors go on
under it; a serving deployment supervises its processes itself. The store is torchrun's
agent store, which outlives every rank, rank 0 included.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import moe_ep
from moe_ep import plan, reference
from moe_ep.elastic import ElasticEP
from moe_ep.placement import ExpertPlacement

HIDDEN, FFN, TOP_K = 64, 32, 2


def weights(experts: int, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(router, w13, w2) of all experts of a layer: the checkpoint, the same on every rank."""
    g = torch.Generator().manual_seed(layer)
    return (
        torch.randn(experts, HIDDEN, generator=g) / HIDDEN**0.5,
        torch.randn(experts, 2 * FFN, HIDDEN, generator=g) / HIDDEN**0.5,
        torch.randn(experts, HIDDEN, FFN, generator=g) / FFN**0.5,
    )


def make_placement(kind: str, experts: int, world: int) -> ExpertPlacement:
    if kind == "contiguous":
        return ExpertPlacement.contiguous(experts, world)
    model = plan.Model(1, (), experts, TOP_K, bytes_per_expert=1.0)
    cluster = plan.Cluster(num_nodes=1, gpus_per_node=world, gpu_memory_bytes=0)
    planned = plan.plan(model, cluster, redundant_experts=experts, fault_domain="gpu")
    return ExpertPlacement.from_plan(planned.layers[0], world)


def make_layers(world: int, kind: str, group: dist.ProcessGroup) -> list[moe_ep.MoELayer]:
    """Two expert-parallel layers, exact size (two chunks) then fixed capacity, each holding
    its share of the checkpoint."""
    experts = 2 * world
    layers = []
    for index, (mode, chunks) in enumerate((("exact", 2), ("capacity", 1))):
        layer = moe_ep.MoELayer(
            HIDDEN,
            FFN,
            experts,
            TOP_K,
            dtype=torch.float32,
            group=group,
            placement=make_placement(kind, experts, world),
            dispatch_mode=mode,
            capacity=64,
            num_chunks=chunks,
            name=f"layer{index}",
        )
        layer.load_full_weights(*weights(experts, index), transposed=False)  # 2F == H here
        layers.append(layer)
    return layers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kill-rank", type=int, default=2)
    p.add_argument("--kill-step", type=int, default=5)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--placement", choices=("replicas", "contiguous"), default="replicas")
    p.add_argument("--deadline", type=float, help="seconds (default: moe_ep's, 60)")
    p.add_argument("--grace", type=float, help="roll call, seconds (default: 10%% of the deadline)")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.deadline:
        moe_ep.deadline.set_default(args.deadline)
    moe_ep.deadline.set_grace(args.grace)
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    experts = 2 * world
    layers = make_layers(world, args.placement, dist.group.WORLD)
    model = torch.nn.Sequential(*layers)
    elastic = ElasticEP(model, lambda layer: weights(experts, layers.index(layer))[1:])
    store = dist.distributed_c10d._get_default_store()

    def serve(x: torch.Tensor) -> torch.Tensor:
        out = model(x)
        moe_ep.layer.check_dispatch_status(model)
        return out

    answered, first_after = 0, None
    for step in range(args.steps):
        if step == args.kill_step and rank == args.kill_rank:
            store.set("example/died", str(time.time()))
            print(f"rank {rank}: exiting at step {step}", flush=True)
            os._exit(0)
        g = torch.Generator().manual_seed(1000 * step + rank)
        x = torch.randn(16 + rank % 5, HIDDEN, generator=g)
        y = elastic.run(lambda x=x: serve(x))
        expected = x.double()
        for index in range(len(layers)):
            router, w13, w2 = weights(experts, index)
            ids, w = reference.route(F.linear(expected, router.double()), TOP_K)
            expected = reference.moe(expected, ids, w, w13, w2)
        error = (y.double() - expected).abs().amax(dim=1) / expected.abs().amax(dim=1)
        assert float(error.max()) < 1e-4, f"rank {rank} step {step}: relative error {error.max()}"
        answered += 1
        if elastic.recoveries and first_after is None:
            first_after = time.time()
    lowest = min(r for r in range(world) if r != args.kill_rank)
    if rank == lowest:
        recovery = elastic.recoveries[0]
        died = float(store.get("example/died"))
        print(
            f"world {world} -> {len(recovery.survivors)} ({args.placement}): rank "
            f"{list(recovery.failed)} lost in {recovery.operation!r}; recovery (new group, "
            f"re-plan, weights) {recovery.seconds:.2f} s; death to first correct answer "
            f"{first_after - died:.2f} s; requests answered {answered} of {args.steps}, lost 0; "
            f"this rank copied {recovery.copied} and restored {recovery.restored} experts"
        )


if __name__ == "__main__":
    main()

"""Elastic expert parallelism: serving goes on over the survivors when a rank dies.

    elastic = moe_ep.elastic.ElasticEP(model, full_weights=load_all_experts)
    for batch in batches:
        y = elastic.run(lambda: model(batch))  # retried on the survivors after a failure

A collective of an expert-parallel step that fails (a rank's process died) or passes its
deadline (a rank stopped answering) raises moe_ep.deadline.CollectiveFailure on every
survivor. ElasticEP.run then recovers, on every survivor, without restarting a process:
  1. the failed ranks are those the roll call through the group's store agreed on
     (moe_ep.roll_call): every survivor holds the same set;
  2. the survivors form a new process group (torch.distributed.new_group with local
     synchronization: the failed ranks take no part);
  3. each layer's placement is re-planned for the survivors by the planner (moe_ep.plan),
     from the slots that survived: only the lost slots are forced to move (max_moves=0), and
     with a fault domain the replicas are spread again so the next failure loses no expert;
  4. every expert a survivor newly hosts is copied from a survivor that holds it by the
     balancer's migration (moe_ep.migration.WeightTransfer, run at once: rounds of
     all-to-all over the new group, whose timeout is the deadline), or, for an expert whose
     every copy died, taken from the host-side copy of the weights (full_weights);
  5. the layers switch to the new group and placement, and the step runs again: the
     survivors' requests in flight are retried, not lost (the failed rank's own are gone
     with it).
A rank that stalled past the roll call's grace period is left out by the others and gets
moe_ep.roll_call.RankExcluded: it must stop serving.

The process group's store must outlive the ranks (FileStore, or torchrun's agent store; a
TCPStore hosted by a rank dies with it). On NCCL, survival also needs the watchdog to abort
the communicator without tearing the process down (TORCH_NCCL_ASYNC_ERROR_HANDLING=2): see
docs/reliability.md; only CPU/Gloo has run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from moe_ep import deadline, migration, plan
from moe_ep.deadline import CollectiveFailure
from moe_ep.layer import MoELayer
from moe_ep.placement import ExpertPlacement

__all__ = ["ElasticEP", "Recovery", "FullWeights"]

T = TypeVar("T")
# All-expert weights of a layer ([E, 2F, H], [E, H, F]), e.g. read from the checkpoint.
FullWeights = Callable[[MoELayer], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Recovery:
    """One recovery, as this rank saw it."""

    failed: tuple[int, ...]  # ranks of the old group
    survivors: tuple[int, ...]  # global ranks, in the new group's order
    operation: str  # what failed
    copied: int  # expert copies this rank received from survivors
    restored: int  # experts this rank took from the host-side copy
    seconds: float  # from the error to the new group, placements and weights in place


class ElasticEP:
    """Keeps the expert-parallel MoELayers of `model` serving over the survivors of failures.

    Args:
        model: the module; every MoELayer with a group takes part (they must share it).
        full_weights: returns a layer's all-expert weights (CPU is fine), called only for an
            expert whose every copy was lost. Without it such a loss raises.
        fault_domain: "gpu" (default) re-plans so that the next single failure loses no
            expert where the slots allow; "none" keeps the planner's plain re-plan.
        loads: per layer, the expected load of each expert (default: uniform), for the
            re-plan.
        max_recoveries: failures survived before giving up (the error is raised then).
    """

    def __init__(
        self,
        model: nn.Module,
        full_weights: FullWeights | None = None,
        *,
        fault_domain: str = "gpu",
        loads: Callable[[MoELayer], list[float]] | None = None,
        max_recoveries: int = 8,
    ) -> None:
        self.layers = [
            m for m in model.modules() if isinstance(m, MoELayer) and m.group is not None
        ]
        if not self.layers:
            raise ValueError("model: has no expert-parallel MoELayer (group=...)")
        if len({layer.group for layer in self.layers}) != 1:
            raise ValueError("model: its MoELayers must share one process group")
        if fault_domain not in ("none", "gpu"):
            raise ValueError(f"fault_domain: expected 'none' or 'gpu', got {fault_domain!r}")
        self.full_weights, self.fault_domain, self.loads = full_weights, fault_domain, loads
        self.max_recoveries = max_recoveries
        self.recoveries: list[Recovery] = []

    @property
    def group(self) -> dist.ProcessGroup:
        return self.layers[0].group

    def run(self, step: Callable[[], T]) -> T:
        """step() (every rank of the group calls it together), run again over the survivors
        after each failure it meets."""
        while True:
            try:
                return step()
            except CollectiveFailure as failure:
                if not failure.missing or len(self.recoveries) >= self.max_recoveries:
                    raise
                self.recover(failure)

    def recover(self, failure: CollectiveFailure) -> Recovery:
        """Moves every layer onto the survivors of `failure` (collective over them)."""
        start = time.monotonic()
        old = self.group
        members = dist.get_process_group_ranks(old)
        kept = [r for r in range(old.size()) if r not in failure.missing]
        survivors = [members[r] for r in kept]
        seconds = max(layer.deadline or deadline.default() for layer in self.layers)
        group = dist.new_group(
            survivors, timeout=timedelta(seconds=seconds), use_local_synchronization=True
        )
        copied = restored = 0
        for layer in self.layers:
            planned = self._replan(layer, kept)
            placement, w13, w2, c, r = _weights_for(layer, planned, kept, group, self.full_weights)
            copied, restored = copied + c, restored + r
            layer.group = group
            layer.dispatch_status = []
            layer.set_placement(placement, w13, w2)
        if old is not dist.group.WORLD:
            dist.destroy_process_group(old)
        recovery = Recovery(
            tuple(failure.missing),
            tuple(survivors),
            failure.operation,
            copied,
            restored,
            time.monotonic() - start,
        )
        self.recoveries.append(recovery)
        return recovery

    def _replan(self, layer: MoELayer, kept: list[int]) -> ExpertPlacement:
        """The planner's placement over the survivors, from the slots that survived."""
        old = layer.placement
        new_rank = {r: i for i, r in enumerate(kept)}
        slot_rank, phy2log = old.slot_rank.tolist(), old.phy2log.tolist()
        alive = [s for s, r in enumerate(slot_rank) if r in new_rank]
        previous = plan.LayerPlacement(
            layer=0,
            dense=False,
            phy2log=tuple(phy2log[s] for s in alive),
            log2phy=(),
            replica_count=(),
            gpus=tuple(new_rank[slot_rank[s]] for s in alive),
        )
        expert_bytes = (layer.w13[0].numel() + layer.w2[0].numel()) * layer.w13.element_size()
        model = plan.one_layer(layer.num_experts, layer.top_k, expert_bytes)
        cluster = plan.Cluster(num_nodes=1, gpus_per_node=len(kept), gpu_memory_bytes=0)
        loads = self.loads(layer) if self.loads else None
        planned = plan.plan(
            model,
            cluster,
            loads=[loads] if loads is not None else None,
            redundant_experts=max(old.num_slots, layer.num_experts) - layer.num_experts,
            previous=[previous],
            max_moves=0,  # only what the failure forces: the fewest weights to copy
            fault_domain=self.fault_domain,
        )
        return ExpertPlacement.from_plan(planned.layers[0], len(kept))


def _weights_for(
    layer: MoELayer,
    new: ExpertPlacement,
    kept: list[int],
    group: dist.ProcessGroup,
    full_weights: FullWeights | None,
) -> tuple[ExpertPlacement, torch.Tensor, torch.Tensor, int, int]:
    """This rank's part of moving `layer` onto the survivors' placement `new`: (the placement
    with each kept expert left in its row, w13, w2, experts received from survivors, experts
    taken from full_weights). The balancer's migration does the moving (a WeightTransfer from
    the slots that survived, run on this thread): an expert whose every copy died enters it
    as a row appended, from full_weights, on each rank that hosts it in `new`."""
    held = [layer.placement.local_experts(r) for r in kept]  # by new rank
    lost = sorted(set(range(layer.num_experts)).difference(*held))
    if lost and full_weights is None:  # every survivor sees the same: all raise alike
        raise RuntimeError(
            f"moe_ep: layer {layer.name!r}: expert(s) {lost} lost every copy with the failed "
            "rank(s) and ElasticEP has no full_weights to restore them from"
        )
    restored = [sorted(set(experts) & set(lost)) for experts in migration.experts_by_rank(new)]
    w13, w2, me = layer.w13, layer.w2, group.rank()
    if restored[me]:
        all_w13, all_w2 = full_weights(layer)
        w13 = torch.cat([w13, all_w13[restored[me]].to(w13)])
        w2 = torch.cat([w2, all_w2[restored[me]].to(w2)])
    survived = _survived(held, restored, layer.num_experts)
    transfer = migration.WeightTransfer(survived, new, w13, w2, group)
    transfer.run()
    copied = sum(dest == me for _, _, dest in transfer.transfers)
    return (*transfer.finish(w13, w2), copied, len(restored[me]))


def _survived(held: list[list[int]], restored: list[list[int]], experts: int) -> ExpertPlacement:
    """The placement the survivors hold before the transfer: each survivor's rows (held)
    then the rows it restored, one slot per row."""
    slot_rank, slot_local, slots_of = [], [], [[] for _ in range(experts)]
    for rank, rows in enumerate(zip(held, restored, strict=True)):
        for row, e in enumerate(rows[0] + rows[1]):
            slots_of[e].append(len(slot_rank))
            slot_rank.append(rank)
            slot_local.append(row)
    width = max(len(slots) for slots in slots_of)
    return ExpertPlacement(
        torch.tensor(slot_rank, dtype=torch.int32),
        torch.tensor(slot_local, dtype=torch.int32),
        len(held),
        torch.tensor(
            [slots + [-1] * (width - len(slots)) for slots in slots_of], dtype=torch.int32
        ),
    )

"""Where the experts of one layer live: physical slots on ranks, replicas, and the mapping
of each (token, choice) pair to one replica of its expert. Identical on every rank of the
expert-parallel group; the dispatch ops take its slot maps (the "expert map")."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from moe_ep.plan import LayerPlacement

__all__ = ["ExpertPlacement", "map_to_slots"]


@dataclass(frozen=True)
class ExpertPlacement:
    """Where the experts of one layer live, as physical slots: slot s (one copy of one
    expert's weights) is on rank slot_rank[s] as that rank's local expert number
    slot_local[s]; log2phy[e] lists the slots of logical expert e (-1 padded), so an expert
    may have several replicas. Ranks may host several slots or none. Without log2phy every
    expert has exactly one slot, slot e (P == E), the layout of the one-replica
    constructors.

    Dispatch takes physical slot ids (see map_to_slots); the slot maps are what the
    dispatch ops call the expert map."""

    slot_rank: torch.Tensor  # int32 [P]
    slot_local: torch.Tensor  # int32 [P]
    world_size: int
    log2phy: torch.Tensor | None = None  # int32 [E, R], -1 padded; None: arange(P) as [P, 1]

    def __post_init__(self) -> None:
        if self.log2phy is None:
            slots = torch.arange(self.num_slots, dtype=torch.int32, device=self.slot_rank.device)
            object.__setattr__(self, "log2phy", slots.view(-1, 1))
        self._validate()
        self.slots_are_experts  # noqa: B018  (read now, with the validation's, not in a step)

    def _validate(self) -> None:
        slots = self.num_slots
        if self.slot_local.shape != (slots,):
            raise ValueError(
                f"slot_local: expected shape ({slots},), got {tuple(self.slot_local.shape)}"
            )
        ranks, local = self.slot_rank.tolist(), self.slot_local.tolist()
        if any(not 0 <= r < self.world_size for r in ranks):
            raise ValueError(f"slot_rank: ranks must lie in [0, {self.world_size}), got {ranks}")
        # The layer indexes its local weights by slot_local: 0 .. n-1 on each rank.
        on_rank = [[] for _ in range(self.world_size)]
        for r, i in zip(ranks, local, strict=True):
            on_rank[r].append(i)
        if any(sorted(numbers) != list(range(len(numbers))) for numbers in on_rank):
            raise ValueError(
                f"slot_local: each rank's slots must be numbered 0 .. n-1, got {local}"
            )
        if self.log2phy.dim() != 2:
            raise ValueError(f"log2phy: expected [E, R], got shape {tuple(self.log2phy.shape)}")
        listed = [s for row in self.log2phy.tolist() for s in row if s != -1]
        if sorted(listed) != list(range(slots)):
            raise ValueError(f"log2phy: must list every slot in [0, {slots}) exactly once")
        uncovered = (self.replica_count == 0).nonzero().view(-1).tolist()
        if uncovered:
            raise ValueError(f"log2phy: expert(s) {uncovered} have no slot")

    @classmethod
    def from_ranks(cls, ranks: list[int], world_size: int) -> ExpertPlacement:
        """One slot per expert; local numbers follow expert order on each rank."""
        if any(not 0 <= r < world_size for r in ranks):
            raise ValueError(f"ranks must lie in [0, {world_size}), got {ranks}")
        return cls(
            torch.tensor(ranks, dtype=torch.int32),
            torch.tensor(_order_on_rank(ranks, world_size), dtype=torch.int32),
            world_size,
        )

    @classmethod
    def contiguous(cls, num_experts: int, world_size: int) -> ExpertPlacement:
        """Blocks of ceil(E / world) consecutive experts per rank; with E <= world, expert e
        on rank e (one expert per GPU) and the last world - E ranks host none."""
        per_rank = -(-num_experts // world_size)
        return cls.from_ranks([e // per_rank for e in range(num_experts)], world_size)

    @classmethod
    def from_plan(cls, layer: LayerPlacement, world_size: int) -> ExpertPlacement:
        """One MoE layer of a moe_ep.plan.Placement on an EP group: the GPU of a slot is its
        rank, its local number the order of the slots on that rank."""
        if layer.dense:
            raise ValueError(f"layer: layer {layer.layer} is dense, it has no expert slots")
        if len(layer.gpus) != len(layer.phy2log):
            raise ValueError(
                f"layer.gpus: expected one GPU per slot ({len(layer.phy2log)}), "
                f"got {len(layer.gpus)}"
            )
        if any(not 0 <= g < world_size for g in layer.gpus):
            raise ValueError(f"layer.gpus: GPUs must lie in [0, {world_size}), got {layer.gpus}")
        log2phy = torch.tensor(layer.padded_log2phy(), dtype=torch.int32)
        placement = cls(
            torch.tensor(layer.gpus, dtype=torch.int32),
            torch.tensor(_order_on_rank(layer.gpus, world_size), dtype=torch.int32),
            world_size,
            log2phy.view(len(layer.log2phy), -1),
        )
        if placement.phy2log.tolist() != list(layer.phy2log):
            raise ValueError("layer.phy2log: does not match layer.log2phy")
        return placement

    @property
    def num_experts(self) -> int:
        """E, the logical experts."""
        return self.log2phy.shape[0]

    @property
    def num_slots(self) -> int:
        """P, the physical slots (E plus the replicas)."""
        return self.slot_rank.numel()

    @property
    def has_replicas(self) -> bool:
        return self.num_slots != self.num_experts

    @property
    def replica_count(self) -> torch.Tensor:
        """int64 [E]: slots per logical expert."""
        return (self.log2phy >= 0).sum(dim=1)

    @property
    def phy2log(self) -> torch.Tensor:
        """int64 [P]: the logical expert of each slot."""
        valid = self.log2phy >= 0
        experts = torch.arange(self.num_experts, device=self.log2phy.device)
        owner = experts.view(-1, 1).expand_as(self.log2phy)[valid]
        return torch.empty_like(owner).index_put_((self.log2phy[valid].long(),), owner)

    # The slot maps under the names the dispatch ops (and one-replica callers) use.
    @property
    def expert_rank(self) -> torch.Tensor:
        return self.slot_rank

    @property
    def expert_local(self) -> torch.Tensor:
        return self.slot_local

    @cached_property
    def slots_are_experts(self) -> bool:
        """Slot e holds expert e for every e (the one-replica constructors' layout), so that
        logical ids are slot ids. Computed when the placement is made (a host read on a CUDA
        map, with those of its validation), so that no step reads it."""
        identity = torch.arange(self.num_slots, device=self.log2phy.device).view(-1, 1)
        return not self.has_replicas and bool(torch.equal(self.log2phy.long(), identity))

    @cached_property
    def num_local_experts(self) -> int:
        """The most slots any rank hosts (the receive-side slot count). Computed once per
        placement: on a CUDA map it is a device-to-host read, and every dispatch needs it."""
        return max(1, int(torch.bincount(self.slot_rank.long(), minlength=self.world_size).max()))

    def local_slots(self, rank: int) -> list[int]:
        """Physical ids of the slots on `rank`, in local order."""
        ids = (self.slot_rank == rank).nonzero().view(-1)
        return ids[self.slot_local[ids].argsort()].tolist()

    def local_experts(self, rank: int) -> list[int]:
        """Logical ids of the slots on `rank`, in local order (replicas included): the rows
        of the all-expert weights that this rank holds."""
        slots = torch.tensor(self.local_slots(rank), dtype=torch.long)
        return self.phy2log.cpu()[slots].tolist()

    def rank_loads(self, expert_loads: torch.Tensor) -> torch.Tensor:
        """float64 [world]: the load of each rank when expert e's load is shared evenly by
        its replicas (what map_to_slots achieves to within one token per source rank)."""
        loads = expert_loads.double().cpu()
        per_slot = (loads / self.replica_count.cpu())[self.phy2log.cpu()]
        out = torch.zeros(self.world_size, dtype=torch.float64)
        return out.index_add_(0, self.slot_rank.cpu().long(), per_slot)

    def to(self, device: torch.device | str) -> ExpertPlacement:
        return ExpertPlacement(
            self.slot_rank.to(device),
            self.slot_local.to(device),
            self.world_size,
            self.log2phy.to(device),
        )


def _order_on_rank(ranks: list[int], world_size: int) -> list[int]:
    """Local number of each slot: its position among the slots of the same rank."""
    seen = [0] * world_size
    local = []
    for r in ranks:
        local.append(seen[r])
        seen[r] += 1
    return local


def map_to_slots(topk_ids: torch.Tensor, placement: ExpertPlacement, rank: int) -> torch.Tensor:
    """Logical top-k ids [T, k] -> physical slot ids [T, k] of the same dtype.

    The j-th (token, choice) pair of this rank that picks expert e (in row-major order) goes
    to replica (j + rank) mod replica_count[e]: each replica gets within one pair of an even
    share of this rank's pairs, and the offset by rank spreads the remainders of different
    ranks over different replicas. Deterministic, no communication, no host sync. Replicas
    hold identical weights, so the choice of replica never changes the math of the layer.
    """
    if not placement.has_replicas:
        if placement.slots_are_experts:
            return topk_ids  # slot e is expert e
        # One slot per expert, numbered in another order (a plan's slots go by GPU).
        slots = placement.log2phy[:, 0].to(topk_ids.device)[topk_ids.long()]
        return slots.to(topk_ids.dtype)
    flat = topk_ids.reshape(-1).long()
    order = flat.argsort(stable=True)
    by_expert = flat[order]
    # scatter_add, not bincount: bincount sizes its output from the data (a host read on CUDA).
    counts = torch.zeros(placement.num_experts, dtype=torch.long, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    first = counts.cumsum(0) - counts  # where each expert's run starts in by_expert
    position = torch.empty_like(flat)
    position[order] = torch.arange(flat.numel(), device=flat.device) - first[by_expert]
    replicas = placement.replica_count.to(flat.device)[flat]
    replica = (position + rank) % replicas
    slots = placement.log2phy.to(flat.device)[flat, replica]
    return slots.view(topk_ids.shape).to(topk_ids.dtype)

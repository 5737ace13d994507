"""Runtime load balancing of an expert-parallel MoELayer: token counts per expert, replica
re-planning with weight migration, and an optional bounded gate bias.

    balancer = moe_ep.LoadBalancer(layer, window=32, threshold=1.25)
    for step ...:
        ids, weights = layer.route(x)
        balancer.observe(ids)          # all-reduce of E counts over the EP group
        y = layer.experts(x, ids, weights)
        balancer.maybe_rebalance()     # between steps: re-plan, migrate the moved slots

Every call is collective over the layer's group, and every decision is taken from
all-reduced integer counts and the deterministic planner, so all ranks decide alike without
further agreement.

Re-planning and replica routing never change the layer's math (replicas hold the same
weights). The gate bias does: it shifts which experts tokens choose (DeepSeek-V3's
auxiliary-loss-free balancing), so it is off unless bias_update_rate > 0.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moe_ep import expert_transfer, plan
from moe_ep.layer import MoELayer
from moe_ep.placement import ExpertPlacement

__all__ = ["LoadBalancer", "Migration", "migration_transfers"]


@dataclass(frozen=True)
class Migration:
    """One re-plan: the (expert, destination rank) copies that travelled (the planner's
    moves) and their bytes (summed over the group; a slot whose expert its new rank already
    held costs nothing)."""

    transfers: tuple[tuple[int, int, int], ...]  # (expert, source rank, destination rank)
    bytes: int
    imbalance_before: float
    imbalance_after: float


class LoadBalancer:
    """Balances one expert-parallel MoELayer at run time.

    Args:
        layer: the MoELayer (with a process group); its placement and local weights are
            replaced on re-planning.
        window: steps of counts kept; the loads are their sum.
        interval: re-plan every `interval` observed steps (0: no schedule).
        threshold: re-plan when imbalance() exceeds it (> 1; None: never), at most once per
            `window` steps so that the loads behind the decision are fresh.
        redundant_experts: replica slots beyond E in a new plan; -1 lets the planner fill one
            extra slot per rank (E > world) or one slot per rank (E <= world).
        max_moves: expert copies a re-plan may make beyond those a change of slot count
            forces (-1: no limit). The planner starts from the current placement and moves
            only slots whose move lowers the load, so fewer weights travel.
        gpus_per_node: ranks per node (default: one node); with several nodes a re-plan
            also swaps slots between nodes to lower the busiest node's load (within
            max_moves), never raising the busiest rank's.
        bias_update_rate: DeepSeek-V3-style update of layer.expert_bias after each observed
            step: bias[e] -= rate * sign(load[e] - mean load), clamped to [-max_bias,
            max_bias]. It CHANGES WHICH EXPERTS ARE CHOSEN (not the weights of a choice),
            so the layer's output changes too. 0 (default) leaves the bias alone.
        max_bias: the bound of the bias.
    """

    def __init__(
        self,
        layer: MoELayer,
        *,
        window: int = 32,
        interval: int = 0,
        threshold: float | None = 1.25,
        redundant_experts: int = -1,
        max_moves: int = -1,
        gpus_per_node: int | None = None,
        bias_update_rate: float = 0.0,
        max_bias: float = 0.05,
    ) -> None:
        if layer.group is None:
            raise ValueError("layer: the LoadBalancer needs an expert-parallel layer (group=...)")
        world = layer.group.size()
        if window < 1:
            raise ValueError(f"window: must be >= 1, got {window}")
        if interval < 0:
            raise ValueError(f"interval: must be >= 0 (0: no schedule), got {interval}")
        if threshold is not None and threshold <= 1.0:
            raise ValueError(f"threshold: max/mean load is >= 1, must be > 1, got {threshold}")
        gpus_per_node = gpus_per_node or world
        if gpus_per_node < 1 or world % gpus_per_node:
            raise ValueError(
                f"gpus_per_node: must divide the group size {world}, got {gpus_per_node}"
            )
        if max_moves < -1:
            raise ValueError(f"max_moves: must be >= 0, or -1 (no limit), got {max_moves}")
        if bias_update_rate < 0 or max_bias < 0:
            raise ValueError(
                f"bias_update_rate, max_bias: must be >= 0, got {bias_update_rate}, {max_bias}"
            )
        if bias_update_rate > 0 and layer.expert_bias is None:
            raise ValueError("bias_update_rate: the layer has no expert_bias (expert_bias=True)")
        self.layer = layer
        self.window, self.interval, self.threshold = window, interval, threshold
        self.redundant_experts, self.max_moves = redundant_experts, max_moves
        self.bias_update_rate, self.max_bias = bias_update_rate, max_bias
        self.cluster = plan.Cluster(
            num_nodes=world // gpus_per_node, gpus_per_node=gpus_per_node, gpu_memory_bytes=0
        )
        self._counts: deque[torch.Tensor] = deque(maxlen=window)
        self.steps = 0  # observed steps
        self._since_replan = 0
        self.migrations: list[Migration] = []

    @property
    def migrated_bytes(self) -> int:
        """Expert weight bytes moved between ranks by all re-plans so far (group total)."""
        return sum(m.bytes for m in self.migrations)

    @torch.no_grad()
    def observe(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """Counts this rank's logical top-k ids [T, k], sums them over the group (a
        collective) and returns the step's int64 [E] counts."""
        counts = torch.bincount(topk_ids.reshape(-1).long(), minlength=self.layer.num_experts)
        dist.all_reduce(counts, group=self.layer.group)
        self._counts.append(counts)
        self.steps += 1
        self._since_replan += 1
        if self.bias_update_rate > 0:
            bias = self.layer.expert_bias
            # Overloaded experts lose selection score, underloaded ones gain it.
            step = torch.sign(counts.double().mean() - counts.double()).to(bias)
            bias.add_(step, alpha=self.bias_update_rate).clamp_(-self.max_bias, self.max_bias)
        return counts

    def expert_loads(self) -> torch.Tensor:
        """int64 [E] (CPU): (token, expert) pairs per expert over the window, group total."""
        if not self._counts:
            return torch.zeros(self.layer.num_experts, dtype=torch.int64)
        return torch.stack(list(self._counts)).sum(0).cpu()

    def imbalance(self, placement: ExpertPlacement | None = None) -> float:
        """Max over mean rank load of the windowed loads under `placement` (default: the
        layer's), each replica taking an even share of its expert's load; 1.0 without load."""
        rank_loads = (placement or self.layer.placement).rank_loads(self.expert_loads())
        mean = float(rank_loads.mean())
        return float(rank_loads.max()) / mean if mean > 0 else 1.0

    def plan(self) -> ExpertPlacement:
        """A placement for the windowed loads (balanced policy), re-planned from the layer's
        current one: its slots stay on their ranks unless moving them lowers the load."""
        layer = self.layer
        expert_bytes = (layer.w13[0].numel() + layer.w2[0].numel()) * layer.w13.element_size()
        model = plan.one_layer(layer.num_experts, layer.top_k, expert_bytes)
        current = layer.placement
        previous = plan.LayerPlacement(
            layer=0,
            dense=False,
            phy2log=tuple(current.phy2log.tolist()),
            log2phy=tuple(tuple(s for s in row if s >= 0) for row in current.log2phy.tolist()),
            replica_count=tuple(current.replica_count.tolist()),
            gpus=tuple(current.slot_rank.tolist()),
        )
        planned = plan.plan(
            model,
            self.cluster,
            loads=[self.expert_loads().tolist()],
            policy="balanced",
            redundant_experts=self.redundant_experts,
            previous=[previous],
            max_moves=self.max_moves,
        ).layers[0]
        return ExpertPlacement.from_plan(planned, self.cluster.num_gpus)

    def maybe_rebalance(self) -> Migration | None:
        """Re-plans and migrates when the schedule or the threshold says so and the new plan
        lowers the imbalance; returns the Migration, or None. Collective; call it between
        steps on every rank."""
        due = self.interval > 0 and self._since_replan >= self.interval
        hot = (
            self.threshold is not None
            and self._since_replan >= self.window
            and self.imbalance() > self.threshold
        )
        if not (due or hot) or int(self.expert_loads().sum()) == 0:
            return None
        self._since_replan = 0
        new = self.plan()
        before, after = self.imbalance(), self.imbalance(new)
        if after >= before:
            return None  # not worth moving weights
        migration = self._migrate(new, before, after)
        self.migrations.append(migration)
        return migration

    @torch.no_grad()
    def _migrate(self, new: ExpertPlacement, before: float, after: float) -> Migration:
        """Moves the weights of the slots each rank newly hosts from a rank that holds the
        expert now (point-to-point, batched), then swaps the layer's placement and weights."""
        layer, group = self.layer, self.layer.group
        me = group.rank()
        old = layer.placement
        old_local = old.local_experts(me)
        transfers = migration_transfers(old, new)
        sends: dict[int, list[int]] = {}
        recvs: dict[int, list[int]] = {}
        for e, source, dest in transfers:
            if source == me:
                sends.setdefault(dest, []).append(e)
            if dest == me:
                recvs.setdefault(source, []).append(e)
        w13, w2 = layer.w13, layer.w2
        row_of = {e: i for i, e in enumerate(old_local)}  # expert -> local row now
        received = expert_transfer.exchange(w13, w2, row_of, sends, recvs, group)
        local = new.local_experts(me)
        layer.set_placement(new, *expert_transfer.assemble(w13, w2, row_of, received, local))
        row_bytes = (w13[0].numel() + w2[0].numel()) * w13.element_size()
        return Migration(tuple(transfers), len(transfers) * row_bytes, before, after)


def migration_transfers(old: ExpertPlacement, new: ExpertPlacement) -> list[tuple[int, int, int]]:
    """The copies that turn `old` into `new`: (expert, source rank, destination rank) for
    each expert that a rank hosts in `new` but not in `old`, by destination then expert. A
    replicated expert's copies come from its holders in turn, spreading the sends."""
    world = old.world_size
    old_local = [old.local_experts(r) for r in range(world)]
    holders: dict[int, list[int]] = {}
    for r in range(world):
        for e in old_local[r]:
            holders.setdefault(e, []).append(r)
    transfers = []
    for r in range(world):
        for e in sorted(set(new.local_experts(r)) - set(old_local[r])):
            transfers.append((e, holders[e][r % len(holders[e])], r))
    return transfers

"""Runtime load balancing of an expert-parallel MoELayer: token counts kept on the device,
replica re-planning, weight migration in the background, and an optional bounded gate bias.

    balancer = moe_ep.LoadBalancer(layer, window=32, threshold=1.25)
    for step ...:
        y = layer(x)          # the dispatch adds each local slot's entries to layer.slot_counts
        balancer.step()       # between steps, on every rank

A step costs the balancer nothing but a Python counter: the counts are added on the device by
the dispatch, from the expert offsets it computes anyway (no collective, no host read). Every
`window` steps they are all-reduced (one collective, one host read) and a re-plan is
considered. A re-plan's weights then travel in a background thread (moe_ep.migration) while
the layer keeps serving with the old placement; once every rank holds its new rows, all ranks
switch at the same step boundary, decided by a one-element vote per step while the migration
lasts; a migration not live by its deadline is abandoned on every rank (the old placement
stays), counted and logged. Every decision comes from all-reduced integer counts, the
deterministic planner and the votes, so all ranks decide alike.

Re-planning and replica routing never change the layer's math (replicas hold the same
weights). The gate bias does: it shifts which experts tokens choose (DeepSeek-V3's
auxiliary-loss-free balancing), so it is off unless bias_update_rate > 0.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from moe_ep import deadline, debug, plan
from moe_ep.layer import MoELayer
from moe_ep.migration import ABANDON, READY, WORKING, SwitchVote, WeightTransfer
from moe_ep.placement import ExpertPlacement

__all__ = ["LoadBalancer", "Migration"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Migration:
    """One re-plan's migration: the (expert, source rank, destination rank) copies (the
    planner's moves) and their bytes (group total; a slot whose expert its new rank already
    held costs nothing), the imbalance of the window behind it before and after, the step
    boundaries at which it started and went live (or was abandoned), and this rank's spare
    memory for it (arriving rows, rebuilt weights when its slot count changed, one round's
    staging)."""

    transfers: tuple[tuple[int, int, int], ...]
    bytes: int
    imbalance_before: float
    imbalance_after: float
    started_step: int
    ended_step: int
    live: bool
    spare_bytes: int


@dataclass
class _InFlight:
    transfer: WeightTransfer
    before: float
    after: float
    started_step: int
    started_time: float


class LoadBalancer:
    """Balances one expert-parallel MoELayer at run time; call step() after every step of
    the layer, on every rank of its group.

    Args:
        layer: the MoELayer (with a process group); its placement and local weights are
            replaced when a migration goes live. The balancer sets layer.slot_counts.
        window: steps whose counts are all-reduced together and behind each decision.
        interval: re-plan every `interval` steps (checked at window ends; 0: no schedule).
        threshold: re-plan when imbalance() of a window exceeds it (> 1; None: never).
        redundant_experts: replica slots beyond E in a new plan; -1 lets the planner fill one
            extra slot per rank (E > world) or one slot per rank (E <= world).
        max_moves: expert copies a re-plan may make beyond those a change of slot count
            forces (-1: no limit). The planner starts from the current placement and moves
            only slots whose move lowers the load, so fewer weights travel (and fewer spare
            rows are needed).
        gpus_per_node: ranks per node (default: one node); with several nodes a re-plan
            also swaps slots between nodes to lower the busiest node's load (within
            max_moves), never raising the busiest rank's.
        bias_update_rate: DeepSeek-V3-style update of layer.expert_bias at the end of each
            window: bias[e] -= rate * sign(load[e] - mean load), clamped to [-max_bias,
            max_bias]. It CHANGES WHICH EXPERTS ARE CHOSEN (not the weights of a choice),
            so the layer's output changes too. 0 (default) leaves the bias alone.
        max_bias: the bound of the bias.
        background: migrate in a background thread while the layer serves (default); False
            migrates at the window's end on the calling thread, serving waiting for it.
        piece_bytes: the most bytes one transfer round moves between two ranks.
        rounds_per_step: transfer rounds per serving step (None: unpaced); see
            moe_ep.migration.WeightTransfer.
        deadline_steps, deadline_s: a migration not live within this many steps or seconds
            after it started is abandoned on every rank; deadline_s (None: the layer's
            deadline, see moe_ep.deadline) is also the timeout of the transfer's and the
            vote's process groups, so a round stuck on a peer ends by then. The window's
            all-reduce has the layer's deadline; a failed one, or a failed vote, raises
            moe_ep.deadline.CollectiveFailure from step().
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
        background: bool = True,
        piece_bytes: int = 4 << 20,
        rounds_per_step: int | None = None,
        deadline_steps: int = 256,
        deadline_s: float | None = None,
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
        if piece_bytes < 1:
            raise ValueError(f"piece_bytes: must be >= 1, got {piece_bytes}")
        if rounds_per_step is not None and rounds_per_step < 1:
            raise ValueError(f"rounds_per_step: must be >= 1 or None, got {rounds_per_step}")
        if deadline_s is None:
            deadline_s = layer.deadline or deadline.default()
        if deadline_steps < 1 or deadline_s <= 0:
            raise ValueError(
                f"deadline_steps, deadline_s: must be >= 1 and > 0, got {deadline_steps}, "
                f"{deadline_s}"
            )
        self.layer = layer
        self.window, self.interval, self.threshold = window, interval, threshold
        self.redundant_experts, self.max_moves = redundant_experts, max_moves
        self.bias_update_rate, self.max_bias = bias_update_rate, max_bias
        self.background, self.piece_bytes = background, piece_bytes
        self.rounds_per_step = rounds_per_step
        self.deadline_steps, self.deadline_s = deadline_steps, deadline_s
        self.cluster = plan.Cluster(
            num_nodes=world // gpus_per_node, gpus_per_node=gpus_per_node, gpu_memory_bytes=0
        )
        self.steps = 0
        self.migrations: list[Migration] = []  # live and abandoned, in order
        self._window_steps = 0
        self._last_replan = 0
        self._loads = torch.zeros(layer.num_experts, dtype=torch.int64)
        self._use_placement(layer.placement.to("cpu"))
        self._ranks = dist.get_process_group_ranks(layer.group)
        # The groups are made now, out of the serving path; a fresh transfer group when a
        # migration starts after an abandoned one (whose rounds may be pending on the old).
        self._vote = SwitchVote(self._new_group("gloo"), layer.group) if background else None
        self._transfer_group = (
            self._new_group(dist.get_backend(layer.group)) if background else None
        )
        self._retired_groups: list[dist.ProcessGroup] = []  # kept: freeing one may block
        self._in_flight: _InFlight | None = None
        self._unwinding: WeightTransfer | None = None  # the last abandoned transfer

    @property
    def migrating(self) -> bool:
        """A migration is in flight (the layer serves with the old placement meanwhile)."""
        return self._in_flight is not None

    @property
    def migrated_bytes(self) -> int:
        """Expert weight bytes moved between ranks by the migrations that went live (group
        total)."""
        return sum(m.bytes for m in self.migrations if m.live)

    @property
    def abandoned(self) -> int:
        """Migrations given up at their deadline (or on a transfer error)."""
        return sum(not m.live for m in self.migrations)

    @torch.no_grad()
    def step(self) -> Migration | None:
        """Ends a step of the layer; collective over its group (every rank calls it at every
        step). Returns the Migration that went live or was abandoned at this boundary, else
        None. Between window ends and migrations it does nothing on any device."""
        self.steps += 1
        if self._in_flight is not None:
            with deadline.guard(self.layer.group, self.layer.name, self.layer.deadline):
                return self._advance()
        self._window_steps += 1
        if self._window_steps < self.window:
            return None
        self._window_steps = 0
        return self._consider()

    def expert_loads(self) -> torch.Tensor:
        """int64 [E] (CPU): (token, expert) pairs per expert in the last window, group total."""
        return self._loads

    def imbalance(self, placement: ExpertPlacement | None = None) -> float:
        """Max over mean rank load of the last window under `placement` (default: the
        layer's), each replica taking an even share of its expert's load; 1.0 without load."""
        rank_loads = (placement or self._placement).rank_loads(self._loads)
        mean = float(rank_loads.mean())
        return float(rank_loads.max()) / mean if mean > 0 else 1.0

    def plan(self) -> ExpertPlacement:
        """A placement for the last window's loads (balanced policy), re-planned from the
        layer's current one: its slots stay on their ranks unless moving them lowers the
        load."""
        layer, current = self.layer, self._placement
        expert_bytes = (layer.w13[0].numel() + layer.w2[0].numel()) * layer.w13.element_size()
        model = plan.one_layer(layer.num_experts, layer.top_k, expert_bytes)
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
            loads=[self._loads.tolist()],
            policy="balanced",
            redundant_experts=self.redundant_experts,
            previous=[previous],
            max_moves=self.max_moves,
        ).layers[0]
        return ExpertPlacement.from_plan(planned, self.cluster.num_gpus)

    # Window ends: counts, decision, start.

    def _consider(self) -> Migration | None:
        loads, unwinding = self._reduce_counts()
        self._loads = loads
        if self.bias_update_rate > 0:
            bias = self.layer.expert_bias
            # Overloaded experts lose selection score, underloaded ones gain it.
            change = torch.sign(loads.double().mean() - loads.double()).to(bias)
            bias.add_(change, alpha=self.bias_update_rate).clamp_(-self.max_bias, self.max_bias)
        due = self.interval > 0 and self.steps - self._last_replan >= self.interval
        hot = self.threshold is not None and self.imbalance() > self.threshold
        if not (due or hot) or int(loads.sum()) == 0:
            return None
        if unwinding:  # an abandoned transfer still exits somewhere: its memory is not free
            _log.info("moe_ep: re-plan at step %d skipped: a transfer is unwinding", self.steps)
            return None
        self._last_replan = self.steps
        new = self.plan()
        before, after = self.imbalance(), self.imbalance(new)
        if after >= before:
            return None  # not worth moving weights
        return self._start(new, before, after)

    def _reduce_counts(self) -> tuple[torch.Tensor, bool]:
        """The window's counts per expert over the group, and whether any rank's abandoned
        transfer still runs; one all-reduce and one host read. Restarts the counts."""
        layer = self.layer
        counts = layer.slot_counts
        total = counts.new_zeros(self._placement.num_slots + 1)
        total.index_copy_(0, self._local_slots, counts)
        total[-1:].fill_(int(self._unwinding is not None and self._unwinding.running))
        seconds = timedelta(seconds=layer.deadline or deadline.default())
        with deadline.guard(layer.group, layer.name, layer.deadline):
            work = layer.group.allreduce([total], timeout=seconds)
            deadline.wait(work, "the balancer's window all-reduce", layer.group)
        host = debug.to_host(total)
        counts.zero_()
        loads = torch.zeros(layer.num_experts, dtype=torch.int64)
        return loads.index_add_(0, self._placement.phy2log, host[:-1]), bool(host[-1])

    def _start(self, new: ExpertPlacement, before: float, after: float) -> Migration | None:
        layer = self.layer
        if self.background and self._transfer_group is None:
            self._transfer_group = self._new_group(dist.get_backend(layer.group))
        transfer = WeightTransfer(
            self._placement,
            new,
            layer.w13,
            layer.w2,
            self._transfer_group if self.background else layer.group,
            piece_bytes=self.piece_bytes,
            rounds_per_step=self.rounds_per_step,
        )
        flight = _InFlight(transfer, before, after, self.steps, time.monotonic())
        if not self.background:  # serving waits for the whole transfer
            transfer.run()
            return self._go_live(flight)
        transfer.start()
        self._in_flight = flight
        self._vote.cast(self._my_vote())
        return None

    # Migration in flight: one vote per boundary, read at the next.

    def _advance(self) -> Migration | None:
        flight = self._in_flight
        outcome = self._vote.outcome()
        if outcome == READY:
            return self._go_live(flight)
        if outcome == ABANDON:
            return self._abandon(flight)
        flight.transfer.on_step()
        self._vote.cast(self._my_vote())
        return None

    def _my_vote(self) -> int:
        flight = self._in_flight
        late = (
            self.steps - flight.started_step >= self.deadline_steps
            or time.monotonic() - flight.started_time >= self.deadline_s
        )
        if flight.transfer.failed or late:
            return ABANDON
        return READY if flight.transfer.ready else WORKING

    def _go_live(self, flight: _InFlight) -> Migration:
        placement, w13, w2 = flight.transfer.finish(self.layer.w13, self.layer.w2)
        self.layer.set_placement(placement, w13, w2)  # restarts layer.slot_counts
        self._use_placement(placement)
        return self._ended(flight, live=True)

    def _abandon(self, flight: _InFlight) -> Migration:
        transfer = flight.transfer
        transfer.cancel()
        self._retired_groups.append(self._transfer_group)
        self._transfer_group, self._unwinding = None, transfer
        self.layer.slot_counts.zero_()  # the next window starts now
        if transfer.error is not None:
            reason = f"its transfer failed: {transfer.error}"
        else:
            reason = "ready, another rank was not" if transfer.ready else "its transfer not done"
        _log.warning(
            "moe_ep: migration started at step %d abandoned at step %d (deadline %d steps, "
            "%.1f s; this rank: %s): the old placement stays",
            flight.started_step,
            self.steps,
            self.deadline_steps,
            self.deadline_s,
            reason,
        )
        return self._ended(flight, live=False)

    def _ended(self, flight: _InFlight, live: bool) -> Migration:
        transfer = flight.transfer
        migration = Migration(
            tuple(transfer.transfers),
            len(transfer.transfers) * transfer.row_bytes,
            flight.before,
            flight.after,
            flight.started_step,
            self.steps,
            live,
            transfer.spare_bytes,
        )
        self.migrations.append(migration)
        self._in_flight, self._window_steps = None, 0
        return migration

    def _use_placement(self, placement: ExpertPlacement) -> None:
        """A CPU copy of the layer's placement (planning reads it on the host) and the slots
        of this rank's counts, in row order."""
        self._placement = placement
        slots = placement.local_slots(self.layer.group.rank())
        device = self.layer.w13.device
        self._local_slots = torch.tensor(slots, dtype=torch.long, device=device)
        if self.layer.slot_counts is None or self.layer.slot_counts.numel() != len(slots):
            self.layer.slot_counts = torch.zeros(len(slots), dtype=torch.int64, device=device)

    def _new_group(self, backend: str) -> dist.ProcessGroup:
        return dist.new_group(
            self._ranks,
            backend=backend,
            timeout=timedelta(seconds=self.deadline_s),
            use_local_synchronization=True,
        )

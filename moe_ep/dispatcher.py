"""Token dispatcher for expert parallelism: typed wrappers
over torch.ops.moe_ep.dispatch_layout / dispatch / combine with their fake kernels.

A token travels once to each rank that hosts at least one of its k experts (token
batching); the receiving rank expands it to its local experts, reduces the expert outputs
with the routing weights and sends back one row per (token, rank).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

import moe_ep._C
from moe_ep import debug
from moe_ep.placement import ExpertPlacement, map_to_slots

__all__ = [
    # Re-exported: their home until moe_ep.placement took them (2026-11-30).
    "ExpertPlacement",
    "map_to_slots",
    "DispatchLayout",
    "Dispatched",
    "CapacityDispatched",
    "DispatchOverflow",
    "dispatch_layout",
    "dispatch",
    "dispatch_chunks",
    "dispatch_capacity",
    "check_status",
    "combine",
]


@dataclass(frozen=True)
class DispatchLayout:
    """What a dispatch sends, computed without communicating."""

    send_counts: torch.Tensor  # int64 [world]: rows per destination rank
    entry_counts: torch.Tensor  # int64 [world]: (token, choice) pairs per destination rank
    send_token: torch.Tensor  # int64 [S]: source token of each row, by rank then token
    send_local_ids: torch.Tensor  # int32 [S, W]: receiver-local expert ids, -1 padded
    send_choice: torch.Tensor  # int64 [S, W]: the choice behind each slot, -1 padded
    token_slot: torch.Tensor  # int32 [T, k]

    @property
    def rows_sent(self) -> int:
        return self.send_token.numel()

    @property
    def rows_saved(self) -> int:
        """Rows that token batching does not send: (token, choice) pairs minus rows."""
        return self.token_slot.numel() - self.rows_sent

    def bytes_saved(self, hidden: int, dtype: torch.dtype) -> int:
        return self.rows_saved * hidden * torch.finfo(dtype).bits // 8


@dataclass(frozen=True)
class Dispatched:
    """The result of dispatch: rows for the local experts plus what combine needs."""

    x_sorted: torch.Tensor  # [V, H] received (row, local expert) entries, grouped by expert
    expert_offsets: torch.Tensor  # int64 [L+1], on x's device
    recv_row_of: torch.Tensor  # int32 [R, W]
    recv_weights: torch.Tensor  # float32 [R, W]
    recv_counts: torch.Tensor  # int64 [world] (CPU)
    send_counts: torch.Tensor  # int64 [world] (CPU)
    token_slot: torch.Tensor  # int32 [T, k]


class DispatchOverflow(RuntimeError):
    """A fixed-capacity dispatch left (token, rank) pairs unsent; every rank raises it."""

    def __init__(self, pairs: int, capacity: int):
        super().__init__(
            f"moe_ep: fixed-capacity dispatch overflowed: {pairs} (token, rank) pair(s) over "
            f"the capacity of {capacity} rows per rank were not sent"
        )
        self.pairs = pairs


@dataclass(frozen=True)
class CapacityDispatched:
    """The result of a fixed-capacity dispatch. All shapes depend only on (T, k, world,
    capacity), never on the routing, so the step can be captured in a CUDA graph; the
    entries that arrived are grouped at the front of x_sorted, expert_offsets[L] of them,
    and the experts compute only those."""

    x_sorted: torch.Tensor  # [world*capacity*W, H], valid up to expert_offsets[L]
    expert_offsets: torch.Tensor  # int64 [L+1], on x's device
    recv_row_of: torch.Tensor  # int32 [world*capacity, W]
    recv_weights: torch.Tensor  # float32 [world*capacity, W]
    token_slot: torch.Tensor  # int32 [T, k]
    status: torch.Tensor  # int32 [world, 4]: per source: overflow, config, misuse, map
    capacity: int

    def check(self) -> None:
        """Raises DispatchOverflow (or a RuntimeError naming the argument or the
        disagreement) identically on every rank: one host read."""
        check_status([self.status], self.capacity)


# The fixed-capacity status columns (core::StatusField).
_OVERFLOW, _CONFIG, _ERRORS, _MAP = range(4)


def check_status(statuses: list[torch.Tensor], capacity: int) -> None:
    """Checks the statuses ([world, 4] each) of fixed-capacity dispatches, with one host read
    for all of them; raises the same error on every rank (each rank holds every source's
    status): misuse first, then a configuration or expert map that differs between ranks,
    then the pairs left out (DispatchOverflow)."""
    if not statuses:
        return
    values = debug.to_host(torch.stack(statuses)).long()
    for status in values:
        for rank, errors in enumerate(status[:, _ERRORS].tolist()):
            if errors:
                what = moe_ep._C.describe_dispatch_errors(errors)
                raise RuntimeError(f"moe_ep: dispatch: rank {rank}'s arguments are wrong: {what}")
        for column, what in (
            (_CONFIG, "dispatch configuration (a rank changed it after the handshake)"),
            (_MAP, "expert map (arguments 'expert_rank' and 'expert_local', the placement)"),
        ):
            if status[:, column].unique().numel() > 1:
                raise RuntimeError(f"moe_ep: dispatch: ranks disagree on the {what}")
    pairs = int(values[:, :, _OVERFLOW].sum())
    if pairs > 0:
        raise DispatchOverflow(pairs, capacity)


def _group_name(group: dist.ProcessGroup | str | None) -> str:
    if isinstance(group, str):
        return group
    return (group or dist.group.WORLD).group_name


def dispatch_layout(topk_ids: torch.Tensor, placement: ExpertPlacement) -> DispatchLayout:
    """The send plan of a dispatch (counts, order, batching), without communication."""
    return DispatchLayout(
        *torch.ops.moe_ep.dispatch_layout(
            topk_ids,
            placement.expert_rank,
            placement.expert_local,
            placement.world_size,
            placement.num_local_experts,
        )
    )


@dataclass(frozen=True)
class PendingDispatch:
    """A dispatch whose transfers are in flight; wait() completes it."""

    _finish: object  # () -> Dispatched | CapacityDispatched

    def wait(self) -> Dispatched | CapacityDispatched:
        return self._finish()


@dataclass(frozen=True)
class PendingCombine:
    """A combine whose return transfer is in flight; wait() gives the [T, H] output."""

    returned: torch.Tensor
    token_slot: torch.Tensor

    def wait(self) -> torch.Tensor:
        return torch.ops.moe_ep.combine_finish(self.returned, self.token_slot)


def dispatch_chunks(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    placement: ExpertPlacement,
    num_chunks: int,
    group: dist.ProcessGroup | str | None = None,
) -> list[PendingDispatch]:
    """Exact-size dispatch of x split into num_chunks chunks (tensor_split) with one header
    exchange and one host read for all of them; every chunk's rows are in flight when this
    returns. wait() each in order."""
    flat = torch.ops.moe_ep.dispatch_start(
        x,
        topk_ids,
        topk_weights,
        placement.expert_rank,
        placement.expert_local,
        placement.num_local_experts,
        num_chunks,
        _group_name(group),
    )
    local = placement.num_local_experts

    def pending(x_recv, meta_recv, recv_counts, send_counts, token_slot, entries):
        def finish() -> Dispatched:
            grouped = torch.ops.moe_ep.dispatch_finish(x_recv, meta_recv, entries, local)
            return Dispatched(*grouped, recv_counts, send_counts, token_slot)

        return PendingDispatch(finish)

    return [pending(*flat[6 * c : 6 * c + 6]) for c in range(num_chunks)]


def dispatch(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    placement: ExpertPlacement,
    group: dist.ProcessGroup | str | None = None,
    async_op: bool = False,
) -> Dispatched | PendingDispatch:
    """Exact-size dispatch: one header exchange (the counts, and every rank's check of every
    other's arguments), then the rows and their routing metadata.

    Args:
        x: [T, H] tokens of this rank (T may be 0).
        topk_ids: int32/int64 [T, k] expert (slot) ids, see map_to_slots.
        topk_weights: [T, k] routing weights.
        placement: the expert map (tensors on x's device), identical on every rank.
        group: the process group (or its name); default: the world.
        async_op: return a PendingDispatch once the header is exchanged and the rows are
            on their way, instead of waiting for them.
    """
    if async_op:
        return dispatch_chunks(x, topk_ids, topk_weights, placement, 1, group)[0]
    return Dispatched(
        *torch.ops.moe_ep.dispatch(
            x,
            topk_ids,
            topk_weights,
            placement.expert_rank,
            placement.expert_local,
            placement.num_local_experts,
            _group_name(group),
        )
    )


def dispatch_capacity(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    placement: ExpertPlacement,
    capacity: int,
    group: dist.ProcessGroup | str | None = None,
    async_op: bool = False,
) -> CapacityDispatched | PendingDispatch:
    """Fixed-capacity dispatch: `capacity` rows to every rank, nothing read on the host.

    A token goes at most once to each rank, so capacity >= the largest T of any rank means
    no overflow. Call check() (or check_status for several) before trusting the result:
    pairs over the capacity are reported, never dropped silently. The first call of a
    configuration on a group agrees on it with every rank (a handshake, one host read);
    later calls exchange nothing more. async_op as for dispatch.
    """
    args = (
        x,
        topk_ids,
        topk_weights,
        placement.expert_rank,
        placement.expert_local,
        placement.num_local_experts,
        capacity,
        _group_name(group),
    )
    if async_op:
        x_recv, meta_recv, token_slot = torch.ops.moe_ep.dispatch_capacity_start(*args)
        local = placement.num_local_experts

        def finish() -> CapacityDispatched:
            *grouped, status = torch.ops.moe_ep.dispatch_capacity_finish(
                x_recv, meta_recv, local, capacity
            )
            return CapacityDispatched(*grouped, token_slot, status, capacity=capacity)

        return PendingDispatch(finish)
    return CapacityDispatched(*torch.ops.moe_ep.dispatch_capacity(*args), capacity=capacity)


def combine(
    y: torch.Tensor,
    dispatched: Dispatched | CapacityDispatched,
    group: dist.ProcessGroup | str | None = None,
    async_op: bool = False,
) -> torch.Tensor | PendingCombine:
    """Weighted sum of each token's expert outputs, back on its rank in its order: [T, H].

    y holds the expert outputs in the row order dispatch produced (x_sorted's).
    async_op: return a PendingCombine while the rows travel back.
    """
    if isinstance(dispatched, CapacityDispatched):
        world = dispatched.status.shape[0]
        recv_counts = send_counts = torch.full((world,), dispatched.capacity, dtype=torch.int64)
    else:
        recv_counts, send_counts = dispatched.recv_counts, dispatched.send_counts
    returned = torch.ops.moe_ep.combine_start(
        y,
        dispatched.recv_row_of,
        dispatched.recv_weights,
        recv_counts,
        send_counts,
        _group_name(group),
    )
    pending = PendingCombine(returned, dispatched.token_slot)
    return pending if async_op else pending.wait()


def moe_forward(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    placement: ExpertPlacement,
    w13: torch.Tensor,
    w2: torch.Tensor,
    activation: str = "silu",
    num_chunks: int = 1,
    group: dist.ProcessGroup | str | None = None,
    slot_counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """One expert-parallel MoE layer after routing, as one op: exact-size dispatch, this
    rank's experts (w13 [L, 2F, H], w2 [L, H, F]), combine; in num_chunks chunks whose
    dispatches are all issued first, so that communication overlaps the experts. topk_ids
    are slot ids (see map_to_slots). slot_counts (int64 [L], on x's device), when given,
    accumulates the (token, choice) entries each local slot received. Returns [T, H]."""
    return torch.ops.moe_ep.moe_forward(
        x,
        topk_ids,
        topk_weights,
        placement.expert_rank,
        placement.expert_local,
        placement.num_local_experts,
        w13,
        w2,
        activation,
        num_chunks,
        _group_name(group),
        slot_counts,
    )


@torch.library.register_fake("moe_ep::dispatch_layout")
def _dispatch_layout_fake(topk_ids, expert_rank, expert_local, world_size, num_local_experts):
    rows = torch.library.get_ctx().new_dynamic_size()
    width = min(topk_ids.shape[1], num_local_experts)
    counts = topk_ids.new_empty((world_size,), dtype=torch.int64)
    return (
        counts,
        counts.new_empty((world_size,)),
        topk_ids.new_empty((rows,), dtype=torch.int64),
        topk_ids.new_empty((rows, width), dtype=torch.int32),
        topk_ids.new_empty((rows, width), dtype=torch.int64),
        topk_ids.new_empty(tuple(topk_ids.shape), dtype=torch.int32),
    )


@torch.library.register_fake("moe_ep::dispatch")
def _dispatch_fake(
    x, topk_ids, topk_weights, expert_rank, expert_local, num_local_experts, group_name
):
    ctx = torch.library.get_ctx()
    entries, rows, world = ctx.new_dynamic_size(), ctx.new_dynamic_size(), ctx.new_dynamic_size()
    width = min(topk_ids.shape[1], num_local_experts)
    return (
        x.new_empty((entries, x.shape[1])),
        x.new_empty((num_local_experts + 1,), dtype=torch.int64),
        x.new_empty((rows, width), dtype=torch.int32),
        x.new_empty((rows, width), dtype=torch.float32),
        torch.empty((world,), dtype=torch.int64),
        torch.empty((world,), dtype=torch.int64),
        x.new_empty(tuple(topk_ids.shape), dtype=torch.int32),
    )


def _capacity_shapes(group_name, capacity, topk_ids, num_local_experts):
    world = dist.distributed_c10d._resolve_process_group(group_name).size()
    return world * capacity, min(topk_ids.shape[1], num_local_experts)


@torch.library.register_fake("moe_ep::dispatch_capacity")
def _dispatch_capacity_fake(
    x, topk_ids, topk_weights, expert_rank, expert_local, num_local_experts, capacity, group_name
):
    rows, width = _capacity_shapes(group_name, capacity, topk_ids, num_local_experts)
    return (
        x.new_empty((rows * width, x.shape[1])),
        x.new_empty((num_local_experts + 1,), dtype=torch.int64),
        x.new_empty((rows, width), dtype=torch.int32),
        x.new_empty((rows, width), dtype=torch.float32),
        x.new_empty(tuple(topk_ids.shape), dtype=torch.int32),
        x.new_empty((rows // capacity, 4), dtype=torch.int32),
    )


@torch.library.register_fake("moe_ep::dispatch_start")
def _dispatch_start_fake(
    x, topk_ids, topk_weights, expert_rank, expert_local, num_local_experts, num_chunks, group_name
):
    ctx = torch.library.get_ctx()
    width = min(topk_ids.shape[1], num_local_experts)
    world = dist.distributed_c10d._resolve_process_group(group_name).size()
    out = []
    for ids in topk_ids.tensor_split(num_chunks):
        rows = ctx.new_dynamic_size()
        out += [
            x.new_empty((rows, x.shape[1])),
            x.new_empty((rows, 2 * width), dtype=torch.int32),
            torch.empty((world,), dtype=torch.int64),
            torch.empty((world,), dtype=torch.int64),
            x.new_empty(tuple(ids.shape), dtype=torch.int32),
            torch.empty((1,), dtype=torch.int64),
        ]
    return out


@torch.library.register_fake("moe_ep::dispatch_finish")
def _dispatch_finish_fake(x_recv, meta_recv, recv_entries, num_local_experts):
    entries = torch.library.get_ctx().new_dynamic_size()
    width = meta_recv.shape[1] // 2
    return (
        x_recv.new_empty((entries, x_recv.shape[1])),
        x_recv.new_empty((num_local_experts + 1,), dtype=torch.int64),
        x_recv.new_empty((x_recv.shape[0], width), dtype=torch.int32),
        x_recv.new_empty((x_recv.shape[0], width), dtype=torch.float32),
    )


@torch.library.register_fake("moe_ep::dispatch_capacity_start")
def _dispatch_capacity_start_fake(
    x, topk_ids, topk_weights, expert_rank, expert_local, num_local_experts, capacity, group_name
):
    rows, width = _capacity_shapes(group_name, capacity, topk_ids, num_local_experts)
    return (
        x.new_empty((rows, x.shape[1])),
        x.new_empty((rows, 2 * width + 4), dtype=torch.int32),
        x.new_empty(tuple(topk_ids.shape), dtype=torch.int32),
    )


@torch.library.register_fake("moe_ep::dispatch_capacity_finish")
def _dispatch_capacity_finish_fake(x_recv, meta_recv, num_local_experts, capacity):
    rows = x_recv.shape[0]
    width = (meta_recv.shape[1] - 4) // 2
    return (
        x_recv.new_empty((rows * width, x_recv.shape[1])),
        x_recv.new_empty((num_local_experts + 1,), dtype=torch.int64),
        x_recv.new_empty((rows, width), dtype=torch.int32),
        x_recv.new_empty((rows, width), dtype=torch.float32),
        x_recv.new_empty((rows // capacity, 4), dtype=torch.int32),
    )


@torch.library.register_fake("moe_ep::combine_start")
def _combine_start_fake(y, recv_row_of, recv_weights, recv_counts, send_counts, group_name):
    rows = torch.library.get_ctx().new_dynamic_size()
    return y.new_empty((rows, y.shape[1]))


@torch.library.register_fake("moe_ep::combine_finish")
def _combine_finish_fake(returned, token_slot):
    return returned.new_empty((token_slot.shape[0], returned.shape[1]))


@torch.library.register_fake("moe_ep::moe_forward")
def _moe_forward_fake(
    x,
    topk_ids,
    topk_weights,
    expert_rank,
    expert_local,
    num_local_experts,
    w13,
    w2,
    activation,
    num_chunks,
    group_name,
    slot_counts=None,
):
    return x.new_empty(x.shape)


@torch.library.register_fake("moe_ep::combine")
def _combine_fake(
    y_sorted, recv_row_of, recv_weights, recv_counts, send_counts, token_slot, group_name
):
    return y_sorted.new_empty((token_slot.shape[0], y_sorted.shape[1]))

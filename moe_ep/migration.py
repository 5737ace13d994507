"""Moving expert weights between the ranks of an expert-parallel group while the layer keeps
serving with its old placement, and switching every rank to the new placement together.

    transfer = WeightTransfer(old, new, layer.w13, layer.w2, transfer_group)
    transfer.start()                       # a background thread moves the weights
    vote = SwitchVote(vote_group)
    at every step boundary, on every rank (moe_ep.LoadBalancer does this):
        outcome = vote.outcome()           # the previous boundary's vote, the same everywhere
        if outcome == READY: layer.set_placement(*transfer.finish(layer.w13, layer.w2))
        elif outcome == ABANDON: transfer.cancel()      # the old placement stays
        else: transfer.on_step(); vote.cast(READY if transfer.ready else WORKING)

The weights travel as bytes in rounds of all-to-all (at most piece_bytes between any two
ranks per round, paced by serving steps if asked), into spare rows that hold the experts
arriving on this rank and nothing else (or into the new weights when the rank's slot count
changes and they must be rebuilt anyway). Why collectives and not point-to-point sends: a
Gloo send or receive can neither be polled nor given up, while a collective's future
completes (or fails at the group's timeout), so a thread waiting on it can be cancelled at
any time. Why a process group
of its own: collectives on one group must be issued in the same order on every rank, and the
background thread's rounds would interleave with the serving thread's all-to-alls in an order
that differs from rank to rank (a wrong match or a deadlock); a group of its own also has its
own connections (Gloo) or communicator and stream (NCCL), so a transfer never queues behind a
step's dispatch or the reverse. The vote is a one-element all-reduce on another small Gloo
group, cast by the serving thread at a boundary and read at the next one: the serving step in
between synchronises the ranks, so reading it waits for no transfer.

The survivors' re-plan after a rank's death (moe_ep.elastic) moves its weights with a
WeightTransfer too, run at once on the survivors' new group (no serving meanwhile, no vote).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence

import torch
import torch.distributed as dist

from moe_ep import deadline
from moe_ep.placement import ExpertPlacement

__all__ = [
    "ABANDON",
    "READY",
    "WORKING",
    "SwitchVote",
    "WeightTransfer",
    "experts_by_rank",
    "keep_rows",
    "migration_transfers",
    "slots_by_rank",
]

# Votes, all-reduced with MIN: one rank giving up outvotes every other; all must be ready.
ABANDON, WORKING, READY = -1, 0, 1


def slots_by_rank(placement: ExpertPlacement) -> list[list[int]]:
    """Every rank's slots in local order (ExpertPlacement.local_slots for all ranks at once,
    from three host lists: a re-plan's bookkeeping stays off the per-rank tensor ops)."""
    ranks, rows = placement.slot_rank.tolist(), placement.slot_local.tolist()
    by_rank: list[list[int]] = [[] for _ in range(placement.world_size)]
    for _, _, s in sorted(zip(ranks, rows, range(len(ranks)), strict=True)):
        by_rank[ranks[s]].append(s)
    return by_rank


def experts_by_rank(placement: ExpertPlacement) -> list[list[int]]:
    """Every rank's logical experts in local (row) order: ExpertPlacement.local_experts for
    all ranks at once."""
    phy2log = placement.phy2log.tolist()
    return [[phy2log[s] for s in slots] for slots in slots_by_rank(placement)]


def migration_transfers(old: ExpertPlacement, new: ExpertPlacement) -> list[tuple[int, int, int]]:
    """The copies that turn `old` into `new`: (expert, source rank, destination rank) for
    each expert that a rank hosts in `new` but not in `old`, by destination then expert. A
    replicated expert's copies come from its holders in turn, spreading the sends."""
    old_local, new_local = experts_by_rank(old), experts_by_rank(new)
    holders: dict[int, list[int]] = {}
    for r, experts in enumerate(old_local):
        for e in experts:
            holders.setdefault(e, []).append(r)
    transfers = []
    for r, experts in enumerate(new_local):
        for e in sorted(set(experts) - set(old_local[r])):
            transfers.append((e, holders[e][r % len(holders[e])], r))
    return transfers


def keep_rows(old: ExpertPlacement, new: ExpertPlacement) -> ExpertPlacement:
    """`new` with each rank's local numbers (the rows of its weights) chosen so that an expert
    the rank keeps stays in its row; the other slots take the free rows in order. When a
    rank's slot count does not change, the arriving experts take the rows of those leaving,
    and the switch copies only them, in place. Which row holds a slot changes nothing in the
    layer's math."""
    slot_local = new.slot_local.tolist()
    phy2log = new.phy2log.tolist()
    for held, slots in zip(experts_by_rank(old), slots_by_rank(new), strict=True):
        old_rows: dict[int, list[int]] = {}
        for row, e in enumerate(held):
            old_rows.setdefault(e, []).append(row)
        taken: dict[int, int] = {}
        for s in slots:
            rows = old_rows.get(phy2log[s], [])
            row = next((x for x in rows if x < len(slots)), None)
            if row is not None:
                rows.remove(row)
                taken[s] = row
        free = iter(sorted(set(range(len(slots))) - set(taken.values())))
        for s in slots:
            slot_local[s] = taken[s] if s in taken else next(free)
    return ExpertPlacement(
        new.slot_rank.clone(),
        torch.tensor(slot_local, dtype=new.slot_local.dtype),
        new.world_size,
        new.log2phy.clone(),
    )


class _Cancelled(Exception):
    pass


class WeightTransfer:
    """This rank's part of one migration from `old` to `new` placement (identical on every
    rank of `group`): the expert rows it sends, the rows it receives into spare memory, and
    the switch to the new weights.

    Args:
        old, new: the placements (CPU tensors); `new` is renumbered with keep_rows (see
            `placement`).
        w13, w2: this rank's serving weights under `old` ([L, 2F, H], [L, H, F]); only read
            until finish().
        group: the process group of the transfer, with the layer's ranks in the same order
            and used by nothing else while the transfer runs (see the module's docstring).
        piece_bytes: the most bytes one round moves between two ranks.
        rounds_per_step: rounds allowed per serving step (granted by on_step()), so that a
            step's own communication is not starved; None: as fast as the rounds go. It may
            differ between ranks: every round is collective, so the slowest paces all.

    Memory (spare_bytes): the rows of the experts arriving on this rank, or, when the rank's
    slot count changes, its whole new weights instead (the arrivals land there; the rest is
    copied off the serving path); and the staging of one round (at most piece_bytes per
    peer, each way).
    """

    def __init__(
        self,
        old: ExpertPlacement,
        new: ExpertPlacement,
        w13: torch.Tensor,
        w2: torch.Tensor,
        group: dist.ProcessGroup,
        *,
        piece_bytes: int = 4 << 20,
        rounds_per_step: int | None = None,
    ) -> None:
        if piece_bytes < 1:
            raise ValueError(f"piece_bytes: must be >= 1, got {piece_bytes}")
        if rounds_per_step is not None and rounds_per_step < 1:
            raise ValueError(f"rounds_per_step: must be >= 1 or None, got {rounds_per_step}")
        if group.size() != old.world_size or new.world_size != old.world_size:
            raise ValueError(
                f"group: has {group.size()} ranks, the placements {old.world_size} and "
                f"{new.world_size}"
            )
        me, world = group.rank(), group.size()
        self.group, self.piece_bytes, self.rounds_per_step = group, piece_bytes, rounds_per_step
        self.transfers = migration_transfers(old, new)
        self.placement = keep_rows(old, new)
        self._w13, self._w2 = w13, w2
        self._w13_bytes = w13[0].numel() * w13.element_size()
        self.row_bytes = self._w13_bytes + w2[0].numel() * w2.element_size()
        old_row: dict[int, int] = {}
        for row, e in enumerate(experts_by_rank(old)[me]):
            old_row.setdefault(e, row)
        self._old_row = old_row
        pairs: dict[tuple[int, int], list[int]] = {}
        for e, source, dest in self.transfers:
            pairs.setdefault((source, dest), []).append(e)
        # Every rank runs the same number of rounds: the longest stream's pieces.
        self.rounds = max(
            (-(-len(es) * self.row_bytes // piece_bytes) for es in pairs.values()), default=0
        )
        # The (me -> peer) streams: each expert's w13 bytes then its w2 bytes.
        self._send_parts = [
            [part for e in pairs.get((me, p), []) for part in self._row_parts(old_row[e])]
            for p in range(world)
        ]
        self._new_experts = experts_by_rank(self.placement)[me]  # in row order
        self.resized = len(self._new_experts) != w13.shape[0]
        arrivals = [e for p in range(world) for e in pairs.get((p, me), [])]
        self._rebuilt, self.spare, self._arrival = self._landing(arrivals)
        self._recv_parts = [
            [part for e in pairs.get((p, me), []) for part in self._arrival[e]]
            for p in range(world)
        ]
        self._recv_lengths = [len(pairs.get((p, me), [])) * self.row_bytes for p in range(world)]
        self.spare_bytes = self._spare_bytes(me, pairs)

        self._cond = threading.Condition()
        self._credit = rounds_per_step or 0
        self._cancelled = False
        self._state = WORKING
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None
        # On CUDA the rounds run on a stream of their own, beside the serving stream, after
        # what the serving stream has queued so far (a previous switch's copies, say).
        self._stream = self._queued = None
        if w13.device.type == "cuda":
            self._stream, self._queued = torch.cuda.Stream(w13.device), torch.cuda.Event()
            self._queued.record()

    @property
    def ready(self) -> bool:
        """Every round done and the new weights in place to switch to."""
        return self._state == READY

    @property
    def failed(self) -> bool:
        """Cancelled, or a round raised (see error)."""
        return self._state == ABANDON

    @property
    def running(self) -> bool:
        """The background thread has not exited yet (it may be unwinding a cancellation)."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Runs the rounds in a background thread (daemon: it never holds the process up)."""
        self._thread = threading.Thread(target=self._run, name="moe_ep-migration", daemon=True)
        self._thread.start()

    def run(self) -> None:
        """Runs the rounds on the calling thread, unpaced (the synchronous migration)."""
        self.rounds_per_step = None
        self._run()
        if self.error is not None:
            raise self.error

    def on_step(self) -> None:
        """A serving step ended: grants the next rounds_per_step rounds."""
        if self.rounds_per_step is not None:
            with self._cond:
                self._credit += self.rounds_per_step
                self._cond.notify_all()

    def cancel(self) -> None:
        """Gives up without waiting: the thread exits at its next wait; the spare rows and any
        round still in flight on the group are left to it (use a fresh group next time)."""
        with self._cond:
            self._cancelled = True
            self._cond.notify_all()

    def finish(
        self, w13: torch.Tensor, w2: torch.Tensor
    ) -> tuple[ExpertPlacement, torch.Tensor, torch.Tensor]:
        """After every rank is ready, at a step boundary: (placement, w13, w2) for
        MoELayer.set_placement. With an unchanged slot count the arrivals are copied into the
        rows of the experts leaving, in place (w13, w2 are the serving weights); otherwise the
        new weights were built by the transfer."""
        if not self.ready:
            raise RuntimeError("moe_ep: migration: finish() before the transfer is ready")
        if self._rebuilt is not None:
            if self._stream is not None:  # made on the transfer stream, used on this one
                for t in self._rebuilt:
                    t.record_stream(torch.cuda.current_stream(t.device))
            return self.placement, *self._rebuilt
        self._fill(w13, w2, in_place=True)
        return self.placement, w13, w2

    # The transfer itself.

    def _landing(self, arrivals: list[int]) -> tuple:
        """Where the (peer -> me) streams land, by source then expert: into the rebuilt
        weights when the slot count changes (allocated now, filled off the serving path),
        else into spare rows that finish() copies in place. Returns (rebuilt weights or None,
        spare rows, each arriving expert's row as [w13 bytes, w2 bytes])."""
        w13, w2, rows = self._w13, self._w2, len(self._new_experts)
        if self.resized:
            rebuilt = (w13.new_empty(rows, *w13.shape[1:]), w2.new_empty(rows, *w2.shape[1:]))
            spare = torch.empty(0, dtype=torch.uint8, device=w13.device)
            return (
                rebuilt,
                spare,
                {e: [_bytes(t[self._new_experts.index(e)]) for t in rebuilt] for e in arrivals},
            )
        spare = torch.empty(len(arrivals), self.row_bytes, dtype=torch.uint8, device=w13.device)
        split = self._w13_bytes
        return (
            None,
            spare,
            {e: [spare[j, :split], spare[j, split:]] for j, e in enumerate(arrivals)},
        )

    def _row_parts(self, row: int) -> list[torch.Tensor]:
        return [_bytes(self._w13[row]), _bytes(self._w2[row])]

    def _spare_bytes(self, me: int, pairs: dict) -> int:
        staging = sum(
            min(self.piece_bytes, len(es) * self.row_bytes)
            for (source, dest), es in pairs.items()
            if me in (source, dest) and source != dest
        )
        rebuilt = sum(t.nbytes for t in self._rebuilt) if self._rebuilt is not None else 0
        return self.spare.nbytes + rebuilt + staging

    def _run(self) -> None:
        try:
            stream = self._stream
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                if stream is not None:
                    stream.wait_event(self._queued)
                for r in range(self.rounds):
                    self._take_credit()
                    self._round(r)
                if self._rebuilt is not None:
                    self._fill(*self._rebuilt, in_place=False)
                if self._stream is not None:
                    self._stream.synchronize()
            self._state = READY
        except _Cancelled:
            self._state = ABANDON
        except Exception as error:  # reported through the vote, raised by run()
            self.error, self._state = error, ABANDON

    def _take_credit(self) -> None:
        with self._cond:
            if self.rounds_per_step is not None:
                self._cond.wait_for(lambda: self._credit > 0 or self._cancelled)
                self._credit -= 1
            if self._cancelled:
                raise _Cancelled

    def _round(self, r: int) -> None:
        start, end = r * self.piece_bytes, (r + 1) * self.piece_bytes
        send_parts, send_splits, recv_splits = [], [], []
        for parts, length in zip(self._send_parts, self._recv_lengths, strict=True):
            piece = _slices(parts, start, end)
            send_parts += piece
            send_splits.append(sum(p.numel() for p in piece))
            recv_splits.append(max(0, min(end, length) - start))
        device = self.spare.device
        send = (
            torch.cat(send_parts)
            if send_parts
            else torch.empty(0, dtype=torch.uint8, device=device)
        )
        recv = torch.empty(sum(recv_splits), dtype=torch.uint8, device=device)
        work = dist.all_to_all_single(
            recv, send, recv_splits, send_splits, group=self.group, async_op=True
        )
        self._wait(work)
        offset = 0
        for parts in self._recv_parts:
            for piece in _slices(parts, start, end):
                piece.copy_(recv[offset : offset + piece.numel()])
                offset += piece.numel()

    def _wait(self, work: dist.Work) -> None:
        future, cond = work.get_future(), self._cond

        # The callback holds the condition only: it runs and is dropped on the group's own
        # thread, which must never hold the last reference to the group (freeing a Gloo
        # group joins that thread).
        def wake(_: torch.futures.Future) -> None:
            with cond:
                cond.notify_all()

        future.add_done_callback(wake)
        with self._cond:
            self._cond.wait_for(lambda: future.done() or self._cancelled)
            if self._cancelled:
                raise _Cancelled
        work.wait()  # raises the collective's error, if any

    def _fill(self, w13: torch.Tensor, w2: torch.Tensor, in_place: bool) -> None:
        """Writes every new row whose content is not there yet: an arrival from where it
        landed, an expert this rank held from its old row (old rows of kept experts are never
        overwritten: keep_rows left them where they were)."""
        for row, e in enumerate(self._new_experts):
            if e in self._arrival:
                source = self._arrival[e]
                if source[0].data_ptr() != _bytes(w13[row]).data_ptr():
                    _bytes(w13[row]).copy_(source[0])
                    _bytes(w2[row]).copy_(source[1])
            elif not (in_place and self._old_row[e] == row):
                w13[row].copy_(self._w13[self._old_row[e]])
                w2[row].copy_(self._w2[self._old_row[e]])


class SwitchVote:
    """The decision of a step boundary, identical on every rank: each rank casts its vote
    (ABANDON, WORKING or READY) at one boundary, asynchronously, and every rank reads the
    minimum at the next one. Only the serving thread casts, in step order, so the group sees
    the same sequence on every rank; the serving step between cast and read synchronises the
    ranks, so the read waits for no transfer. group: a Gloo group of the layer's ranks (the
    vote is a CPU tensor: no device read); watch: the group whose roll call a failed vote
    joins (moe_ep.deadline.wait)."""

    def __init__(self, group: dist.ProcessGroup, watch: dist.ProcessGroup | None = None) -> None:
        self.group, self.watch = group, watch
        self._pending: tuple[torch.Tensor, dist.Work] | None = None

    def cast(self, vote: int) -> None:
        value = torch.tensor([vote], dtype=torch.int64)
        work = dist.all_reduce(value, op=dist.ReduceOp.MIN, group=self.group, async_op=True)
        self._pending = (value, work)

    def outcome(self) -> int | None:
        """The vote cast at the previous boundary (None if none was cast)."""
        if self._pending is None:
            return None
        (value, work), self._pending = self._pending, None
        deadline.wait(work, "the migration's switch vote", self.watch)
        return int(value)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's memory as a 1-D uint8 view."""
    return t.reshape(-1).view(torch.uint8)


def _slices(parts: Sequence[torch.Tensor], start: int, end: int) -> list[torch.Tensor]:
    """The pieces of the concatenation of the 1-D `parts` between byte start and end."""
    out, offset = [], 0
    for part in parts:
        low, high = max(start, offset), min(end, offset + part.numel())
        if low < high:
            out.append(part[low - offset : high - offset])
        offset += part.numel()
        if offset >= end:
            break
    return out

"""Who is still there, after a collective failed: a roll call through the process group's store.

A collective that failed or passed its deadline says nothing about who failed (Gloo reports
a closed connection or its own timeout; NCCL's watchdog only the timeout). The store (a
FileStore, or the TCPStore of torchrun's agent) outlives the ranks, so after a failure, and
only then, every rank still running signs in under the group's next incident, waits a grace
period for the others, and proposes the ranks it saw; the first proposal written wins
(compare_set) and every rank adopts it. So the survivors agree on the failed ranks without a
collective, and the normal path pays nothing.

A rank that signs in after the decision (one that stalled past the grace period) finds
itself left out: it must not rejoin, and RankExcluded tells it so.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass

import torch.distributed as dist

__all__ = ["RollCall", "RankExcluded", "roll_call", "called"]

# Incidents per group name on this rank: every rank of a group meets the same failures in the
# same order, so the n-th failure of a group has the same key everywhere.
_incidents: defaultdict[str, int] = defaultdict(int)

_POLL_SECONDS = 0.01


class RankExcluded(RuntimeError):
    """The survivors decided without this rank (it answered after the grace period)."""


@dataclass(frozen=True)
class RollCall:
    """The agreed outcome: group ranks that answered and those that did not."""

    group_name: str
    incident: int
    answered: tuple[int, ...]
    missing: tuple[int, ...]


def called(group: dist.ProcessGroup) -> bool:
    """Another rank of the group has started the roll call this rank has not taken yet: a
    collective failed there. A rank waiting in a collective whose own peers are alive (a ring
    all-reduce) sees no failure until its deadline, later than the grace period: it polls
    this instead, and joins the roll call in time."""
    store = dist.distributed_c10d._get_process_group_store(group)
    return store.check([f"moe_ep/roll_call/{_incidents[group.group_name]}/called"])


def roll_call(group: dist.ProcessGroup, grace: float) -> RollCall:
    """Signs this rank in for the group's next incident, waits up to `grace` seconds for the
    other ranks, and returns the decision every rank of the incident adopts. Raises
    RankExcluded when the decision was taken without this rank, RuntimeError when the store
    cannot be reached (it lived in a process that failed)."""
    name = group.group_name
    incident = _incidents[name]
    _incidents[name] += 1
    me, world = group.rank(), group.size()
    prefix = f"moe_ep/roll_call/{incident}"
    try:
        store = dist.distributed_c10d._get_process_group_store(group)
        store.set(f"{prefix}/called", "1")
        store.set(f"{prefix}/here/{me}", "1")
        keys = [f"{prefix}/here/{r}" for r in range(world)]
        until = time.monotonic() + grace
        while not store.check(keys) and time.monotonic() < until:
            time.sleep(_POLL_SECONDS)
        seen = [r for r, key in enumerate(keys) if store.check([key])]
        decided = json.loads(store.compare_set(f"{prefix}/decision", "", json.dumps(seen)))
    except RuntimeError as error:
        raise RuntimeError(
            f"moe_ep: roll call of group {name}: the process group's store cannot be reached "
            f"({error}); it must outlive the ranks (a FileStore, or torchrun's agent store)"
        ) from error
    if me not in decided:
        raise RankExcluded(
            f"moe_ep: rank {me} of group {name} answered the roll call after the survivors "
            f"decided without it (grace {grace:g} s): it must not rejoin the group"
        )
    missing = tuple(r for r in range(world) if r not in decided)
    return RollCall(name, incident, tuple(decided), missing)

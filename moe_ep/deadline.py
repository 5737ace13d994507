"""Deadlines for the collectives moe_ep issues, and the error a failed one raises.

Every all-to-all that moe_ep issues carries the deadline as its c10d timeout: on Gloo the
collective itself gives up then, on NCCL the watchdog does (docs/reliability.md says what each
covers). A failure (a peer whose process died, a peer that stopped calling) raises on every
rank that waits, within the deadline; moe_ep.MoELayer then takes a roll call through the
group's store (moe_ep.roll_call: only after a failure, nothing per step) and raises
CollectiveFailure naming the operation, the layer and the ranks that did not answer.

    moe_ep.deadline.set_default(10.0)          # seconds; or MOE_EP_DEADLINE=10 at start
    layer = moe_ep.MoELayer(..., deadline=5.0)  # this layer's collectives
    with moe_ep.deadline.guard(group, "my step", 2.0):  # direct dispatcher calls
        ...
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator

import torch.distributed as dist

from moe_ep import _C
from moe_ep.roll_call import called, roll_call

__all__ = ["CollectiveFailure", "default", "set_default", "grace", "set_grace", "guard", "wait"]

# What the C++ ops raise (csrc/ops/deadline.cpp) when a collective fails.
_POLL_SECONDS = 0.002  # a wait polled for the roll call: only the balancer's, once a window

_FAILED = re.compile(r"moe_ep: collective failed in (.+?) \((deadline|the group)")


class CollectiveFailure(dist.DistBackendError):
    """A collective of an expert-parallel step failed or passed its deadline. The group cannot
    be used again: rebuild it from the survivors (moe_ep.elastic) or exit.

    Attributes: operation, layer, group_name, missing (group ranks that did not answer the
    roll call), answered, incident (the roll call's number on this group)."""

    def __init__(self, operation: str, layer: str, group_name: str, call, cause: str):
        self.operation, self.layer, self.group_name = operation, layer, group_name
        self.missing, self.answered, self.incident = call.missing, call.answered, call.incident
        who = (
            f"rank(s) {list(call.missing)} did not answer"
            if call.missing
            else "every rank answered the roll call (the failure was not a lost rank)"
        )
        super().__init__(
            f"moe_ep: layer {layer!r}: {operation} failed on group {group_name}: {who}. "
            f"Cause: {cause}"
        )


def default() -> float:
    """The default deadline in seconds (60, or MOE_EP_DEADLINE from the environment)."""
    return _C.default_deadline()


def set_default(seconds: float) -> None:
    """Sets the deadline of every collective moe_ep issues without a layer's own."""
    if not seconds > 0:
        raise ValueError(f"seconds: the deadline must be > 0, got {seconds}")
    _C.set_default_deadline(float(seconds))


_grace: float | None = None  # set_grace's value; None: from the deadline


def grace(deadline: float) -> float:
    """How long the survivors of a failure wait for each other in the roll call: long enough
    for ranks that reach the failure a little later (their step started later), short
    against the deadline: 10% of it, within [1, 10] s, unless set_grace chose."""
    return _grace if _grace is not None else min(10.0, max(1.0, 0.1 * deadline))


def set_grace(seconds: float | None) -> None:
    """Sets the roll call's grace period (None: 10% of the deadline, within [1, 10] s). It
    is most of the time from a rank's death to the survivors' error (and recovery): shorter
    recovers sooner, but a survivor that reaches the failure later than that is left out."""
    global _grace
    if seconds is not None and not seconds > 0:
        raise ValueError(f"seconds: the grace period must be > 0, got {seconds}")
    _grace = seconds


def wait(work: dist.Work, operation: str, watch: dist.ProcessGroup | None = None) -> None:
    """Waits for a torch.distributed collective that moe_ep started with the deadline as its
    timeout (its group's or its own); a failure raises the error that guard turns into a
    CollectiveFailure naming `operation` (what csrc/ops/deadline.cpp raises for the ops).
    With `watch` (the group guard takes the roll call of), a roll call that another rank
    started ends the wait too: a ring all-reduce whose own peers are alive would otherwise
    wait for its deadline, past the roll call's grace period."""
    future = work.get_future()
    if watch is not None:
        while not future.done():
            if called(watch):
                raise dist.DistBackendError(
                    f"moe_ep: collective failed in {operation} (the group cannot be used "
                    "again): another rank's collective failed (it called the roll)"
                )
            time.sleep(_POLL_SECONDS)
    try:
        work.wait()
    except RuntimeError as error:
        raise dist.DistBackendError(
            f"moe_ep: collective failed in {operation} (the group cannot be used again): {error}"
        ) from None


@contextlib.contextmanager
def guard(group: dist.ProcessGroup, layer: str, deadline: float | None = None) -> Iterator[None]:
    """Runs moe_ep collectives on `group` under `deadline` (None: the default) on this
    thread; a failed one becomes a CollectiveFailure after a roll call of the group."""
    if deadline is not None and not deadline > 0:
        raise ValueError(f"deadline: must be > 0 seconds, got {deadline}")
    previous = _C.set_thread_deadline(deadline or 0.0)
    try:
        yield
    except dist.DistBackendError as error:
        found = _FAILED.search(str(error))
        if isinstance(error, CollectiveFailure) or found is None:
            raise
        call = roll_call(group, grace(deadline or default()))
        raise CollectiveFailure(found.group(1), layer, group.group_name, call, str(error)) from None
    finally:
        _C.set_thread_deadline(previous)

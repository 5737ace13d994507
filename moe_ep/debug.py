"""Counters that the tests and benchmarks assert, so that the CPU CI guards the GPU design.

host_reads(): device-to-host reads made by moe_ep since import. Each is a place where host
code needs a value that a kernel computed; on CUDA it drains the stream and leaves the GPU
idle until the host launches again, and it cannot happen inside a CUDA graph. The same places
count on CPU tensors, so a budget asserted on the CPU holds on the GPU. One-time handshakes
(the first call of a new expert-parallel configuration) count too: measure steady-state
steps after a warm-up step.

op_counts(fn): the operators a call runs, from the torch profiler (on a GPU, kernels are what
launch; on the CPU, operators are the closest count).
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Iterator

import torch

from moe_ep import _C

__all__ = ["host_reads", "count_host_read", "to_host", "counting_host_reads", "op_counts"]


def host_reads() -> int:
    """Device-to-host reads made by moe_ep (C++ and Python) since import."""
    return _C.host_reads()


def count_host_read() -> None:
    """Counts one host read made by moe_ep's Python code."""
    _C.count_host_read()


def to_host(t: torch.Tensor) -> torch.Tensor:
    """t on the CPU, counted as one host read."""
    count_host_read()
    return t.cpu()


class _Reads:
    def __init__(self) -> None:
        self._start = host_reads()
        self._end: int | None = None

    @property
    def count(self) -> int:
        return (host_reads() if self._end is None else self._end) - self._start


@contextlib.contextmanager
def counting_host_reads() -> Iterator[_Reads]:
    """with counting_host_reads() as reads: ...; reads.count is the reads made inside."""
    reads = _Reads()
    try:
        yield reads
    finally:
        reads._end = host_reads()


def op_counts(fn: Callable[[], object]) -> collections.Counter[str]:
    """The operators that do work in fn(), by name, from the torch profiler: the lowest
    operator events that are not allocations, views or no-op conversions (which launch
    nothing), so that on a GPU each is roughly one kernel or collective. moe_ep's own layout
    kernels record themselves (moe_ep::<kernel>), on the CPU as on CUDA, so the count is the
    same on both."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.events() if _is_operator(e.name)]
    busy_parents = set()  # events with a working operator below them
    for event in events:
        if event.name.split("::")[1] in _NO_WORK:
            continue
        parent = event.cpu_parent
        while parent is not None:
            if _is_operator(parent.name):
                busy_parents.add(id(parent))
            parent = parent.cpu_parent
    return collections.Counter(
        e.name
        for e in events
        if id(e) not in busy_parents and e.name.split("::")[1] not in _NO_WORK
    )


# Operators that launch nothing: allocations, views, and (as leaves) no-op conversions.
_NO_WORK = {
    "empty", "empty_strided", "empty_like", "view", "_unsafe_view", "reshape", "select",
    "narrow", "slice", "as_strided", "unsqueeze", "squeeze", "expand", "t", "transpose",
    "permute", "alias", "detach", "lift_fresh", "resolve_conj", "resolve_neg", "split",
    "tensor_split", "unbind", "chunk", "to", "contiguous", "item", "_local_scalar_dense",
    "set_", "record_stream",
}  # fmt: skip


def _is_operator(name: str) -> bool:
    return name.startswith(("aten::", "moe_ep::", "c10d::"))

"""The micro-batch pipeline of expert parallelism: communication of some chunks travels while
the experts of another compute, within one MoE layer and across a stack of them.

One layer (run_layer): every chunk's dispatch is started first (in exact mode with one header
and one host read for all chunks), then each chunk's experts run and its combine starts while
later chunks' rows arrive, then the combines are collected:

    dispatch c0 c1 c2 | experts c0, combine c0 | experts c1, combine c1 | ... | collect
    ──rows of c0..c2 in flight──▶    ◀──c0 back──          ◀──c1 back──

Issuing every dispatch before any expert matters on CUDA: c10d orders a NCCL collective after
the work already queued on the stream it is issued from, so a dispatch issued after an expert
GEMM would wait for it.

A stack of layers (stream_layers): each (layer, chunk) is a task in three phases, yielding
where its transfers are in flight (1: route, start the dispatch; 2: wait for the rows, run the
experts, start the combine, run the caller's overlap_fn; 3: wait for the combined rows). A
scheduler advances the tasks round-robin, at most `depth` chunks of a layer at a time, and
when chunk c leaves layer l it enters layer l+1, so layer l+1 starts on the first chunk while
layer l still works on later ones (the seeds' layer-to-layer streaming). A chunk's routing is
only known when it arrives, so in exact mode every (layer, chunk) reads its own header: use the
fixed-capacity mode (no host read) to stream deep stacks.

The order of collectives depends only on the number of layers, chunks and the depth, never on
the data, so every rank issues the same sequence even when their token counts differ or are
zero. On CPU/Gloo, Gloo's threads move the rows while the main thread computes; on CUDA/NCCL
the transfers run on NCCL's streams while the experts run on the current stream.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator, Sequence
from typing import Any, Protocol

import torch

from moe_ep import deadline
from moe_ep.dispatcher import DispatchOverflow, check_status

OverlapFn = Callable[[int, torch.Tensor], "torch.Tensor | None"]


class ExpertParallelPhases(Protocol):
    """The phases of one expert-parallel layer that the schedule interleaves (MoELayer has
    them); the pipeline needs nothing else of a layer."""

    dispatch_mode: str
    on_overflow: str
    capacity: int | None
    dispatch_status: list[torch.Tensor]
    group: Any  # the process group
    name: str  # in errors
    deadline: float | None  # of its collectives (None: the default)

    def route_slots(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def start_dispatches(
        self,
        x: torch.Tensor,
        slots: torch.Tensor,
        topk_weights: torch.Tensor,
        num_chunks: int,
        mode: str | None = None,
    ) -> list[Any]: ...

    def finish_dispatch(self, pending: Any) -> Any: ...

    def local_experts(self, received: Any) -> torch.Tensor: ...

    def start_combine(self, y: torch.Tensor, received: Any) -> Any: ...

    def check_dispatch_status(self) -> None: ...


def run_layer(
    layer: ExpertParallelPhases,
    x: torch.Tensor,
    slots: torch.Tensor,
    topk_weights: torch.Tensor,
    num_chunks: int,
    overlap_fn: OverlapFn | None = None,
    mode: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One expert-parallel layer over routed tokens x [T, H] (slot ids and weights [T, k]) in
    num_chunks overlapped chunks. Returns the routed experts' output [T, H] and the sum of
    what overlap_fn(chunk, x_chunk) returned per chunk (None when nothing)."""
    if num_chunks < 1:
        raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
    pending = layer.start_dispatches(x, slots, topk_weights, num_chunks, mode)
    returning, extras = [], []
    for chunk, (x_chunk, started) in enumerate(
        zip(x.tensor_split(num_chunks), pending, strict=True)
    ):
        received = layer.finish_dispatch(started)
        returning.append(layer.start_combine(layer.local_experts(received), received))
        extras.append(overlap_fn(chunk, x_chunk) if overlap_fn is not None else None)
    routed = torch.cat([r.wait() for r in returning])
    if all(e is None for e in extras):
        return routed, None
    parts = [
        e if e is not None else torch.zeros_like(c)
        for e, c in zip(extras, routed.tensor_split(num_chunks), strict=True)
    ]
    return routed, torch.cat(parts)


def moe_forward(
    layer: ExpertParallelPhases,
    x: torch.Tensor,
    num_chunks: int = 2,
    overlap_fn: OverlapFn | None = None,
) -> torch.Tensor:
    """One expert-parallel layer over x [T, H] (routed here) in num_chunks overlapped
    chunks; fixed-capacity statuses are handled as the layer's on_overflow says."""
    slots, topk_weights = layer.route_slots(x)
    routed, extra = run_layer(layer, x, slots, topk_weights, num_chunks, overlap_fn)
    return _checked([layer], x, routed if extra is None else routed + extra, overlap_fn)


def _chunk_task(
    layer: ExpertParallelPhases, x: torch.Tensor, chunk: int, overlap_fn: OverlapFn | None
) -> Generator[None, None, torch.Tensor]:
    # Each phase under the layer's own deadline: other layers' phases run between the yields.
    with deadline.guard(layer.group, layer.name, layer.deadline):
        slots, topk_weights = layer.route_slots(x)
        (pending,) = layer.start_dispatches(x, slots, topk_weights, 1)
    yield
    with deadline.guard(layer.group, layer.name, layer.deadline):
        received = layer.finish_dispatch(pending)
        returning = layer.start_combine(layer.local_experts(received), received)
        extra = overlap_fn(chunk, x) if overlap_fn is not None else None
    yield
    with deadline.guard(layer.group, layer.name, layer.deadline):
        out = returning.wait()
    return out if extra is None else out + extra


def stream_layers(
    layers: Sequence[ExpertParallelPhases],
    x: torch.Tensor,
    num_chunks: int,
    overlap_fn: OverlapFn | None = None,
    depth: int | None = None,
) -> torch.Tensor:
    """x [T, H] through the expert-parallel layers in order, chunk by chunk.

    Chunks are contiguous and nearly equal (some empty when T < num_chunks); every rank must
    pass the same layers, num_chunks and depth. overlap_fn(chunk, x_chunk) is called in each
    layer while that chunk's combine travels; a tensor it returns is added to the output.
    Fixed-capacity layers keep their statuses as their on_overflow says; those that check
    ("raise", "fallback") are checked together at the end, and on an overflow "fallback"
    reruns the stack layer by layer with the exact-size dispatch.
    """
    depth = num_chunks if depth is None else depth
    if num_chunks < 1 or depth < 1:
        raise ValueError(f"num_chunks and depth must be >= 1, got {num_chunks}, {depth}")
    outputs: list[torch.Tensor | None] = [None] * num_chunks
    waiting = [deque() for _ in layers]  # per layer: (chunk, input) not yet admitted
    waiting[0].extend(enumerate(x.tensor_split(num_chunks)))
    in_flight = [0] * len(layers)
    active: deque = deque()

    def admit() -> None:
        for index, queue in enumerate(waiting):
            while queue and in_flight[index] < depth:
                chunk, chunk_input = queue.popleft()
                task = _chunk_task(layers[index], chunk_input, chunk, overlap_fn)
                active.append((index, chunk, task))
                in_flight[index] += 1

    admit()
    while active:
        index, chunk, task = active.popleft()
        try:
            next(task)
            active.append((index, chunk, task))
        except StopIteration as done:
            in_flight[index] -= 1
            if index + 1 < len(layers):
                waiting[index + 1].append((chunk, done.value))
            else:
                outputs[chunk] = done.value
            admit()
    return _checked(layers, x, torch.cat(outputs), overlap_fn)


def _checked(layers, x, out, overlap_fn):
    """The statuses of the checking capacity layers, one read for all; "fallback" reruns."""
    checking = [
        layer
        for layer in layers
        if layer.dispatch_mode == "capacity" and layer.on_overflow != "report"
    ]
    statuses = [status for layer in checking for status in layer.dispatch_status]
    for layer in checking:
        layer.dispatch_status = []
    try:
        check_status(statuses, checking[0].capacity if checking else 0)
    except DispatchOverflow:
        if any(layer.on_overflow == "raise" for layer in checking):
            raise
        for layer in layers:
            slots, topk_weights = layer.route_slots(x)
            routed, extra = run_layer(layer, x, slots, topk_weights, 1, overlap_fn, "exact")
            x = routed if extra is None else routed + extra
        return x
    return out

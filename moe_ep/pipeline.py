"""The micro-batch pipeline of expert parallelism: communication of some chunks travels while
the experts of another compute, within one MoE layer and across a stack of them.

Each (layer, chunk) is a task that advances in three phases, yielding where its transfers are
in flight:
  1. route, start the dispatch (the counts are exchanged, the rows leave);
  2. wait for the rows, run the local experts, start the combine, run the caller's overlap_fn;
  3. wait for the combined rows.
A scheduler advances the tasks round-robin, at most `depth` chunks of a layer at a time. When
chunk c leaves layer l it enters layer l+1, so layer l+1 starts on the first chunk while layer
l still works on later ones (the seeds' layer-to-layer streaming).

The default depth admits every chunk of the first layer at once, so all their dispatches are
issued before any expert runs. On CUDA this is what lets them overlap: c10d orders a NCCL
collective after all work already queued on the current stream, so a dispatch issued after
the experts of an earlier chunk were queued would wait for them. (A smaller depth bounds the
memory of rows in flight at the price of that overlap.)

The order of collectives depends only on the number of layers, chunks and the depth, never on
the data, so every rank issues the same sequence even when their token counts differ or are
zero.

On CPU/Gloo, Gloo's threads move the rows while the main thread computes; on CUDA/NCCL the
transfers run on NCCL's stream while the experts run on the current stream.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator, Sequence
from typing import Any, Protocol

import torch

OverlapFn = Callable[[int, torch.Tensor], "torch.Tensor | None"]


class ExpertParallelPhases(Protocol):
    """The phases of one expert-parallel layer that the schedule interleaves (MoELayer has
    them); the pipeline needs nothing else of a layer."""

    dispatch_status: list[torch.Tensor]

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def start_dispatch(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> Any: ...

    def finish_dispatch(
        self, pending: Any, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> Any: ...

    def local_experts(self, received: Any) -> torch.Tensor: ...

    def start_combine(self, y: torch.Tensor, received: Any) -> Any: ...


def _chunk_task(
    layer: ExpertParallelPhases, x: torch.Tensor, chunk: int, overlap_fn: OverlapFn | None
) -> Generator[None, None, torch.Tensor]:
    topk_ids, topk_weights = layer.route(x)
    pending = layer.start_dispatch(x, topk_ids, topk_weights)
    yield
    received = layer.finish_dispatch(pending, x, topk_ids, topk_weights)
    returning = layer.start_combine(layer.local_experts(received), received)
    extra = overlap_fn(chunk, x) if overlap_fn is not None else None
    yield
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
    """
    depth = num_chunks if depth is None else depth
    if num_chunks < 1 or depth < 1:
        raise ValueError(f"num_chunks and depth must be >= 1, got {num_chunks}, {depth}")
    for layer in layers:
        layer.dispatch_status = []  # this step's statuses (fixed-capacity, "report")
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
    return torch.cat(outputs)


def moe_forward(
    layer: ExpertParallelPhases,
    x: torch.Tensor,
    num_chunks: int = 2,
    overlap_fn: OverlapFn | None = None,
) -> torch.Tensor:
    """One expert-parallel MoE layer over x [T, H] in num_chunks overlapped chunks."""
    return stream_layers([layer], x, num_chunks, overlap_fn)

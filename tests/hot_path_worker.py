"""The hot path's budgets, inside each rank's process (spawned by test_hot_path.py): host reads
per layer, rows computed against rows needed, operators per call. They are the same on every
machine, so the CPU CI holds the GPU design to them."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import assert_close_relative, process_group  # noqa: E402

import moe_ep  # noqa: E402
from moe_ep import debug, dispatcher, reference  # noqa: E402
from moe_ep.placement import ExpertPlacement  # noqa: E402

HIDDEN, FFN = 32, 16

# Operators per call on the CPU (moe_ep.debug.op_counts): the layout is a few kernels, not a
# chain of ATen ops (the design before it ran about 100 per exact-mode chunk).
OP_BUDGET = {"dispatch_start": 10, "dispatch_finish": 4, "combine": 5, "capacity_step": 13}


def max_over_ranks(value: int) -> int:
    t = torch.tensor([value])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def make_layer(mode: str, chunks: int, tokens: int, **kwargs) -> moe_ep.MoELayer:
    world = dist.get_world_size()
    layer = moe_ep.MoELayer(
        HIDDEN,
        FFN,
        4 * world,
        2,
        dtype=torch.float32,
        group=dist.group.WORLD,
        dispatch_mode=mode,
        capacity=max(1, max_over_ranks(tokens)) if mode == "capacity" else None,
        num_chunks=chunks,
        **kwargs,
    )
    g = torch.Generator().manual_seed(7)  # the same weights on every rank
    gate = torch.randn(4 * world, HIDDEN, generator=g) / HIDDEN**0.5
    w13 = torch.randn(4 * world, 2 * FFN, HIDDEN, generator=g) / HIDDEN**0.5
    w2 = torch.randn(4 * world, HIDDEN, FFN, generator=g) / FFN**0.5
    layer.load_full_weights(gate, w13, w2, transposed=False)
    layer.full_w13, layer.full_w2 = w13, w2
    return layer


def expected(layer: moe_ep.MoELayer, x: torch.Tensor) -> torch.Tensor:
    ids, weights = layer.route(x)
    return reference.moe(x, ids, weights, layer.full_w13, layer.full_w2)


def run_host_read_budgets() -> None:
    rank = dist.get_rank()
    tokens = 37 + 5 * rank
    x = torch.randn(tokens, HIDDEN)
    for chunks in (1, 2, 4):
        # Exact mode: one header per layer, whatever the chunk count, with or without a hook.
        layer = make_layer("exact", chunks, tokens)
        for overlap_fn in (None, lambda chunk, xc: None):
            layer(x, overlap_fn=overlap_fn)  # warm-up
            with debug.counting_host_reads() as reads:
                out = layer(x, overlap_fn=overlap_fn)
            assert reads.count == 1, (chunks, overlap_fn, reads.count)
            assert_close_relative(out, expected(layer, x), torch.float32)
        # Fixed capacity: nothing read in the step; the status is checked after it.
        layer = make_layer("capacity", chunks, tokens)
        layer(x)
        layer.check_dispatch_status()  # warm-up: the configuration's handshake
        with debug.counting_host_reads() as reads:
            out = layer(x)
        assert reads.count == 0, (chunks, reads.count)
        with debug.counting_host_reads() as reads:
            layer.check_dispatch_status()
        assert reads.count == 1
        assert_close_relative(out, expected(layer, x), torch.float32)
    # One rank, no group: nothing read.
    single = moe_ep.MoELayer(HIDDEN, FFN, 8, 2, dtype=torch.float32)
    with debug.counting_host_reads() as reads:
        single(x)
    assert reads.count == 0


def run_rows_computed() -> None:
    """Fixed capacity computes what arrived: the experts' rows (expert_offsets[L]) equal the
    (token, choice) pairs that every rank routed here, counted independently from their ids."""
    world, rank = dist.get_world_size(), dist.get_rank()
    experts = 4 * world
    placement = ExpertPlacement.contiguous(experts, world)
    for tokens, skew in ((23, False), (40, True), (0, False)):
        ids = torch.rand(tokens, experts).argsort(1)[:, :2].int()
        if skew:
            ids[:, 0] = 0  # every token's first choice on rank 0
        x = torch.randn(tokens, HIDDEN)
        capacity = max(1, max_over_ranks(tokens))
        received = dispatcher.dispatch_capacity(
            x, ids, torch.rand(tokens, 2), placement, capacity, dist.group.WORLD
        )
        received.check()
        everyone = [torch.zeros(0, 2, dtype=torch.int32)] * world
        dist.all_gather_object(everyone, ids)
        needed = sum(int((placement.slot_rank[i.long()] == rank).sum()) for i in everyone)
        computed = int(received.expert_offsets[-1])
        assert computed == needed, (computed, needed)
        # The buffer is fixed by (world, capacity, W); the rows past the count are not computed.
        assert received.x_sorted.shape[0] == world * capacity * 2


def run_op_budgets() -> None:
    """Operators per call of the dispatch, the receiver's grouping and the combine."""
    world = dist.get_world_size()
    layer = make_layer("exact", 1, 40)
    x = torch.randn(40, HIDDEN)
    slots, weights = layer.route_slots(x)
    placement, group = layer.placement, dist.group.WORLD
    assert placement.num_local_experts >= 1  # computed once per placement, not in a dispatch
    started = {}
    counts = debug.op_counts(
        lambda: started.update(pending=dispatcher.dispatch_chunks(x, slots, weights, placement, 1))
    )
    assert sum(counts.values()) <= OP_BUDGET["dispatch_start"], counts
    counts = debug.op_counts(lambda: started.update(received=started["pending"][0].wait()))
    received = started["received"]
    assert sum(counts.values()) <= OP_BUDGET["dispatch_finish"], counts
    y = layer.local_experts(received)
    counts = debug.op_counts(lambda: dispatcher.combine(y, received, group))
    assert sum(counts.values()) <= OP_BUDGET["combine"], counts
    capacity = make_layer("capacity", 1, 40)
    capacity(x)
    capacity.check_dispatch_status()
    counts = debug.op_counts(
        lambda: dispatcher.dispatch_capacity(x, slots, weights, placement, capacity.capacity)
    )
    assert sum(counts.values()) <= OP_BUDGET["capacity_step"], (world, counts)


def worker(rank: int, world: int, init_file: str) -> None:
    with process_group(rank, world, init_file):
        torch.manual_seed(100 + rank)
        run_host_read_budgets()
        run_rows_computed()
        run_op_budgets()

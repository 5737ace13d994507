"""Expert-parallel scenarios run inside each rank's process (spawned by test_dispatch.py, or
under torchrun: `torchrun --nproc-per-node 4 tests/ep_worker.py`)."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import assert_close_relative, process_group  # noqa: E402

import moe_ep  # noqa: E402
from moe_ep import reference  # noqa: E402
from moe_ep.dispatcher import dispatch_layout
from moe_ep.pipeline import run_layer, stream_layers  # noqa: E402
from moe_ep.placement import ExpertPlacement  # noqa: E402

HIDDEN, FFN = 32, 16


def full_weights(experts: int, dtype: torch.dtype, seed: int):
    """The same all-expert weights on every rank."""
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(experts, HIDDEN, generator=g) / HIDDEN**0.5
    w13 = (torch.randn(experts, 2 * FFN, HIDDEN, generator=g) / HIDDEN**0.5).to(dtype)
    w2 = (torch.randn(experts, HIDDEN, FFN, generator=g) / FFN**0.5).to(dtype)
    return gate, w13, w2


def max_over_ranks(value: int) -> int:
    t = torch.tensor([value], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def check_layer(
    name,
    experts,
    top_k,
    tokens,
    dtype,
    *,
    placement=None,
    skew=0.0,
    one_expert=None,
    device="cpu",
    mode="exact",
    capacity=None,
    on_overflow="fallback",
):
    """MoELayer over the world group against the float64 single-rank reference."""
    rank = dist.get_rank()
    gate, w13, w2 = full_weights(experts, dtype, seed=len(name) * 1000 + experts)
    if mode == "capacity" and capacity is None:  # the largest T of any rank: never overflows
        capacity = max(1, max_over_ranks(tokens))
    layer = moe_ep.MoELayer(
        HIDDEN,
        FFN,
        experts,
        top_k,
        dtype=dtype,
        device=device,
        group=dist.group.WORLD,
        placement=placement,
        dispatch_mode=mode,
        capacity=capacity,
        on_overflow=on_overflow,
    )
    if one_expert is not None:
        gate = torch.zeros_like(gate)
        gate[one_expert] = 1.0
    if skew:
        gate[0] += skew  # expert 0 attracts most tokens
    layer.load_full_weights(gate.to(device), w13.to(device), w2.to(device), transposed=False)
    g = torch.Generator().manual_seed(rank * 7919 + len(name))
    x = torch.rand(tokens, HIDDEN, generator=g).to(dtype).to(device)
    if one_expert is None:
        x = x * 2 - 1
    out = layer(x)
    if mode == "capacity":
        layer.check_dispatch_status()
    ids, weights = layer.route(x)
    expected = reference.moe(x.cpu(), ids.cpu(), weights.cpu(), w13, w2)
    try:
        assert_close_relative(out.cpu(), expected, dtype)
    except AssertionError as error:
        raise AssertionError(f"rank {rank}: scenario {name} ({dtype}, {mode}): {error}") from None


def run_scenarios(device="cpu"):
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(rank)
    for mode in ("exact", "capacity"):
        for dtype in (torch.float32, torch.bfloat16):
            run = dict(device=device, mode=mode)
            check_layer("random", 4 * world, 2, 50 + 13 * rank, dtype, **run)
            check_layer("skewed", 4 * world, 2, 64, dtype, skew=4.0, **run)
            check_layer(
                "one-expert", 2 * world, 1, 40, dtype, one_expert=world % (2 * world), **run
            )
            # One expert per rank (EP == E); rank 1 (when present) sends nothing.
            check_layer("ep-equals-e", world, min(2, world), 0 if rank == 1 else 30, dtype, **run)
            # k choices on one rank: 8 experts per rank, top-8.
            check_layer("shared-rank", 8 * world, 8, 25, dtype, **run)
            # Fewer experts than ranks: the last ranks host nothing and receive nothing.
            if world > 1:
                check_layer("idle-ranks", world - 1, 1, 20, dtype, **run)
            # Experts scattered over ranks in an arbitrary order.
            ranks = [(e * 3 + 1) % world for e in range(2 * world)]
            check_layer(
                "scattered",
                2 * world,
                2,
                33,
                dtype,
                placement=ExpertPlacement.from_ranks(ranks, world),
                **run,
            )
        # No rank has a token.
        check_layer("no-tokens", 2 * world, 2, 0, torch.float32, device=device, mode=mode)

    # Capacity too small: the overflow is reported, and every rank falls back or raises.
    check_layer(
        "overflow-fallback",
        2 * world,
        2,
        40,
        torch.float32,
        device=device,
        mode="capacity",
        capacity=3,
    )
    try:
        check_layer(
            "overflow-raise",
            2 * world,
            2,
            40,
            torch.float32,
            device=device,
            mode="capacity",
            capacity=3,
            on_overflow="raise",
        )
        raise AssertionError("the overflow was not reported")
    except moe_ep.dispatcher.DispatchOverflow as error:
        assert error.pairs > 0

    # "report": no host read in the step; the status is checked afterwards, on every rank.
    check_layer(
        "report",
        2 * world,
        2,
        30,
        torch.float32,
        device=device,
        mode="capacity",
        on_overflow="report",
    )
    layer = moe_ep.MoELayer(
        HIDDEN,
        FFN,
        2 * world,
        2,
        dtype=torch.float32,
        device=device,
        group=dist.group.WORLD,
        dispatch_mode="capacity",
        capacity=2,
        on_overflow="report",
        num_chunks=2,
    )
    layer(torch.randn(30, HIDDEN, device=device))
    assert len(layer.dispatch_status) == 2
    try:
        layer.check_dispatch_status()
        raise AssertionError("the overflow was not reported")
    except moe_ep.dispatcher.DispatchOverflow as error:
        assert error.pairs > 0

    # The fused combine op equals its two halves (dispatcher.combine uses the halves).
    placement = ExpertPlacement.contiguous(2 * world, world)
    x = torch.randn(9, HIDDEN, device=device)
    ids = torch.stack([torch.randperm(2 * world)[:2] for _ in range(9)]).int().to(device)
    weights = torch.rand(9, 2, device=device)
    received = moe_ep.dispatcher.dispatch(x, ids, weights, placement.to(device))
    fused = torch.ops.moe_ep.combine(
        received.x_sorted,
        received.recv_row_of,
        received.recv_weights,
        received.recv_counts,
        received.send_counts,
        received.token_slot,
        dist.group.WORLD.group_name,
    )
    assert torch.equal(fused, moe_ep.dispatcher.combine(received.x_sorted, received))
    torch.testing.assert_close(fused, x * weights.sum(1, keepdim=True))

    # Token batching: with k = 8 and 8 experts per rank, far fewer rows than choices travel.
    placement = ExpertPlacement.contiguous(8 * world, world)
    ids = torch.stack([torch.randperm(8 * world)[:8] for _ in range(25)]).int()
    layout = dispatch_layout(ids, placement)
    distinct = sum(len({int(e) // 8 for e in row}) for row in ids)
    assert layout.rows_sent == distinct and layout.rows_saved == ids.numel() - distinct


def chunked(layer, x, chunks, overlap_fn=None):
    """The Python pipeline over one layer (what MoELayer.forward runs with a hook)."""
    slots, weights = layer.route_slots(x)
    routed, extra = run_layer(layer, x, slots, weights, chunks, overlap_fn)
    if layer.dispatch_mode == "capacity":
        layer.check_dispatch_status()
    return routed if extra is None else routed + extra


def run_overlap(device="cpu"):
    """The chunked pipeline (overlap on) against the unchunked step (overlap off)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(1000 + rank)  # reproducible inputs, different on every rank
    experts = 4 * world
    gate, w13, w2 = full_weights(experts, torch.float32, seed=99)
    gate[0] += 2.0  # skewed routing
    for mode in ("exact", "capacity"):
        for tokens in (0, 2, 37 + 5 * rank):  # T = 0, T < chunk count, uneven T
            capacity = max(1, max_over_ranks(tokens))
            layers = []
            for _ in range(3):
                layer = moe_ep.MoELayer(
                    HIDDEN,
                    FFN,
                    experts,
                    2,
                    dtype=torch.float32,
                    device=device,
                    group=dist.group.WORLD,
                    dispatch_mode=mode,
                    capacity=capacity,
                )
                layer.load_full_weights(
                    gate.to(device), w13.to(device), w2.to(device), transposed=False
                )
                layers.append(layer)
            x = torch.randn(tokens, HIDDEN, device=device)
            ids, weights = layers[0].route(x)
            off = layers[0].experts(x, ids, weights)
            # One chunk is the same math: bitwise equal. More chunks change only the row counts
            # of the expert GEMMs, so the results agree to float32 rounding.
            assert torch.equal(chunked(layers[0], x, 1), off)
            for chunks in (2, 3, 5):
                on = chunked(layers[0], x, chunks)
                torch.testing.assert_close(on, off, rtol=1e-6, atol=1e-6)
                if mode == "exact":  # the moe_forward op (routing once, not per chunk)
                    layer = layers[0]
                    op_out = moe_ep.dispatcher.moe_forward(
                        x, ids, weights, layer.placement, layer.w13, layer.w2, "silu", chunks
                    )
                    torch.testing.assert_close(op_out, off, rtol=1e-6, atol=1e-6)
            # A hook in the gaps (a shared expert): its result is added to each chunk.
            shared = torch.nn.Linear(HIDDEN, HIDDEN, device=device)
            with torch.no_grad():
                hooked = chunked(layers[0], x, 3, lambda chunk, xc, f=shared: f(xc))
                torch.testing.assert_close(hooked, off + shared(x), rtol=1e-5, atol=1e-5)
            # Layer-to-layer streaming over a stack of three layers.
            sequential = x
            for layer in layers:
                sequential = layer.experts(sequential, *layer.route(sequential))
            for depth in (None, 1, 2):
                streamed = stream_layers(layers, x, 3, depth=depth)
                # Three layers deep, chunked routing logits round differently: float32 noise
                # grows to ~1e-5 on O(1) outputs.
                torch.testing.assert_close(streamed, sequential, rtol=1e-4, atol=1e-4)


def capacity_dispatch(x, ids, weights, placement, group=None, capacity=4):
    result = moe_ep.dispatcher.dispatch_capacity(x, ids, weights, placement, capacity, group)
    result.check()
    return result


def expect_error(needle, call, *args, **kwargs):
    try:
        call(*args, **kwargs)
    except RuntimeError as error:
        assert needle in str(error), error
        return
    raise AssertionError(f"no error mentioning {needle!r}")


_fresh_capacity = iter(range(100, 10_000))


def fresh_capacity_dispatch(x, ids, weights, placement, group=None):
    """A fixed-capacity configuration no earlier call used: every rank makes its handshake."""
    return capacity_dispatch(x, ids, weights, placement, group, next(_fresh_capacity))


def run_misuse():
    """Each misuse raises on every rank (no rank left waiting); the group works afterwards."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if world == 1:
        return
    last = rank == world - 1
    experts = 2 * world
    placement = ExpertPlacement.contiguous(experts, world)
    ids = torch.zeros(4, 1, dtype=torch.int32)
    w = torch.ones(4, 1)
    good_x = torch.randn(4, 32)
    # Misuse in the data: found by the layout on one rank, carried in the exact mode's header
    # or the fixed-capacity status.
    bad_ids = ids + (experts if last else 0)
    # One expert per rank: a repeated expert id (every rank but 0) puts two choices of a token
    # on one rank.
    one_each = ExpertPlacement.contiguous(world, world)
    repeated = torch.tensor([[0, 1 if rank == 0 else 0]] * 4, dtype=torch.int32)
    # An expert map with a rank outside the group, on the last rank only (the slot map is
    # written after the placement's own validation).
    broken = ExpertPlacement.contiguous(experts, world)
    if last:
        broken.slot_rank[0] = world
    for dispatch in (moe_ep.dispatcher.dispatch, capacity_dispatch):
        expect_error("expert map", dispatch, good_x, ids, w, broken)
        expect_error("'topk_ids'", dispatch, good_x, bad_ids, w, placement)
        expect_error("'group_name'", dispatch, good_x, ids, w, placement, "no-such-group")
        expect_error(
            "more choices on one rank", dispatch, good_x, repeated, w.expand(4, 2), one_each
        )
    # A configuration that differs on one rank: found by the exact mode's header at any call,
    # by the fixed-capacity handshake at the configuration's first call.
    for dispatch in (moe_ep.dispatcher.dispatch, fresh_capacity_dispatch):
        expect_error("hidden size", dispatch, torch.randn(4, 16 if last else 32), ids, w, placement)
        expect_error(
            "dtype",
            dispatch,
            good_x.to(torch.bfloat16 if last else torch.float32),
            ids,
            w,
            placement,
        )
        two = torch.tensor([[0, 1]] * 4, dtype=torch.int32)
        expect_error(
            "choices per token",
            dispatch,
            good_x,
            ids if last else two,
            w if last else w.expand(4, 2),
            placement,
        )
        # A malformed argument on one rank: it takes part in the exchange and every rank raises.
        expect_error("'topk_weights'", dispatch, good_x, ids, w[:3] if last else w, placement)
        expect_error("'x'", dispatch, good_x.flatten() if last else good_x, ids, w, placement)
    # Placements that differ on one rank (valid on each) would send tokens to the wrong experts:
    # the map checksum travels every step.
    homes = [e // 2 for e in range(experts)]
    if last:  # experts 0 and E-1 trade ranks: every rank still hosts two
        homes[0], homes[-1] = homes[-1], homes[0]
    swapped = ExpertPlacement.from_ranks(homes, world)
    for dispatch in (moe_ep.dispatcher.dispatch, capacity_dispatch):
        expect_error("expert map", dispatch, good_x, ids, w, swapped)
    # moe_forward starts all chunks with one header: misuse in the last chunk of one rank
    # still raises on every rank, and so do chunk counts or expert weights that differ.
    w13 = torch.randn(2, 2 * FFN, HIDDEN)
    w2 = torch.randn(2, HIDDEN, FFN)
    late_bad = ids.clone()
    late_bad[-1] = experts if last else 0
    forward = moe_ep.dispatcher.moe_forward
    x32 = torch.randn(4, HIDDEN)
    for chunks in (1, 3):
        expect_error("'topk_ids'", forward, x32, late_bad, w, placement, w13, w2, "silu", chunks)
    expect_error("'num_chunks'", forward, x32, ids, w, placement, w13, w2, "silu", 3 if last else 2)
    expect_error("'w13'", forward, x32, ids, w, placement, w13[0] if last else w13, w2, "silu", 1)
    check_layer("after-misuse", experts, 2, 10, torch.float32)
    check_layer("after-misuse", experts, 2, 10, torch.float32, mode="capacity")


def worker(rank: int, world: int, init_file: str, device: str = "cpu", backend: str = "gloo"):
    with process_group(rank, world, init_file, backend):
        run_scenarios(device)
        run_overlap(device)
        run_misuse()


if __name__ == "__main__":  # under torchrun
    dist.init_process_group("gloo")
    run_scenarios()
    run_overlap()
    run_misuse()
    print(f"rank {dist.get_rank()}: all expert-parallel scenarios passed")
    dist.destroy_process_group()

"""The FP8 dispatch inside each rank's process (spawned by test_fp8_dispatch.py): MoELayer with
dispatch_dtype=float8_e4m3fn over the group, in both dispatch modes, against float64 references;
misuse that raises on every rank; the hot path's budgets."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import RELATIVE_TOLERANCE, assert_close_relative, process_group  # noqa: E402
from ep_worker import expect_error, max_over_ranks, world_layer  # noqa: E402
from hot_path_worker import HIDDEN, OP_BUDGET, make_layer  # noqa: E402

from moe_ep import debug, dispatcher, reference  # noqa: E402
from moe_ep.placement import ExpertPlacement  # noqa: E402

FP8 = torch.float8_e4m3fn
FFN = 64


def full_weights(experts: int, hidden: int, dtype: torch.dtype, seed: int):
    """The same all-expert weights on every rank."""
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(experts, hidden, generator=g) / hidden**0.5
    w13 = (torch.randn(experts, 2 * FFN, hidden, generator=g) / hidden**0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, FFN, generator=g) / FFN**0.5).to(dtype)
    return gate, w13, w2


def activations(tokens: int, hidden: int, heavy: bool, seed: int) -> torch.Tensor:
    """Gaussian activations, or heavy-tailed ones: Student-t (3 degrees of freedom) values and
    a few outlier channels 100x larger, as LLM activations have."""
    g = torch.Generator().manual_seed(seed)
    if not heavy:
        return torch.randn(tokens, hidden, generator=g)
    normal = torch.randn(tokens, hidden, generator=g)
    chi2 = torch.randn(tokens, hidden, 3, generator=g).pow(2).sum(-1)
    x = normal / (chi2 / 3).sqrt()
    outliers = torch.randperm(hidden, generator=g)[: max(1, hidden // 64)]
    x[:, outliers] *= 100.0
    return x


# Standard deviations the output error may reach: for a Gaussian, |Z| > 6 has probability 2e-9
# per element (the error of an output sums many independent roundings).
SIGMAS = 6.0


def check_fp8_layer(
    name,
    experts,
    top_k,
    tokens,
    dtype,
    *,
    hidden=256,
    heavy=False,
    one_expert=None,
    placement=None,
    mode="exact",
    device="cpu",
):
    """MoELayer with the FP8 dispatch against two float64 references: the experts on the
    input as the FP8 round trip leaves it (the dispatch must add nothing else: the usual
    tolerance), and on the input itself, within what e4m3's precision allows after the
    experts: the worst case (reference.moe_error_bound of the per-element bound, rigorous and
    loose) and, tighter, SIGMAS standard deviations of the error that uniform roundings of
    e4m3's spacing give to first order (reference.moe_error_std); each plus the usual
    tolerance of the layer's own arithmetic."""
    rank = dist.get_rank()
    gate, w13, w2 = full_weights(experts, hidden, dtype, seed=len(name) * 1000 + experts)
    if one_expert is not None:
        gate = torch.zeros_like(gate)
        gate[one_expert] = 1.0
    capacity = max(1, max_over_ranks(tokens)) if mode == "capacity" else None
    layer = world_layer(
        experts,
        top_k,
        dtype,
        device,
        placement,
        mode,
        capacity,
        hidden=hidden,
        ffn=FFN,
        on_overflow="raise",
        dispatch_dtype=FP8,
    )
    layer.load_full_weights(gate.to(device), w13.to(device), w2.to(device))
    x = activations(tokens, hidden, heavy, seed=rank * 7919 + len(name)).to(dtype)
    if one_expert is not None:
        x = x.abs()  # positive rows: the gate picks one_expert for every token
    out = layer(x.to(device)).cpu()
    ids, weights = layer.route(x.to(device))
    ids, weights = ids.cpu(), weights.cpu()
    where = f"rank {rank}: scenario {name} ({dtype}, {mode}, hidden {hidden})"
    try:
        assert_close_relative(
            out, reference.moe(reference.fp8_round_trip(x), ids, weights, w13, w2), dtype
        )
    except AssertionError as error:
        raise AssertionError(f"{where}, against the round-tripped input: {error}") from None
    expected = reference.moe(x, ids, weights, w13, w2)
    if expected.numel() == 0:
        return
    error = (out.double() - expected).abs()
    arithmetic = RELATIVE_TOLERANCE[dtype] * expected.abs().max()
    worst = reference.moe_error_bound(x, reference.fp8_error_bound(x), ids, weights, w13, w2)
    excess = (error - worst - arithmetic).max().item()
    assert excess <= 0, f"{where}: the error exceeds the e4m3 worst case by {excess:.3e}"
    std = reference.moe_error_std(x, reference.fp8_error_variance(x), ids, weights, w13, w2)
    excess = (error - SIGMAS * std - arithmetic).max().item()
    assert excess <= 0, f"{where}: the error exceeds {SIGMAS} sigma of e4m3's by {excess:.3e}"


def run_layers(device="cpu"):
    world, rank = dist.get_world_size(), dist.get_rank()
    for mode in ("exact", "capacity"):
        for dtype in (torch.float32, torch.bfloat16):
            run = dict(mode=mode, device=device)
            check_fp8_layer("random", 4 * world, 2, 40 + 7 * rank, dtype, **run)
            check_fp8_layer("heavy-tailed", 4 * world, 2, 40, dtype, heavy=True, **run)
            # A partial last scale block (200 = 128 + 72 channels).
            check_fp8_layer("partial-block", 2 * world, 2, 24, dtype, hidden=200, **run)
            # Every token to one expert.
            check_fp8_layer("one-expert", 2 * world, 1, 30, dtype, one_expert=world - 1, **run)
            # One expert per rank (the receiver's rows need no grouping); rank 1 sends nothing.
            check_fp8_layer("ep-equals-e", world, 1, 0 if rank == 1 else 25, dtype, **run)
            # Top-8 with 8 experts per rank: a token's choices share ranks.
            check_fp8_layer("shared-rank", 8 * world, 8, 20, dtype, heavy=True, **run)
            if world > 1:  # the last ranks host no expert and receive nothing
                check_fp8_layer("idle-ranks", world - 1, 1, 20, dtype, **run)
            ranks = [(e * 3 + 1) % world for e in range(2 * world)]
            placement = ExpertPlacement.from_ranks(ranks, world)
            check_fp8_layer("scattered", 2 * world, 2, 33, dtype, placement=placement, **run)
        check_fp8_layer("no-tokens", 2 * world, 2, 0, torch.float32, **run)


def run_misuse():
    """A rank that quantizes alone, or asks for a dtype that is not FP8, raises on every rank;
    the group works afterwards."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if world == 1:
        return
    last = rank == world - 1
    placement = ExpertPlacement.contiguous(2 * world, world)
    x, ids, w = torch.randn(4, 128), torch.zeros(4, 1, dtype=torch.int32), torch.ones(4, 1)
    capacities = iter(range(500, 600))  # configurations no earlier call used: a handshake each

    def exact(dispatch_dtype):
        return dispatcher.dispatch(x, ids, w, placement, dispatch_dtype=dispatch_dtype)

    def capacity(dispatch_dtype):
        result = dispatcher.dispatch_capacity(
            x, ids, w, placement, next(capacities), dispatch_dtype=dispatch_dtype
        )
        result.check()

    for dispatch in (exact, capacity):
        expect_error("FP8 dispatch", dispatch, FP8 if last else None)
        expect_error("'dispatch_dtype'", dispatch, torch.float16 if last else FP8)
    forward = dispatcher.moe_forward
    w13, w2 = torch.randn(2, 2 * FFN, 128), torch.randn(2, 128, FFN)
    expect_error(
        "FP8 dispatch",
        forward,
        x,
        ids,
        w,
        placement,
        w13,
        w2,
        "silu",
        2,
        dispatch_dtype=FP8 if last else None,
    )
    check_fp8_layer("after-misuse", 2 * world, 2, 10, torch.float32)
    check_fp8_layer("after-misuse", 2 * world, 2, 10, torch.float32, mode="capacity")


def run_budgets():
    """The FP8 dispatch keeps the hot path's budgets: exact mode one host read per layer
    whatever the chunk count, fixed capacity none; the quantization and the dequantization run
    inside the pack and the row scatter, so the operators per call stay within the budgets of
    tests/hot_path_worker.py."""
    rank = dist.get_rank()
    tokens = 37 + 5 * rank
    x = torch.randn(tokens, HIDDEN)
    for chunks in (1, 2, 4):
        layer = make_layer("exact", chunks, tokens, dispatch_dtype=FP8)
        layer(x)  # warm-up
        with debug.counting_host_reads() as reads:
            layer(x)
        assert reads.count == 1, (chunks, reads.count)
        layer = make_layer("capacity", chunks, tokens, dispatch_dtype=FP8)
        layer(x)
        layer.check_dispatch_status()  # warm-up: the configuration's handshake
        with debug.counting_host_reads() as reads:
            layer(x)
        assert reads.count == 0, (chunks, reads.count)
        layer.check_dispatch_status()
    layer = make_layer("exact", 1, 40, dispatch_dtype=FP8)
    x = torch.randn(40, HIDDEN)
    slots, weights = layer.route_slots(x)
    start = dispatcher.dispatch_chunks
    start(x, slots, weights, layer.placement, 1, None, FP8)[0].wait()  # warm-up (first calls)
    held = {}
    counts = debug.op_counts(
        lambda: held.update(pending=start(x, slots, weights, layer.placement, 1, None, FP8))
    )
    assert sum(counts.values()) <= OP_BUDGET["dispatch_start"], counts
    counts = debug.op_counts(lambda: held.update(received=held["pending"][0].wait()))
    assert sum(counts.values()) <= OP_BUDGET["dispatch_finish"], counts
    assert "moe_ep::scatter_dequantized_rows" in counts, counts  # the fused dequantization
    capacity = make_layer("capacity", 1, 40, dispatch_dtype=FP8)
    capacity(x)
    capacity.check_dispatch_status()
    counts = debug.op_counts(
        lambda: dispatcher.dispatch_capacity(
            x, slots, weights, layer.placement, capacity.capacity, dispatch_dtype=FP8
        )
    )
    assert sum(counts.values()) <= OP_BUDGET["capacity_step"], counts


def worker(rank: int, world: int, init_file: str, device: str = "cpu", backend: str = "gloo"):
    with process_group(rank, world, init_file, backend):
        torch.manual_seed(200 + rank)
        run_layers(device)
        if device == "cpu":
            run_misuse()
            run_budgets()

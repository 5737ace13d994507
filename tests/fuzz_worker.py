"""Fuzzing expert parallelism against an independent float64 reference (run by
tests/test_fuzz.py through tests/launcher.py, or alone: `python tests/fuzz_worker.py 60`).

Eight ranks start once and run random cases until a time budget ends; each case draws, from a
generator seeded alike on every rank, a world of 1 to 8 ranks (a subgroup made once per size),
experts, top-k, routing (softmax or sigmoid, groups, a selection bias), a placement (contiguous,
scattered, all on one rank, replicas, ranks without experts, the planner's), dispatch mode,
capacity (with overflow and fallback), chunk count, an overlap hook, dtype, and each rank's
token count (0 included) and routing skew (random, hot experts, every token to the same
experts, every token to one rank's experts).

The reference never asks the layer how it routed: it recomputes the logits from the router
weights and the routing in float64 (moe_ep.reference.route), then the experts in float64
(moe_ep.reference.moe). Tokens whose float64 choice is a near tie (a gap below TIE between the
last chosen and the first unchosen score, or group) are left out of the comparison and
counted: float32 logits may break them either way. Every other output row must match within
RELATIVE_TOLERANCE times that row's largest reference magnitude.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
import traceback
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import RELATIVE_TOLERANCE  # noqa: E402
from launcher import join_group  # noqa: E402

import moe_ep  # noqa: E402
from moe_ep import plan, reference  # noqa: E402
from moe_ep.placement import ExpertPlacement  # noqa: E402

MAX_WORLD = 8
TIE = 1e-5  # score gap below which float32 and float64 routing may disagree
CHECK_EVERY = 16  # cases between the ranks' agreement on whether time is left
DTYPES = [torch.float32] * 3 + [torch.bfloat16, torch.float16]


@dataclass
class Case:
    number: int
    world: int
    experts: int
    top_k: int
    hidden: int
    ffn: int
    score_func: str
    n_group: int
    topk_group: int
    bias: bool
    renormalize: bool
    scaling: float
    activation: str
    placement: str
    mode: str
    capacity: int
    on_overflow: str
    chunks: int
    overlap: bool
    dtype: str
    routing: str
    tokens: list[int]


def draw_case(rng: random.Random, number: int) -> Case:
    """One case, the same on every rank (rng is seeded alike)."""
    world = rng.randint(1, MAX_WORLD)
    experts = rng.choice([1, 2, max(1, world - 1), world, 2 * world, rng.randint(1, 4 * world)])
    top_k = rng.randint(1, min(experts, 8))
    n_group, topk_group = 1, 1
    groups = [g for g in (2, 4) if experts % g == 0 and experts // g >= 1]
    if groups and rng.random() < 0.25:
        n_group = rng.choice(groups)
        topk_group = rng.randint(1, n_group)
        while topk_group * (experts // n_group) < top_k:
            topk_group += 1
    tokens = [rng.choice([0, 1, 2, 5, rng.randint(0, 48)]) for _ in range(world)]
    if rng.random() < 0.1:
        tokens = [0] * world
    mode = rng.choice(["exact", "capacity"])
    most = max(1, max(tokens))
    capacity = most if rng.random() < 0.6 else rng.randint(1, most)
    return Case(
        number=number,
        world=world,
        experts=experts,
        top_k=top_k,
        hidden=rng.choice([8, 16, 32]),
        ffn=rng.choice([4, 8, 16]),
        score_func=rng.choice(["softmax", "sigmoid"]),
        n_group=n_group,
        topk_group=topk_group,
        bias=rng.random() < 0.3,
        renormalize=rng.random() < 0.8,
        scaling=rng.choice([1.0, 2.5]),
        activation=rng.choice(["silu", "gelu"]),
        placement=rng.choice(["contiguous", "scattered", "one_rank", "replicas", "planner"]),
        mode=mode,
        capacity=capacity,
        on_overflow="fallback" if capacity < most else rng.choice(["fallback", "raise"]),
        chunks=rng.randint(1, 4),
        overlap=rng.random() < 0.3,
        dtype=str(rng.choice(DTYPES)).removeprefix("torch."),
        routing=rng.choice(["random", "random", "hot", "same_experts", "one_rank"]),
        tokens=tokens,
    )


def make_placement(case: Case, rng: random.Random) -> ExpertPlacement:
    experts, world = case.experts, case.world
    if case.placement == "contiguous":
        return ExpertPlacement.contiguous(experts, world)
    if case.placement == "scattered":  # some ranks may host nothing
        return ExpertPlacement.from_ranks([rng.randrange(world) for _ in range(experts)], world)
    if case.placement == "one_rank":
        return ExpertPlacement.from_ranks([rng.randrange(world)] * experts, world)
    if case.placement == "planner":
        model = plan.Model(1, (), experts, case.top_k, bytes_per_expert=1.0)
        cluster = plan.Cluster(num_nodes=1, gpus_per_node=world, gpu_memory_bytes=0)
        loads = [[rng.random() ** 3 * 100 for _ in range(experts)]]
        layer = plan.plan(model, cluster, loads=loads, redundant_experts=rng.randint(0, world))
        return ExpertPlacement.from_plan(layer.layers[0], world)
    # Replicas: every expert once, then extra copies of random experts, on random ranks.
    slots = list(range(experts)) + [rng.randrange(experts) for _ in range(rng.randint(1, world))]
    rng.shuffle(slots)
    ranks = [rng.randrange(world) for _ in slots]
    local, seen = [], [0] * world
    for r in ranks:
        local.append(seen[r])
        seen[r] += 1
    copies = [[s for s, e in enumerate(slots) if e == expert] for expert in range(experts)]
    width = max(len(c) for c in copies)
    log2phy = torch.tensor([c + [-1] * (width - len(c)) for c in copies], dtype=torch.int32)
    return ExpertPlacement(
        torch.tensor(ranks, dtype=torch.int32),
        torch.tensor(local, dtype=torch.int32),
        world,
        log2phy,
    )


def make_weights(case: Case, placement: ExpertPlacement, rng: random.Random):
    """Router weights shaped by the routing kind, expert weights, optional bias; all ranks
    alike. Tokens are in [0, 1)**H plus noise, so a large positive gate row attracts them."""
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    experts, hidden, ffn = case.experts, case.hidden, case.ffn
    gate = torch.randn(experts, hidden, generator=g) / hidden**0.5
    hot: list[int] = []
    if case.routing == "hot":
        hot = rng.sample(range(experts), rng.randint(1, max(1, experts // 3)))
    elif case.routing == "same_experts":
        hot = rng.sample(range(experts), case.top_k)
    elif case.routing == "one_rank":
        rank = int(placement.slot_rank[rng.randrange(placement.num_slots)])
        hot = sorted({int(e) for e in placement.phy2log[placement.slot_rank == rank]})
    for position, e in enumerate(hot):  # distinct boosts: no exact ties between hot experts
        gate[e] += (3.0 + 0.37 * position) / hidden
    dtype = getattr(torch, case.dtype)
    w13 = (torch.randn(experts, 2 * ffn, hidden, generator=g) / hidden**0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, ffn, generator=g) / ffn**0.5).to(dtype)
    bias = torch.randn(experts, generator=g) * 0.05 if case.bias else None
    return gate, w13, w2, bias


def near_ties(case: Case, logits: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """bool [T]: tokens whose float64 choice of groups or experts is within TIE of another."""
    scores, select = reference.route_select_scores(logits, case.score_func, bias)
    tokens, experts = select.shape
    tie = torch.zeros(tokens, dtype=torch.bool)
    if case.n_group > 1:
        grouped = select.view(tokens, case.n_group, experts // case.n_group)
        if bias is not None and grouped.shape[-1] > 1:
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        else:
            group_scores = grouped.max(dim=-1).values
        ordered = group_scores.sort(dim=-1, descending=True).values
        if case.topk_group < case.n_group:
            gap = ordered[:, case.topk_group - 1] - ordered[:, case.topk_group]
            tie |= gap < TIE
        chosen = group_scores.sort(dim=-1, descending=True, stable=True).indices
        allowed = torch.zeros_like(group_scores, dtype=torch.bool)
        allowed.scatter_(1, chosen[:, : case.topk_group], True)
        allowed = allowed.repeat_interleave(experts // case.n_group, dim=1)
        select = select.masked_fill(~allowed, float("-inf"))
    ordered = select.sort(dim=-1, descending=True).values
    if case.top_k < experts:
        below = ordered[:, case.top_k]
        gap = ordered[:, case.top_k - 1] - below
        tie |= torch.isfinite(below) & (gap < TIE)
    return tie


def run_case(case: Case, group: dist.ProcessGroup, rank: int) -> dict:
    """Runs one case on this rank of `group`; returns its counts, raises AssertionError on a
    mismatch."""
    rng = random.Random(case.number)  # alike on every rank: placement and weights
    placement = make_placement(case, rng)
    gate, w13, w2, bias = make_weights(case, placement, rng)
    dtype = getattr(torch, case.dtype)
    layer = moe_ep.MoELayer(
        case.hidden,
        case.ffn,
        case.experts,
        case.top_k,
        score_func=case.score_func,
        n_group=case.n_group,
        topk_group=case.topk_group,
        renormalize=case.renormalize,
        scaling=case.scaling,
        expert_bias=case.bias,
        activation=case.activation,
        dtype=dtype,
        group=group,
        placement=placement,
        dispatch_mode=case.mode,
        capacity=case.capacity,
        on_overflow=case.on_overflow,
        num_chunks=case.chunks,
    )
    layer.load_full_weights(gate, w13, w2, bias, transposed=False)  # 2F may equal H
    g = torch.Generator().manual_seed(case.number * MAX_WORLD + rank)
    count = case.tokens[rank]
    noise = torch.randn(count, case.hidden, generator=g)
    x = (torch.rand(count, case.hidden, generator=g) + 0.05 * noise).to(dtype)

    def shared_expert(chunk: int, x_chunk: torch.Tensor) -> torch.Tensor:
        return x_chunk * 0.5

    out = layer(x, overlap_fn=shared_expert if case.overlap else None)
    if case.mode == "capacity":
        layer.check_dispatch_status()  # "raise" with capacity >= every T: must not raise
    # The independent reference: logits and routing in float64 from the router weights.
    logits = F.linear(x.double(), gate.double())
    ids, weights = reference.route(
        logits,
        case.top_k,
        case.score_func,
        bias,
        case.n_group,
        case.topk_group,
        case.renormalize,
        case.scaling,
    )
    expected = reference.moe(x, ids, weights, w13, w2, case.activation)
    if case.overlap:
        expected = expected + x.double() * 0.5
    tied = near_ties(case, logits, bias)
    assert out.shape == x.shape and out.dtype == dtype, (out.shape, out.dtype)
    error = (out.double() - expected).abs().amax(dim=1)
    scale = expected.abs().amax(dim=1).clamp_min(1e-6) if count else error
    bad = (error > RELATIVE_TOLERANCE[dtype] * scale) & ~tied
    if bad.any():
        row = int(bad.nonzero()[0])
        raise AssertionError(
            f"{int(bad.sum())} of {count} rows differ; row {row}: error {float(error[row]):.3e}, "
            f"row scale {float(scale[row]):.3e}, tolerance {RELATIVE_TOLERANCE[dtype]}"
        )
    return {"rows": count - int(tied.sum()), "ties": int(tied.sum())}


def run(rank: int, world: int, init_file: str, results: str, budget: float, seed: int) -> None:
    moe_ep.deadline.set_default(60.0)
    join_group(rank, world, init_file, timeout=300.0)
    groups = {w: dist.new_group(list(range(w))) for w in range(1, world + 1)}
    rng = random.Random(seed)
    start = time.monotonic()
    cases = rows = ties = 0
    by_world = [0] * (world + 1)
    failures = []
    while True:
        if cases % CHECK_EVERY == 0:  # stop together: rank 0's clock decides
            left = torch.tensor([float(time.monotonic() - start < budget)])
            dist.broadcast(left, 0)
            if not left.item():
                break
        case = draw_case(rng, seed * 1_000_000 + cases)
        cases += 1
        if rank >= case.world:
            continue
        by_world[case.world] += 1
        try:
            counts = run_case(case, groups[case.world], rank)
            rows += counts["rows"]
            ties += counts["ties"]
        except Exception as error:  # a mismatch, or an error that must not happen
            failures.append(
                {"case": asdict(case), "error": "".join(traceback.format_exception(error))}
            )
            if isinstance(error, moe_ep.deadline.CollectiveFailure):
                break  # the subgroup is gone: report what was seen
    with open(os.path.join(results, f"rank{rank}.json"), "w") as f:
        json.dump(
            {
                "cases": cases,
                "cases_by_world": by_world,
                "rows": rows,
                "ties": ties,
                "seconds": time.monotonic() - start,
                "failures": failures[:5],
                "failure_count": len(failures),
            },
            f,
        )
    dist.destroy_process_group()


if __name__ == "__main__":  # python tests/fuzz_worker.py [seconds] [seed]
    import tempfile

    from launcher import run_ranks

    budget = float(sys.argv[1]) if len(sys.argv) > 1 else 60.0
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    with tempfile.TemporaryDirectory() as tmp:
        args = (os.path.join(tmp, "init"), tmp, budget, seed)
        print(run_ranks(run, MAX_WORLD, args, timeout=budget + 300))
        for r in range(MAX_WORLD):
            with open(os.path.join(tmp, f"rank{r}.json")) as f:
                print(r, f.read()[:2000])

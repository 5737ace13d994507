"""moe_ep.plan.rebalance_experts, EPLB's interface as a drop-in, against DeepSeek EPLB's
published algorithm (eplb_reference.py, written from its description): the same arguments and
results, never worse on balance, never above EPLB's hierarchical link load under
group-limited routing, lower with co-activation samples of correlated routing."""

import random

import eplb_reference as eplb
import pytest
import torch

from moe_ep import ops
from moe_ep import plan as planner

GPUS_PER_NODE = 8


def random_loads(rng: random.Random, gen: torch.Generator, layers: int, experts: int):
    """Loads of several kinds: lognormal and Zipf weights, small integer counts (ties), some
    experts without load, one expert with nearly all of it."""
    kind = rng.choice(["lognormal", "zipf", "counts", "zeros", "one-hot"])
    if kind == "lognormal":
        sigma = rng.uniform(0.1, 2.5)
        return torch.exp(sigma * torch.randn(layers, experts, generator=gen, dtype=torch.float64))
    if kind == "zipf":
        ranks = torch.stack([torch.randperm(experts, generator=gen) for _ in range(layers)])
        return 1000.0 / (ranks + 1.0) ** rng.uniform(0.3, 2.0)
    if kind == "counts":
        return torch.randint(0, 12, (layers, experts), generator=gen).double()
    if kind == "zeros":
        load = torch.rand(layers, experts, generator=gen, dtype=torch.float64)
        return load * (torch.rand(layers, experts, generator=gen) < 0.5)
    load = torch.full((layers, experts), 0.01, dtype=torch.float64)
    load[:, rng.randrange(experts)] = 1000.0
    return load


def random_case(rng: random.Random) -> tuple[int, int, int, int, int] | None:
    """(experts, replicas, groups, nodes, GPUs) that EPLB accepts, or None."""
    experts = rng.choice([4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256])
    gpus = rng.choice([1, 2, 4, 6, 8, 12, 16, 24, 32, 64])
    nodes = rng.choice([n for n in (1, 2, 3, 4, 8) if gpus % n == 0])
    groups = rng.choice([g for g in (1, 2, 3, 4, 8, 16) if experts % g == 0])
    per_gpu = -(-experts // gpus) + rng.choice([0, 0, 1, 2, 3])
    return experts, per_gpu * gpus, groups, nodes, gpus


def max_gpu_load(phy2log: torch.Tensor, weight: torch.Tensor, gpus: int) -> list[float]:
    """The busiest GPU's load in every layer."""
    return [max(row) for row in eplb.gpu_loads(phy2log, weight, gpus).tolist()]


def test_reference_reproduces_eplb_readme_example():
    # The example in EPLB's README (2 layers, 12 experts, 16 replicas, 4 groups, 2 nodes,
    # 8 GPUs) and the placement it prints: the reference is EPLB's algorithm.
    weight = torch.tensor(
        [
            [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
            [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
        ]
    )
    phy2log, log2phy, logcnt = eplb.rebalance_experts(weight, 16, 4, 2, 8)
    assert phy2log.tolist() == [
        [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
        [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
    ]
    assert logcnt.sum(1).tolist() == [16, 16]
    assert log2phy.shape == (2, 12, int(logcnt.max()))


def test_never_worse_than_eplb_on_balance():
    """Property: on 2,000 random load vectors and shapes (1 to 64 GPUs, 1 to 8 nodes, 1 to
    16 groups, 0 to 3 spare slots per GPU, 1 to 3 layers), the busiest GPU of every layer
    carries no more than under EPLB's algorithm (the mean is the same for both)."""
    rng = random.Random(12)
    gen = torch.Generator().manual_seed(12)
    checked = better = 0
    while checked < 2000:
        experts, replicas, groups, nodes, gpus = random_case(rng)
        layers = rng.choice([1, 1, 1, 2, 3])
        weight = random_loads(rng, gen, layers, experts)
        ours = planner.rebalance_experts(weight, replicas, groups, nodes, gpus)[0]
        theirs = eplb.rebalance_experts(weight, replicas, groups, nodes, gpus)[0]
        ours_max, theirs_max = max_gpu_load(ours, weight, gpus), max_gpu_load(theirs, weight, gpus)
        for mine, bar in zip(ours_max, theirs_max, strict=True):
            case = (experts, replicas, groups, nodes, gpus, weight.tolist())
            assert mine <= bar * (1 + 1e-9) + 1e-12, case
            better += mine < bar * (1 - 1e-6)
        checked += 1
    assert better > 200  # and it is lower on many of them


@pytest.mark.parametrize(
    ("experts", "replicas", "groups", "nodes", "gpus"),
    [(12, 16, 4, 2, 8), (64, 96, 8, 2, 16), (256, 288, 8, 4, 32), (64, 128, 1, 16, 128)],
)
def test_same_results_as_eplb_shapes_dtypes_and_invariants(experts, replicas, groups, nodes, gpus):
    gen = torch.Generator().manual_seed(experts + gpus)
    weight = torch.rand(3, experts, generator=gen) * 100  # float32, as callers pass it
    phy2log, log2phy, logcnt = planner.rebalance_experts(weight, replicas, groups, nodes, gpus)
    ref = eplb.rebalance_experts(weight, replicas, groups, nodes, gpus)
    for ours, theirs in zip((phy2log, log2phy, logcnt), ref, strict=True):
        assert ours.dtype == theirs.dtype == torch.int64
        assert ours.dim() == theirs.dim() and ours.device.type == "cpu"
    assert phy2log.shape == (3, replicas) and logcnt.shape == (3, experts)
    assert log2phy.shape == (3, experts, int(logcnt.max()))
    assert bool((logcnt >= 1).all())  # every expert has a replica
    assert torch.equal(logcnt.sum(1), torch.full((3,), replicas))
    for layer in range(3):
        # logcnt counts phy2log; log2phy lists exactly the slots of each expert, -1 padded.
        assert torch.equal(torch.bincount(phy2log[layer], minlength=experts), logcnt[layer])
        for e in range(experts):
            row = log2phy[layer, e]
            slots = row[: logcnt[layer, e]]
            assert bool((row[logcnt[layer, e] :] == -1).all())
            assert bool((phy2log[layer, slots] == e).all())
            assert len(set(slots.tolist())) == int(logcnt[layer, e])
    # GPU g holds physical experts g * R / G .. : the loads EPLB's callers compute from it.
    assert len(max_gpu_load(phy2log, weight.double(), gpus)) == 3


def test_bad_arguments_name_the_argument():
    weight = torch.ones(2, 16)
    with pytest.raises(ValueError, match="weight"):
        planner.rebalance_experts(torch.ones(16), 16, 1, 1, 4)
    with pytest.raises(ValueError, match="weight"):
        planner.rebalance_experts(-weight, 16, 1, 1, 4)
    with pytest.raises(ValueError, match="num_replicas"):
        planner.rebalance_experts(weight, 18, 1, 1, 4)  # not a multiple of the GPUs
    with pytest.raises(ValueError, match="num_replicas"):
        planner.rebalance_experts(weight, 12, 1, 1, 4)  # fewer than the experts
    with pytest.raises(ValueError, match="num_gpus"):
        planner.rebalance_experts(weight, 16, 1, 3, 4)
    with pytest.raises(ValueError, match="num_nodes"):
        planner.rebalance_experts(weight, 16, 1, 0, 4)
    with pytest.raises(ValueError, match="num_groups"):
        planner.rebalance_experts(weight, 16, 6, 2, 4)  # 6 groups on 2 nodes, 16 experts
    with pytest.raises(ValueError, match="previous"):
        planner.rebalance_experts(weight, 16, 1, 1, 4, previous=torch.zeros(1, 16).long())


def routed(experts: int, top_k: int, seed: int, tokens: int = 2048, **gate) -> torch.Tensor:
    """Top-k ids from moe_ep.ops.route on logits: log-normal popularity + Gumbel noise, plus
    (topics > 0) 3.0 on a random eighth of the experts for each token's topic."""
    topics = gate.pop("topics", 0)
    gen = torch.Generator().manual_seed(seed)
    popularity = torch.randn(experts, generator=gen, dtype=torch.float64)
    uniform = torch.rand(tokens, experts, generator=gen, dtype=torch.float64).clamp_min(1e-12)
    logits = popularity - torch.log(-torch.log(uniform))
    if topics:
        favoured = torch.rand(topics, experts, generator=gen) < 1 / 8
        logits = logits + 3.0 * favoured[torch.randint(topics, (tokens,), generator=gen)]
    ids, _ = ops.route(logits.float(), top_k, **gate)
    return ids.long()


def link_load(phy2log: torch.Tensor, ids: torch.Tensor, gpus: int) -> float:
    """Expected tokens on the busiest directed node pair: one copy of a token per node that
    hosts one of its experts (a replica taken uniformly), origins uniform over the nodes."""
    nodes = gpus // GPUS_PER_NODE
    node = torch.arange(phy2log.numel()) // (phy2log.numel() // nodes)
    replicas = torch.zeros(int(phy2log.max()) + 1, nodes, dtype=torch.float64)
    replicas.index_put_((phy2log, node), torch.ones(phy2log.numel(), dtype=torch.float64), True)
    share = replicas / replicas.sum(1, keepdim=True)
    return float((1 - (1 - share[ids]).prod(1)).sum(0).max()) / nodes


@pytest.mark.parametrize(("experts", "top_k", "topk_group"), [(64, 6, 3), (256, 8, 4)])
@pytest.mark.parametrize("gpus", [16, 32, 64])
def test_group_limited_link_never_above_eplb_hierarchical(experts, top_k, topk_group, gpus):
    # DeepSeek-V3's gate (sigmoid, top-k from topk_group of 8 groups); 2, 4 and 8 nodes
    # divide the 8 groups, so EPLB keeps each group on one node.
    nodes = gpus // GPUS_PER_NODE
    for draw in range(3):
        ids = routed(experts, top_k, draw, score_func="sigmoid", n_group=8, topk_group=topk_group)
        weight = torch.bincount(ids.flatten(), minlength=experts).view(1, -1)
        replicas = experts + (32 if (experts + 32) % gpus == 0 else 0)
        base = eplb.rebalance_experts(weight, replicas, 8, nodes, gpus)[0][0]
        ours = planner.rebalance_experts(weight, replicas, 8, nodes, gpus)[0][0]
        sampled = planner.rebalance_experts(
            weight, replicas, 8, nodes, gpus, coactivation=[ids], topk_group=topk_group
        )[0][0]
        limit = link_load(base, ids, gpus) * (1 + 1e-9)
        assert link_load(ours, ids, gpus) <= limit
        assert link_load(sampled, ids, gpus) <= limit
        bar = max_gpu_load(base.view(1, -1), weight, gpus)[0]
        for phy2log in (ours, sampled):
            assert max_gpu_load(phy2log.view(1, -1), weight, gpus)[0] <= bar * (1 + 1e-9)


@pytest.mark.parametrize(("experts", "gpus", "replicas"), [(64, 64, 64), (256, 128, 256)])
def test_coactivation_cuts_the_link_load_of_correlated_routing(experts, gpus, replicas):
    # Tokens from 16 topics, each favouring an eighth of the experts: with the samples, the
    # busiest node pair carries clearly less than under EPLB on the same loads.
    nodes = gpus // GPUS_PER_NODE
    for draw in range(2):
        ids = routed(experts, 8 if experts == 256 else 6, 100 + draw, topics=16)
        weight = torch.bincount(ids.flatten(), minlength=experts).view(1, -1)
        base = eplb.rebalance_experts(weight, replicas, 1, nodes, gpus)[0][0]
        ours = planner.rebalance_experts(weight, replicas, 1, nodes, gpus, coactivation=[ids])
        assert link_load(ours[0][0], ids, gpus) < 0.85 * link_load(base, ids, gpus)


def test_replan_from_previous_never_worse_as_the_budget_grows():
    gen = torch.Generator().manual_seed(3)
    before = torch.exp(torch.randn(2, 64, generator=gen, dtype=torch.float64))
    after = torch.exp(torch.randn(2, 64, generator=gen, dtype=torch.float64))
    previous = planner.rebalance_experts(before, 96, 1, 2, 16)[0]
    kept = None
    last = [float("inf")] * 2
    for budget in (0, 1, 2, 4, 8, 16, 32, -1):
        phy2log = planner.rebalance_experts(
            after, 96, 1, 2, 16, previous=previous, max_moves=budget
        )[0]
        peak = max_gpu_load(phy2log, after, 16)
        assert all(p <= q * (1 + 1e-9) for p, q in zip(peak, last, strict=True)), budget
        last = peak
        # Copies: (GPU, expert) pairs that the previous placement lacked.
        for layer in range(2):
            old = {(p // 6, int(e)) for p, e in enumerate(previous[layer])}
            new = {(p // 6, int(e)) for p, e in enumerate(phy2log[layer])}
            if budget >= 0:
                assert len(new - old) <= budget
        if budget == 0:
            kept = peak
    assert all(p < q for p, q in zip(last, kept, strict=True))

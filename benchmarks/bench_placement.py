"""Placement planner vs the greedy EPLB-style baseline, and the time of a full-scale plan.

Routed loads come from the package's own gate (moe_ep.ops.route). Both policies get the
same replica counts (highest load per replica first); the baseline
packs slots heaviest-first into the lightest GPU and stops there, the planner also swaps
slots between GPUs and assigns GPU contents to nodes (csrc/core/placement.h). Figures per
MoE layer step: max/mean GPU load (the straggler factor) and the busiest node's
inter-node link load in tokens per NIC, both under the traffic model of placement.h.

    python benchmarks/bench_placement.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from moe_ep import ops
from moe_ep import plan as planner
from moe_ep.plan import Cluster, Model

EXPERT = planner.gated_ffn_bytes(7168, 2048)
LAYERS = 4  # MoE layers per sweep point (every layer gets its own loads)
TOKENS = 8192  # tokens per step in the routed loads


def model(experts: int, top_k: int, moe_layers: int = LAYERS) -> Model:
    return Model(moe_layers + 3, (0, 1, 2), experts, top_k, EXPERT, 0.0)


def gate(experts: int) -> dict:
    """The route options of a model family: DeepSeek-V3's sigmoid top-k limited to 4 of 8
    expert groups for 256 experts, a plain softmax top-k otherwise."""
    if experts == 256:
        return {"score_func": "sigmoid", "n_group": 8, "topk_group": 4}
    return {"score_func": "softmax"}


def routed_stats(
    experts: int, top_k: int, skew: float, seed: int, layers: int = LAYERS, tokens: int = TOKENS
) -> tuple[list[list[float]], list[list[list[int]]]]:
    """Loads and co-activation samples recorded from the package's own gate: moe_ep.ops.route
    (see gate()) on random logits plus a per-expert skew (skew * log Zipf weight, ranks
    shuffled) and a per-token preference for one of 8 random expert sets (experts of a set
    co-activate, as trained routers show); loads counted with torch.bincount."""
    gen = torch.Generator().manual_seed(seed)
    loads, samples = [], []
    for _ in range(layers):
        rank = torch.randperm(experts, generator=gen).double()
        bias = -skew * torch.log1p(rank)
        group = torch.randperm(experts, generator=gen) % 8
        topic = torch.randn(tokens, 8, generator=gen, dtype=torch.float64)
        logits = torch.randn(tokens, experts, generator=gen, dtype=torch.float64)
        logits = (logits + bias + 2.0 * topic[:, group]).float()
        ids, _ = ops.route(logits, top_k, **gate(experts))
        loads.append(torch.bincount(ids.flatten().long(), minlength=experts).double().tolist())
        samples.append(ids.tolist())
    return loads, samples


def compare(m: Model, cluster: Cluster, loads, coactivation=None) -> tuple[float, ...]:
    ours = planner.plan(m, cluster, loads=loads, coactivation=coactivation)
    base = planner.plan(m, cluster, loads=loads, coactivation=coactivation, policy="greedy")

    def figures(p):
        layers = [layer.metrics for layer in p.moe_layers]
        imbalance = statistics.mean(x.imbalance for x in layers)
        return imbalance, max(x.max_link_load for x in layers)

    (oi, ol), (bi, bl) = figures(ours), figures(base)
    return oi, bi, ol, bl


def sweep(coactivation: bool) -> None:
    kind = "routed (moe_ep.ops.route), with co-activation" if coactivation else "Zipf"
    print(f"\n{kind} loads; mean over {LAYERS} layers of max/mean GPU load; max link load")
    header = (
        f"{'experts':>7} {'top_k':>5} {'GPUs':>5} {'skew':>4} | {'max/mean ours':>13} "
        f"{'greedy':>7} {'ratio':>6} | {'link ours':>9} {'greedy':>8} {'ratio':>6}"
    )
    print(header)
    print("-" * len(header))
    for experts, top_k, nodes in [(64, 2, 16), (256, 8, 4), (256, 8, 8), (256, 8, 40)]:
        m, cluster = model(experts, top_k), Cluster(num_nodes=nodes)
        for skew in (0.0, 0.5, 1.0, 1.5):
            if coactivation:
                loads, samples = routed_stats(experts, top_k, skew, seed=nodes)
            else:
                loads = planner.zipf_loads(LAYERS, experts, skew, seed=nodes)
                samples = None
            oi, bi, ol, bl = compare(m, cluster, loads, samples)
            print(
                f"{experts:>7} {top_k:>5} {cluster.num_gpus:>5} {skew:>4} | {oi:>13.3f} "
                f"{bi:>7.3f} {oi / bi:>6.3f} | {ol:>9.1f} {bl:>8.1f} {ol / bl:>6.3f}"
            )


def full_scale_time(repeats: int) -> None:
    m = model(256, 8, moe_layers=58)
    cluster = Cluster(num_nodes=488)
    loads = planner.zipf_loads(58, 256, 1.0)
    print(f"\n61 layers (58 MoE) x 256 experts on {cluster.num_gpus} GPUs, Zipf 1.0 loads")
    for policy in ("balanced", "greedy"):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            placement = planner.plan(m, cluster, loads=loads, policy=policy)
            times.append(time.perf_counter() - start)
        worst = max(layer.metrics.imbalance for layer in placement.moe_layers)
        link = max(layer.metrics.max_link_load for layer in placement.moe_layers)
        print(
            f"{policy:>8}: best {min(times):.3f} s of {repeats} (median "
            f"{statistics.median(times):.3f} s); worst max/mean {worst:.3f}; max link {link:.1f}"
        )
    # With co-activation samples on every layer (the search's cost): the same plan.
    loads, samples = routed_stats(256, 8, 1.0, seed=1, layers=58, tokens=4096)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        placement = planner.plan(m, cluster, loads=loads, coactivation=samples)
        times.append(time.perf_counter() - start)
    worst = max(layer.metrics.imbalance for layer in placement.moe_layers)
    link = max(layer.metrics.max_link_load for layer in placement.moe_layers)
    print(
        f"balanced with 4,096 routed co-activation samples per layer: best {min(times):.3f} s "
        f"of {repeats} (median {statistics.median(times):.3f} s); worst max/mean {worst:.3f}; "
        f"max link {link:.2f}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3, help="timed runs of the full-scale plan")
    args = p.parse_args()
    sweep(coactivation=False)
    sweep(coactivation=True)
    full_scale_time(args.repeats)


if __name__ == "__main__":
    main()

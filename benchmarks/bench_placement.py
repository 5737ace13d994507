"""moe_ep's planner side by side with DeepSeek EPLB's algorithm, on the same loads and the
same sampled routings, and the time of a full-scale plan.

Routings (tokens through moe_ep.ops.route, seeded): per-expert popularity from Zipf(1.0)
ranks or lognormal(sigma=1) weights, plus Gumbel noise per token, so that top-k draws
experts in proportion to popularity:
  independent   softmax top-k (64 experts: top-6, 256 experts: top-8);
  group-limited DeepSeek-V3's gate: sigmoid scores, top-k from 3 of 8 (64 experts) or 4 of
                8 (256 experts) expert groups of consecutive ids;
  correlated    a mixture of 16 topics: every token belongs to one, which adds 3.0 to the
                logits of its topic's experts (a random eighth of them), softmax top-k.
Loads are the routed (token, expert) counts. EPLB (tests/eplb_reference.py, its published
algorithm) gets the loads and num_groups = 8 for group-limited routing, 1 otherwise, as a
serving stack passes them; moe_ep.plan.rebalance_experts gets the same arguments ("ours"),
and once more with the routed samples as co-activation ("ours + samples").

Figures per layer step: max/mean GPU load (an expert's load split evenly over its
replicas) and the maximum inter-node link load: tokens per directed node pair, one copy per
destination node that hosts one of the token's experts (a replica taken at random, as the
dispatcher spreads them), in expectation over the token's origin, which is uniform over the
nodes (attention runs data parallel): pair (n, m) carries sum over tokens of P(m hit) / nodes.

    python benchmarks/bench_placement.py                 # the sweep, the sample counts, the timing
    python benchmarks/bench_placement.py --eplb DIR      # also time EPLB's own eplb.py from DIR
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe_ep import ops  # noqa: E402
from moe_ep import plan as planner  # noqa: E402
from tests import eplb_reference  # noqa: E402

GPUS_PER_NODE = 8
TOKENS = 4096
TOPICS = 16


def gate(experts: int, routing: str) -> tuple[int, dict, int]:
    """(top_k, route options, num_groups passed to the balancers) of a routing."""
    top_k = 6 if experts == 64 else 8
    if routing == "group-limited":
        return (
            top_k,
            {"score_func": "sigmoid", "n_group": 8, "topk_group": 3 if experts == 64 else 4},
            8,
        )
    return top_k, {"score_func": "softmax"}, 1


def routed(experts: int, routing: str, popularity: str, seed: int, tokens: int = TOKENS):
    """Top-k expert ids [tokens, top_k] from moe_ep.ops.route (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    if popularity == "zipf":
        rank = torch.randperm(experts, generator=gen).double()
        log_pop = -torch.log1p(rank)
    else:
        log_pop = torch.randn(experts, generator=gen, dtype=torch.float64)
    uniform = torch.rand(tokens, experts, generator=gen, dtype=torch.float64).clamp_min(1e-12)
    logits = log_pop - torch.log(-torch.log(uniform))  # + Gumbel noise
    if routing == "correlated":
        topic_of_token = torch.randint(TOPICS, (tokens,), generator=gen)
        favoured = torch.rand(TOPICS, experts, generator=gen) < 1 / 8
        logits = logits + 3.0 * favoured[topic_of_token].double()
    top_k, options, _ = gate(experts, routing)
    ids, _ = ops.route(logits.float(), top_k, **options)
    return ids.long()


def link_load(phy2log: torch.Tensor, ids: torch.Tensor, num_gpus: int) -> float:
    """The largest expected token count over directed node pairs (see the docstring)."""
    nodes = num_gpus // GPUS_PER_NODE
    if nodes < 2:
        return 0.0
    per_gpu = phy2log.numel() // num_gpus
    experts = max(int(ids.max()), int(phy2log.max())) + 1
    node_of_slot = torch.arange(phy2log.numel()) // (per_gpu * GPUS_PER_NODE)
    replicas = torch.zeros(experts, nodes, dtype=torch.float64)
    ones = torch.ones(phy2log.numel(), dtype=torch.float64)
    replicas.index_put_((phy2log, node_of_slot), ones, accumulate=True)
    share = replicas / replicas.sum(1, keepdim=True)
    hit = 1 - (1 - share[ids]).prod(1)  # [tokens, nodes]: P(the token needs node m)
    return float(hit.sum(0).max()) / nodes


def imbalance(phy2log: torch.Tensor, weight: torch.Tensor, num_gpus: int) -> float:
    loads = eplb_reference.gpu_loads(phy2log.view(1, -1), weight.view(1, -1), num_gpus)
    return float(loads.max() / loads.mean())


def ratio(rows: list[tuple[float, ...]], i: int, j: int) -> str:
    """Column i over column j: the mean and, in brackets, the worst (largest) over the rows."""
    values = [r[i] / r[j] if r[j] else 1.0 for r in rows]
    return f"{statistics.mean(values):.3f} [{max(values):.3f}]"


def shapes() -> list[tuple[int, int, int]]:
    """(experts, GPUs, replicas): 0 and 32 redundant slots where EPLB takes them (replicas
    a multiple of GPUs), one slot per GPU where the experts are fewer than the GPUs."""
    out = []
    for experts in (64, 256):
        for gpus in (16, 32, 64, 128, 256):
            options = [r for r in (experts, experts + 32) if r % gpus == 0] or [gpus]
            out += [(experts, gpus, r) for r in options]
    return out


def sweep(draws: int) -> None:
    print(
        f"\nSweep: {TOKENS} tokens per draw, {draws} draws per row (popularity alternating Zipf "
        "and lognormal); ratios ours / EPLB, mean [worst] over the draws"
    )
    header = (
        f"{'routing':>13} {'E':>4} {'GPUs':>4} {'red':>4} | {'max/mean EPLB':>13} {'ours':>6} "
        f"{'ratio':>14} | {'link EPLB':>9} {'ours':>7} {'ratio':>14} | {'+samples':>8} "
        f"{'ratio':>14}"
    )
    print(header)
    print("-" * len(header))
    for routing in ("independent", "group-limited", "correlated"):
        for experts, gpus, replicas in shapes():
            rows = []
            for draw in range(draws):
                popularity = "zipf" if draw % 2 == 0 else "lognormal"
                ids = routed(experts, routing, popularity, seed=1000 * draw + experts + gpus)
                weight = torch.bincount(ids.flatten(), minlength=experts).double().view(1, -1)
                _, _, groups = gate(experts, routing)
                nodes = gpus // GPUS_PER_NODE
                base = eplb_reference.rebalance_experts(weight, replicas, groups, nodes, gpus)[0][0]
                ours = planner.rebalance_experts(weight, replicas, groups, nodes, gpus)[0][0]
                with_samples = planner.rebalance_experts(
                    weight, replicas, groups, nodes, gpus, coactivation=[ids]
                )[0][0]
                rows.append(
                    (
                        imbalance(base, weight, gpus),
                        imbalance(ours, weight, gpus),
                        link_load(base, ids, gpus),
                        link_load(ours, ids, gpus),
                        link_load(with_samples, ids, gpus),
                    )
                )
            mean = [statistics.mean(column) for column in zip(*rows, strict=True)]
            print(
                f"{routing:>13} {experts:>4} {gpus:>4} {replicas - experts:>4} | {mean[0]:>13.3f} "
                f"{mean[1]:>6.3f} {ratio(rows, 1, 0):>14} | {mean[2]:>9.1f} {mean[3]:>7.1f} "
                f"{ratio(rows, 3, 2):>14} | {mean[4]:>8.1f} {ratio(rows, 4, 2):>14}"
            )


def sample_counts(draws: int) -> None:
    print(
        "\nCo-activation samples the planner needs (correlated routing): the planner gets the "
        f"first S samples, the link load is measured on {2 * TOKENS} other tokens; ratio to EPLB"
    )
    counts = (0, 256, 1024, 4096)
    print(f"{'E':>4} {'GPUs':>4} {'red':>4} | " + " ".join(f"{'S=' + str(s):>8}" for s in counts))
    for experts, gpus, replicas in [(64, 16, 96), (64, 64, 64), (256, 32, 288), (256, 128, 256)]:
        ratios = {s: [] for s in counts}
        for draw in range(draws):
            popularity = "zipf" if draw % 2 == 0 else "lognormal"
            ids = routed(experts, "correlated", popularity, seed=77 + draw, tokens=3 * TOKENS)
            history, fresh = ids[:TOKENS], ids[TOKENS:]
            weight = torch.bincount(history.flatten(), minlength=experts).double().view(1, -1)
            nodes = gpus // GPUS_PER_NODE
            base = link_load(
                eplb_reference.rebalance_experts(weight, replicas, 1, nodes, gpus)[0][0],
                fresh,
                gpus,
            )
            for s in counts:
                samples = [history[:s]] if s else None
                ours = planner.rebalance_experts(
                    weight, replicas, 1, nodes, gpus, coactivation=samples
                )
                ratios[s].append(link_load(ours[0][0], fresh, gpus) / base)
        cells = " ".join(f"{statistics.mean(ratios[s]):>8.3f}" for s in counts)
        print(f"{experts:>4} {gpus:>4} {replicas - experts:>4} | {cells}")


def full_scale(repeats: int, eplb_dir: str | None) -> None:
    layers, experts, gpus = 61, 256, 3904
    nodes = gpus // GPUS_PER_NODE
    weight = torch.stack(
        [
            torch.bincount(
                routed(experts, "group-limited", "zipf", seed=s, tokens=TOKENS).flatten(),
                minlength=experts,
            )
            for s in range(layers)
        ]
    ).double()
    print(
        f"\nFull scale: {layers} layers x {experts} experts on {gpus} GPUs ({nodes} nodes), "
        f"{gpus} slots per layer, num_groups 8; best of {repeats}"
    )
    candidates = {
        "moe_ep rebalance_experts": lambda: planner.rebalance_experts(weight, gpus, 8, nodes, gpus)
    }
    if eplb_dir:
        sys.path.insert(0, eplb_dir)
        eplb = importlib.import_module("eplb")
        candidates["EPLB eplb.py (its repository)"] = lambda: eplb.rebalance_experts(
            weight, gpus, 8, nodes, gpus
        )
    candidates["EPLB reference (tests/)"] = lambda: eplb_reference.rebalance_experts(
        weight, gpus, 8, nodes, gpus
    )
    for name, run in candidates.items():
        times = []
        for _ in range(1 if "reference" in name else repeats):
            start = time.perf_counter()
            phy2log = run()[0]
            times.append(time.perf_counter() - start)
        worst = max(imbalance(phy2log[i], weight[i], gpus) for i in range(layers))
        print(f"{name:>32}: {min(times):.3f} s; worst max/mean {worst:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--draws", type=int, default=4, help="random draws per sweep row")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of the full-scale plan")
    p.add_argument("--eplb", help="a folder holding EPLB's eplb.py, to time it as well")
    p.add_argument("--only", choices=("sweep", "samples", "time"), help="run one part")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.only in (None, "sweep"):
        sweep(args.draws)
    if args.only in (None, "samples"):
        sample_counts(args.draws)
    if args.only in (None, "time"):
        full_scale(args.repeats, args.eplb)


if __name__ == "__main__":
    main()

"""Runtime load balancing of one expert-parallel MoELayer under Zipf-skewed routing, and
what re-planning costs in weight copies for a few move budgets:

    phase       start: from the contiguous placement; drift: the preference is reshuffled
                (other experts run hot) and the balancer re-plans from its own placement
    imbalance   max/mean rank load of the observed window under the current placement
                (before), under the re-planned one (after), and of a fresh window routed
                after the migration (realised: the same distribution, new samples)
    migrated    expert copies that travelled and their MB (group total)
    fresh plan  the imbalance and copies of a plan from scratch for the same loads (the
                planner without the current placement: what a re-plan cost before)
    time        planning and migration, slowest rank

    torchrun --standalone --nproc-per-node 4 benchmarks/bench_balance.py            # CPU, Gloo

Routing is synthetic: every rank draws its top-k ids from the same Zipf(s) preference over a
fixed shuffle of the experts (what observe() sees from a skewed gate), so the figures depend
only on the skew, not on a trained router.
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from moe_ep import LoadBalancer, MoELayer, plan
from moe_ep.balance import migration_transfers
from moe_ep.placement import ExpertPlacement


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--tokens", type=int, default=512, help="tokens per rank and step")
    p.add_argument("--window", type=int, default=8, help="steps observed before re-planning")
    p.add_argument("--zipf", type=float, nargs="+", default=[0.5, 1.0, 1.5])
    p.add_argument(
        "--max-moves", type=int, nargs="+", default=[-1, 16, 8], help="budgets (-1: no limit)"
    )
    return p.parse_args()


def zipf_ids(
    steps: int, tokens: int, experts: int, top_k: int, skew: float, seed: int, shuffle: int = 0
):
    """Per step [tokens, top_k] distinct experts, preference 1 / rank^skew (shuffled)."""
    preference = 1.0 / torch.arange(1, experts + 1, dtype=torch.float64) ** skew
    order = torch.randperm(experts, generator=torch.Generator().manual_seed(shuffle))
    preference = preference[order]
    g = torch.Generator().manual_seed(seed)
    return [
        torch.multinomial(preference.expand(tokens, -1), top_k, generator=g) for _ in range(steps)
    ]


def max_ms(start: float) -> float:
    elapsed = torch.tensor([(time.perf_counter() - start) * 1e3])
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed)


def fresh_plan(balancer: LoadBalancer, args: argparse.Namespace, world: int) -> ExpertPlacement:
    """The planner's plan from scratch for the balancer's window (no current placement)."""
    planned = plan.plan(
        plan.Model(1, (), args.experts, args.topk, bytes_per_expert=1.0),
        balancer.cluster,
        loads=[balancer.expert_loads().tolist()],
    ).layers[0]
    return ExpertPlacement.from_plan(planned, world)


def main() -> None:
    args = parse_args()
    dist.init_process_group("gloo", timeout=timedelta(minutes=10))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    if rank == 0:
        print(
            f"world {world}, E {args.experts}, k {args.topk}, H {args.hidden}, F {args.ffn}, "
            f"fp32, {args.tokens} tokens/rank/step, window {args.window}"
        )
        print(
            "| zipf s | max_moves | phase | before | after | realised | slots | copies | "
            "MB moved | fresh plan: after | fresh plan: copies | plan ms | migrate ms |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for skew in args.zipf:
        for budget in args.max_moves:
            layer = MoELayer(
                args.hidden,
                args.ffn,
                args.experts,
                args.topk,
                dtype=torch.float32,
                group=dist.group.WORLD,
            )
            balancer = LoadBalancer(layer, window=args.window, threshold=1.0001, max_moves=budget)
            for phase, shuffle in (("start", 0), ("drift", 1)):
                steps = zipf_ids(
                    2 * args.window, args.tokens, args.experts, args.topk, skew, rank, shuffle
                )
                for ids in steps[: args.window]:
                    balancer.observe(ids)
                before = balancer.imbalance()
                start = time.perf_counter()
                new = balancer.plan()
                plan_ms = max_ms(start)
                fresh = fresh_plan(balancer, args, world)
                fresh_copies = len(migration_transfers(layer.placement, fresh))
                fresh_after = balancer.imbalance(fresh)
                start = time.perf_counter()
                migration = balancer.maybe_rebalance()
                migrate_ms = max_ms(start)
                assert migration is not None and layer.placement.slot_rank.equal(new.slot_rank)
                for ids in steps[args.window :]:  # a fresh window under the new placement
                    balancer.observe(ids)
                realised = balancer.imbalance()
                if rank == 0:
                    print(
                        f"| {skew} | {budget} | {phase} | {before:.3f} | "
                        f"{migration.imbalance_after:.3f} | {realised:.3f} | "
                        f"{layer.placement.num_slots} | {len(migration.transfers)} | "
                        f"{migration.bytes / 1e6:.1f} | {fresh_after:.3f} | {fresh_copies} | "
                        f"{plan_ms:.1f} | {migrate_ms:.1f} |"
                    )
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()

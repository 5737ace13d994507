"""Serving through re-plans: the step time of one expert-parallel MoELayer before, during and
after its weights migrate, with the migration synchronous (serving waits for it at a step
boundary) and in the background (serving goes on with the old placement), side by side in
one run, under a routing skew that shifts.

Each path serves the same timeline: Zipf(s) routing over a shuffled preference of the
experts; the balancer counts on the device and considers a re-plan every `window` steps
(threshold); `--shift-after` windows after the first migration's switch (so at a window
boundary of every path) the preference is reshuffled (other experts run hot), which forces a
second re-plan from the balancer's own placement (the same slot count: the arrivals are
copied in place at the switch; the first re-plan adds replica slots and rebuilds the
weights). A timeline ends a window after its second migration. The paths run one after
the other in the same processes, `--repeats` times in alternation, so they share the
machine's conditions.

    path        sync: background=False; background: unpaced rounds of --piece-mb;
                paced: one round per serving step
    live after  steps from the boundary that started the migration to the one that switched
    moved       expert copies and their MB (group total); spare: the most any rank held
    imbalance   max/mean rank load of the window behind the re-plan, before and (planned)
                after; realised: the next window's routing under the new placement
    step ms     slowest rank per step: median and max of the steady steps before the
                migration (the noise floor); the step whose boundary started it (planning;
                for sync the whole transfer); the steps after it until the switch (median,
                max); median after
    vote, switch  the boundary alone (balancer.step()): median over the steps between the
                start and the switch (one vote read and cast), and at the switch (for sync
                the whole migration)
    lost ms     serving time the migration cost: the steps from the start to the switch
                minus as many steady medians
    ratio       the slowest step from the start to the switch over the steady median

    torchrun --standalone --nproc-per-node 4 benchmarks/bench_balance.py            # CPU, Gloo

Routing is synthetic (top-k ids drawn per rank from the same preference, weights 1/k), so the
figures depend on the skew, not on a trained router; the layer runs its real dispatch,
experts and combine on those ids.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
from common import environment, init_distributed, synchronize

from moe_ep import LoadBalancer, MoELayer

PATHS = {
    "sync": {"background": False},
    "background": {},
    "paced": {"rounds_per_step": 1},
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--tokens", type=int, default=128, help="tokens per rank and step")
    p.add_argument("--window", type=int, default=8, help="steps per count reduction")
    p.add_argument("--threshold", type=float, default=1.1)
    p.add_argument("--zipf", type=float, default=1.2)
    p.add_argument("--max-steps", type=int, default=80)
    p.add_argument(
        "--shift-after", type=int, default=2, help="windows after the first switch to shift"
    )
    p.add_argument("--piece-mb", type=float, default=4.0, help="transfer round size per pair")
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    p.add_argument("--repeats", type=int, default=2)
    return p.parse_args()


def preference(experts: int, skew: float, shuffle: int) -> torch.Tensor:
    weights = 1.0 / torch.arange(1, experts + 1, dtype=torch.float64) ** skew
    return weights[torch.randperm(experts, generator=torch.Generator().manual_seed(shuffle))]


def serve(args, path: str, device: torch.device, seed: int) -> dict:
    """One timeline; returns per-step times (slowest rank), the migrations and what the
    realised imbalance needs."""
    rank = dist.get_rank()
    layer = MoELayer(
        args.hidden, args.ffn, args.experts, args.topk, dtype=torch.float32, device=device,
        group=dist.group.WORLD,
    )  # fmt: skip
    balancer = LoadBalancer(
        layer,
        window=args.window,
        threshold=args.threshold,
        piece_bytes=int(args.piece_mb * 2**20),
        **PATHS[path],
    )
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    x = torch.randn(args.tokens, args.hidden, generator=g).to(device)
    weights = torch.full((args.tokens, args.topk), 1.0 / args.topk, device=device)
    times, counts, placements, migrations = [], [], {}, []
    shift_at = None  # `shift_after` windows after the first switch: a clean window follows
    for step in range(args.max_steps):
        done = len(migrations) >= 2 and step > migrations[1].ended_step + args.window + 1
        if done and not balancer.migrating:
            break
        shuffle = 0 if shift_at is None or step < shift_at else 1
        prefer = preference(args.experts, args.zipf, shuffle)
        ids = torch.multinomial(prefer.expand(args.tokens, -1), args.topk, generator=g)
        counts.append(torch.bincount(ids.view(-1), minlength=args.experts))
        synchronize(device)
        start = time.perf_counter()
        layer.experts(x, ids.to(device), weights)
        boundary = time.perf_counter()
        migration = balancer.step()
        synchronize(device)
        end = time.perf_counter()
        times.append([(end - start) * 1e3, (end - boundary) * 1e3])
        if migration is not None:
            migrations.append(migration)
            placements[balancer.steps] = layer.placement.to("cpu")
            if shift_at is None and migration.live:
                shift_at = balancer.steps + args.shift_after * args.window
    slowest = torch.tensor(times)  # [steps, (step, boundary)]
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    total = torch.stack(counts)
    dist.all_reduce(total)
    spare = torch.tensor([m.spare_bytes for m in migrations] or [0])
    dist.all_reduce(spare, op=dist.ReduceOp.MAX)
    return {
        "times": slowest[:, 0].tolist(),
        "boundaries": slowest[:, 1].tolist(),
        "counts": total,
        "placements": placements,
        "migrations": migrations,
        "spare": spare.tolist(),
    }


def rows_of(args, path: str, repeat: int, run: dict) -> list[dict]:
    times, rows = run["times"], []
    busy = set()  # steps (1-based, the boundary at their end) from a start to a switch
    for m in run["migrations"]:
        busy.update(range(m.started_step, m.ended_step + 1))
    previous_end = 2  # the first two steps warm up
    for number, (m, spare) in enumerate(zip(run["migrations"], run["spare"], strict=False)):
        # Steady: since the previous migration's switch (the same placement as this start).
        steady_before = [
            times[s - 1] for s in range(previous_end + 1, m.started_step) if s not in busy
        ]
        previous_end = m.ended_step
        after_end = m.ended_step + 1 + args.window
        steady_after = [
            times[s - 1] for s in range(m.ended_step + 1, min(after_end, len(times) + 1))
            if s not in busy
        ]  # fmt: skip
        during = [times[s - 1] for s in range(m.started_step + 1, m.ended_step + 1)]
        votes = [run["boundaries"][s - 1] for s in range(m.started_step + 1, m.ended_step)]
        realised = None
        if m.live and after_end <= len(times) + 1:
            window = run["counts"][m.ended_step : after_end - 1].sum(0)
            loads = run["placements"][m.ended_step].rank_loads(window)
            realised = float(loads.max() / loads.mean())
        base = statistics.median(steady_before) if steady_before else float("nan")
        worst = max([times[m.started_step - 1]] + during)
        rows.append(
            {
                "path": path,
                "rep": repeat,
                "#": number + 1,
                "start": m.started_step,
                "live after": m.ended_step - m.started_step if m.live else "abandoned",
                "copies": len(m.transfers),
                "MB moved": m.bytes / 1e6,
                "spare MB": spare / 1e6,
                "before": m.imbalance_before,
                "planned": m.imbalance_after,
                "realised": realised,
                "steady ms": base,
                "steady max": max(steady_before) if steady_before else None,
                "start ms": times[m.started_step - 1],
                "during ms": statistics.median(during) if during else None,
                "max during": max(during) if during else None,
                "after ms": statistics.median(steady_after) if steady_after else None,
                "vote ms": statistics.median(votes) if votes else None,
                "switch ms": run["boundaries"][m.ended_step - 1],
                "lost ms": sum(
                    times[s - 1] - base for s in range(m.started_step, m.ended_step + 1)
                ),
                "ratio": worst / base,
            }
        )
    return rows


COLUMNS = [
    "path", "rep", "#", "start", "live after", "copies", "MB moved", "spare MB", "before",
    "planned", "realised", "steady ms", "steady max", "start ms", "during ms", "max during",
    "after ms", "vote ms", "switch ms", "lost ms", "ratio",
]  # fmt: skip


def cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if value < 10 else f"{value:.1f}"
    return str(value)


def main() -> None:
    args = parse_args()
    rank, world, device = init_distributed()
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    rows = []
    for repeat in range(args.repeats):
        for path in args.paths:
            run = serve(args, path, device, seed=repeat)
            rows += rows_of(args, path, repeat, run)
    if rank == 0:
        env = environment(device)
        expert_mb = 3 * args.hidden * args.ffn * 4 / 1e6
        print(
            f"{env['device']}; torch {env['torch']}; {env['date']}; world {world}; "
            f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after\n"
            f"E {args.experts}, k {args.topk}, H {args.hidden}, F {args.ffn} (fp32, "
            f"{expert_mb:.2f} MB per expert), {args.tokens} tokens/rank/step, window "
            f"{args.window}, threshold {args.threshold}, zipf {args.zipf}, shift "
            f"{args.shift_after} windows after the first switch, piece {args.piece_mb} MB\n"
        )
        print("| " + " | ".join(COLUMNS) + " |")
        print("|" + "---|" * len(COLUMNS))
        for row in rows:
            print("| " + " | ".join(cell(row[c]) for c in COLUMNS) + " |")
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()

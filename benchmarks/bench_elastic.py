"""Recovery from a rank's death (moe_ep.elastic) on CPU/Gloo: a world-W group serves the
example's two-layer block (moe_ep/examples/elastic_serving.py: exact size, then fixed capacity),
one rank exits (os._exit) at a step, the survivors recover and keep serving; every step of
every survivor is checked against the float64 reference (tests/elastic_worker.py).

    death to first correct  from the victim's exit to the first survivor's first correct
                            answer after it (wall clock, one machine)
    recovery                ElasticEP's own part (new group, re-plan, weights), slowest
                            survivor; the rest is mostly the roll call's grace period, which
                            waits that long for a rank that never answers
    steps lost              survivors' steps with no correct answer (retried steps count as
                            answered); the victim's own requests are gone with it
    copied, restored        expert copies received from survivors / taken from the host copy,
                            all survivors and both layers

    python3 benchmarks/bench_elastic.py --worlds 4 8 --deadlines 60 10
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the tests' workers import their helpers by name
from common import environment, format_table  # noqa: E402

from moe_ep import deadline  # noqa: E402
from tests.elastic_worker import run  # noqa: E402
from tests.launcher import run_ranks  # noqa: E402

STEPS, FAULT_STEP = 8, 3


def measure(world: int, kind: str, when: str, seconds: float) -> dict:
    victim = world - 2
    with tempfile.TemporaryDirectory() as results:
        args = (os.path.join(results, "init"), results, kind, "die", when, [victim], STEPS)
        codes, _ = run_ranks(run, world, (*args, [FAULT_STEP], seconds), timeout=300)
        if codes != [0] * world:
            raise RuntimeError(f"world {world} {kind} {when}: exit codes {codes}")
        reports = {}
        for rank in range(world):
            with open(os.path.join(results, f"rank{rank}.json")) as f:
                reports[rank] = json.load(f)
    survivors = [r for r in range(world) if r != victim]
    died = reports[victim]["died"]
    answered = [{e["step"] for e in reports[r]["log"] if e.get("correct")} for r in survivors]
    first_after = min(
        e["done"] for r in survivors for e in reports[r]["log"] if e["step"] == FAULT_STEP
    )
    recoveries = [reports[r]["recoveries"][0] for r in survivors]
    return {
        "world": world,
        "placement": kind,
        "when": when,
        "deadline s": seconds,
        "grace s": deadline.grace(seconds),
        "death to first correct s": first_after - died,
        "recovery s": max(r["seconds"] for r in recoveries),
        "steps lost": sum(STEPS - len(steps) for steps in answered),
        "copied": sum(r["copied"] for r in recoveries),
        "restored": sum(r["restored"] for r in recoveries),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", type=int, nargs="+", default=[4, 8])
    p.add_argument("--deadlines", type=float, nargs="+", default=[60.0])
    p.add_argument("--placements", nargs="+", default=["replicas", "contiguous"])
    p.add_argument("--when", nargs="+", default=["between", "middle"])
    args = p.parse_args()
    print(environment(torch.device("cpu")))
    rows = [
        measure(world, kind, when, seconds)
        for seconds in args.deadlines
        for world in args.worlds
        for kind in args.placements
        for when in args.when
    ]
    print(format_table(rows, list(rows[0])))


if __name__ == "__main__":
    main()

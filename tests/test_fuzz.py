"""Fuzzing expert parallelism against an independent float64 reference (tests/fuzz_worker.py):
eight ranks start once and run random cases (worlds 1 to 8, token counts with 0, top-k,
placements with replicas and empty ranks, skewed and adversarial routing, both dispatch
modes, overflow with fallback, chunk counts, an overlap hook, three dtypes) for BUDGET seconds
of rank 0's clock; the reference routes from the router weights in float64, never from the
layer's routing. MOE_EP_FUZZ_SECONDS and MOE_EP_FUZZ_SEED change the budget and the seed
(seeds are fixed per run, so a failure reproduces: the failing case is printed whole)."""

import json
import os

from fuzz_worker import MAX_WORLD, run
from launcher import run_ranks

BUDGET = float(os.environ.get("MOE_EP_FUZZ_SECONDS", "150"))
SEED = int(os.environ.get("MOE_EP_FUZZ_SEED", "15"))
MIN_CASES = 1000  # at the budget's default on the loaded 2-core CI machine: about 2,000


def test_fuzz_against_the_float64_reference(tmp_path):
    args = (str(tmp_path / "init"), str(tmp_path), BUDGET, SEED)
    codes, seconds = run_ranks(run, MAX_WORLD, args, timeout=BUDGET + 300)
    assert codes == [0] * MAX_WORLD, codes
    reports = []
    for rank in range(MAX_WORLD):
        with open(tmp_path / f"rank{rank}.json") as f:
            reports.append(json.load(f))
    failures = [failure for report in reports for failure in report["failures"]]
    assert not failures, json.dumps(failures[0], indent=1)
    cases = reports[0]["cases"]
    rows = sum(report["rows"] for report in reports)
    ties = sum(report["ties"] for report in reports)
    by_world = reports[0]["cases_by_world"][1:]  # rank 0 takes part in every case
    print(
        f"\nfuzz: {cases} cases in {seconds:.0f} s (seed {SEED}), cases by world 1..8 {by_world}, "
        f"{rows} output rows compared, {ties} near-tie rows left out"
    )
    assert cases >= MIN_CASES

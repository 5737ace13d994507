"""Serving survives a rank's death (elastic expert parallelism, moe_ep.elastic): a world-4 Gloo
group serves a two-layer block (exact size, then fixed capacity); one rank dies between two
steps or in the middle of one, or stalls past the deadline. The survivors agree on the lost
rank, form a group of three, re-plan with the planner, copy the experts that moved from a
survivor's replica (a fault-tolerant placement) or take an expert whose only copy died from
the host-side copy, retry the step and go on: every step of every survivor equals the float64
reference and none is lost. The deadline is lowered to 2 s. About 10 s a scenario."""

import json

import pytest
from elastic_worker import run
from launcher import run_ranks

WORLD, STEPS, FAULT_STEP, DEADLINE = 4, 6, 3, 2.0

SCENARIOS = [
    ("replicas", "die", "between", 1),
    ("contiguous", "die", "middle", 0),
    ("replicas", "stall", "between", 3),
]


@pytest.mark.parametrize("kind,fault,when,victim", SCENARIOS)
def test_survivors_keep_serving(tmp_path, kind, fault, when, victim):
    args = (str(tmp_path / "init"), str(tmp_path), kind, fault, when, victim, STEPS, FAULT_STEP)
    codes, seconds = run_ranks(run, WORLD, (*args, DEADLINE), timeout=120)
    assert codes == [0] * WORLD, codes
    reports = {}
    for rank in range(WORLD):
        with open(tmp_path / f"rank{rank}.json") as f:
            reports[rank] = json.load(f)
    survivors = [r for r in range(WORLD) if r != victim]
    restored = copied = 0
    for rank in survivors:
        report = reports[rank]
        assert [entry["step"] for entry in report["log"]] == list(range(STEPS)), report
        assert all(entry["correct"] for entry in report["log"]), report["log"]
        (recovery,) = report["recoveries"]
        assert recovery["failed"] == [victim] and report["world_after"] == WORLD - 1, report
        restored += recovery["restored"]
        copied += recovery["copied"]
    if kind == "contiguous":  # two experts a rank: both lost, both from the host copy
        assert restored == 2 * 2, (restored, copied)  # two layers
    else:  # every expert had a copy on another rank
        assert restored == 0 and copied > 0, (restored, copied)
    if fault == "stall":
        assert "excluded" in reports[victim]["log"][-1], reports[victim]
    first_after = min(
        entry["done"] for rank in survivors for entry in reports[rank]["log"]
        if entry["step"] == FAULT_STEP
    )  # fmt: skip
    print(f"\n{kind} {fault} {when}: {seconds:.1f} s; restored {restored}, copied {copied}")
    if fault == "die":
        recovered = first_after - reports[victim]["died"]
        print(f"from the death to the first correct step: {recovered:.2f} s")

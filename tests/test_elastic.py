"""Serving survives a rank's death (elastic expert parallelism, moe_ep.elastic): a world-4 Gloo
group serves a two-layer block (exact size, then fixed capacity); one rank dies between two
steps or in the middle of one, or stalls past the deadline. The survivors agree on the lost
rank, form a group of three, re-plan with the planner, copy the experts that moved from a
survivor's replica (a fault-tolerant placement) or take an expert whose only copy died from
the host-side copy, retry the step and go on: every step of every survivor equals the float64
reference and none is lost; a second death after the first recovery is survived too. The
deadline is lowered to 2 s. About 5 to 15 s a scenario."""

import json

import pytest
from elastic_worker import run
from launcher import run_ranks

WORLD, STEPS, DEADLINE = 4, 6, 2.0

SCENARIOS = [
    # (placement, fault, when, victims, the step each fails at)
    ("replicas", "die", "between", [1], [3]),
    ("contiguous", "die", "middle", [0], [3]),
    ("replicas", "stall", "between", [3], [3]),
    ("replicas", "die", "middle", [1, 3], [2, 4]),  # two failures, one after the other
]


@pytest.mark.parametrize("kind,fault,when,victims,fault_steps", SCENARIOS)
def test_survivors_keep_serving(tmp_path, kind, fault, when, victims, fault_steps):
    args = (str(tmp_path / "init"), str(tmp_path), kind, fault, when, victims, STEPS)
    codes, seconds = run_ranks(run, WORLD, (*args, fault_steps, DEADLINE), timeout=120)
    assert codes == [0] * WORLD, codes
    reports = {}
    for rank in range(WORLD):
        with open(tmp_path / f"rank{rank}.json") as f:
            reports[rank] = json.load(f)
    survivors = [r for r in range(WORLD) if r not in victims]
    restored = copied = 0
    for rank in survivors:
        report = reports[rank]
        assert [entry["step"] for entry in report["log"]] == list(range(STEPS)), report
        assert all(entry["correct"] for entry in report["log"]), report["log"]
        recoveries = report["recoveries"]
        assert len(recoveries) == len(victims), report
        assert report["world_after"] == WORLD - len(victims), report
        # The failed ranks are named in each group's own numbering.
        members = list(range(WORLD))
        for recovery, victim in zip(recoveries, victims, strict=True):
            assert recovery["failed"] == [members.index(victim)], (recovery, victim)
            members.remove(victim)
            assert recovery["survivors"] == members, recovery
        restored += sum(recovery["restored"] for recovery in recoveries)
        copied += sum(recovery["copied"] for recovery in recoveries)
    if kind == "contiguous":  # two experts a rank: both lost, both from the host copy
        assert restored == 2 * 2, (restored, copied)  # two layers
    else:  # every expert had a copy on another rank, also after the first loss
        assert restored == 0 and copied > 0, (restored, copied)
    if fault == "stall":
        assert "excluded" in reports[victims[0]]["log"][-1], reports[victims[0]]
    first_after = min(
        entry["done"] for rank in survivors for entry in reports[rank]["log"]
        if entry["step"] == fault_steps[0]
    )  # fmt: skip
    print(
        f"\n{kind} {fault} {when} {victims}: {seconds:.1f} s; restored {restored}, copied {copied}"
    )
    if fault == "die":
        recovered = first_after - reports[victims[0]]["died"]
        print(f"from the death to the first correct step: {recovered:.2f} s")

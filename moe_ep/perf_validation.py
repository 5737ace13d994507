"""The cost model against published measurements it was not fitted to.

Every row of ``moe_ep/data/perf_validation.json`` is predicted with the presets of
``moe_ep.perf`` (constants derived from ``perf_calibration.json`` only); ``report()`` prints
each error (predicted / published - 1), the share within the file's fixed tolerance, and the
mean signed and absolute errors per kind of figure. docs/perf_validation.md discusses them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

from moe_ep import perf
from moe_ep import perf_calibration as calibration

VALIDATION_PATH = os.path.join(calibration.DATA_DIR, "perf_validation.json")


def load_validation(path: str = VALIDATION_PATH) -> dict:
    with open(path) as f:
        return json.load(f)


def _all_to_all(row: dict) -> float:
    hw, config = perf.HARDWARE[row["hardware"]], row["config"]
    nodes = max(1, math.ceil(config["ep"] / hw.gpus_per_node))
    seconds = calibration.all_to_all_cost(
        config,
        perf.native_hardware(hw, nodes),
        perf.native_transport(perf.TRANSPORTS[row["transport"]]),
    ).time_s
    if row["unit"] == "us":
        return seconds * 1e6
    sheet = perf.CALIBRATION["hardware"][row["hardware"]]
    return calibration.logical_bytes(config, sheet) / seconds / 1e9


def _deployment(row: dict):
    model = dataclasses.replace(perf.MODELS[row["model"]], **row.get("model_overrides", {}))
    config = row["config"]
    strategy = dataclasses.replace(
        perf.parse_strategy(config["strategy"]), **config.get("strategy_overrides", {})
    )
    return model, perf.HARDWARE[row["hardware"]], strategy, perf.Workload(**config["workload"])


def _serving(row: dict) -> float:
    model, hw, strategy, workload = _deployment(row)
    p = perf.predict(model, hw, strategy, workload, perf.TRANSPORTS[row["config"]["transport"]])
    return p.tokens_per_s / (p.num_gpus / hw.gpus_per_node)


def _overlap_speedup(row: dict) -> float:
    """Throughput with the strategy's two-batch overlap over one micro-batch without it (at
    `serial_batch` sequences where the source compared different batches)."""
    model, hw, strategy, workload = _deployment(row)
    transport = perf.TRANSPORTS[row["config"]["transport"]]
    serial = dataclasses.replace(strategy, micro_batches=1, overlap=False)
    serial_workload = dataclasses.replace(
        workload, batch=row["config"].get("serial_batch", workload.batch)
    )
    overlapped = perf.predict(model, hw, strategy, workload, transport).tokens_per_s
    return overlapped / perf.predict(model, hw, serial, serial_workload, transport).tokens_per_s


def _gemm(row: dict) -> float:
    cost = calibration.gemm_cost(row["config"], perf.native_gpu(perf.HARDWARE[row["hardware"]]))
    return cost.flops / cost.time_s / 1e12


PREDICTORS = {
    "gemm": _gemm,
    "all_to_all": _all_to_all,
    "serving": _serving,
    "overlap_speedup": _overlap_speedup,
}


def predict_row(row: dict) -> float:
    """The model's prediction of one published figure, in the row's unit."""
    return PREDICTORS[row["kind"]](row)


def validation_rows(data: dict | None = None) -> list[dict]:
    data = data or load_validation()
    out = []
    for row in data["rows"]:
        predicted = predict_row(row)
        error = predicted / row["published"] - 1.0
        out.append(
            {
                "id": row["id"],
                "kind": row["kind"],
                "published": row["published"],
                "predicted": predicted,
                "unit": row["unit"],
                "error": error,
                "within": abs(error) <= data["tolerance"],
            }
        )
    return out


def summarize(rows: list[dict]) -> dict:
    """Count, share within tolerance, mean signed and mean absolute error of some rows."""
    count = len(rows)
    return {
        "rows": count,
        "within": sum(r["within"] for r in rows),
        "mean_signed_error": sum(r["error"] for r in rows) / count if count else 0.0,
        "mean_absolute_error": sum(abs(r["error"]) for r in rows) / count if count else 0.0,
    }


def report(data: dict | None = None) -> str:
    data = data or load_validation()
    rows = validation_rows(data)
    tolerance = data["tolerance"]
    lines = [f"{'figure':<44}{'published':>12}{'predicted':>12} {'unit':<11}{'error':>8}"]
    for r in rows:
        mark = "" if r["within"] else "  outside"
        lines.append(
            f"{r['id']:<44}{r['published']:>12.4g}{r['predicted']:>12.4g} {r['unit']:<11}"
            f"{r['error']:>+8.1%}{mark}"
        )
    lines.append("")
    lines.append(f"tolerance +-{tolerance:.0%} (fixed in {os.path.basename(VALIDATION_PATH)})")
    by_kind = {}
    for r in rows:
        by_kind.setdefault(r["kind"], []).append(r)
    for label, subset in [("all", rows), *sorted(by_kind.items())]:
        s = summarize(subset)
        lines.append(
            f"{label:<16}{s['within']:>3} of {s['rows']:<3} within; mean signed error "
            f"{s['mean_signed_error']:+.1%}, mean absolute error {s['mean_absolute_error']:.1%}"
        )
    lines.append("")
    lines.append(f"out of scope ({len(data['out_of_scope'])} entries, docs/perf_validation.md):")
    lines += [f"  {entry['figures']}: {entry['reason']}" for entry in data["out_of_scope"]]
    return "\n".join(lines)

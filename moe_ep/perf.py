"""Cost model of MoE inference deployments: presets, calibration, validation and the CLI.

The arithmetic lives in C++ (csrc/core/perf.cpp, docs/perf_model.md); this module only
describes models, hardware and strategies, and prints or plots what the core predicts.

    python -m moe_ep.perf --model seeds --strategy ep16tp8 --phase decode --batch 64
    python -m moe_ep.perf --compare tp8pp2,ep16tp8
    python -m moe_ep.perf --sweep --plot scaling.png --json scaling.json
    python -m moe_ep.perf --validate
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from dataclasses import dataclass

from moe_ep import _C
from moe_ep.plan import Placement

MEASUREMENTS_PATH = os.path.join(os.path.dirname(__file__), "perf_measurements.json")


@dataclass(frozen=True)
class Constant:
    value: float
    unit: str
    source: str


# Every hardware constant the presets use, with its unit and where it comes from.
CONSTANTS = {
    "seeds_h100_peak_flops": Constant(
        400e12, "FLOP/s", "seeds: 'single-card 400TFlops' (H100, BF16 dense)"
    ),
    "seeds_mfu": Constant(0.6, "fraction", "seeds: '60% MFU'"),
    "seeds_h100_memory_bandwidth": Constant(1.8e12, "B/s", "seeds: 'VRAM 1.8TBps'"),
    "seeds_memory_efficiency": Constant(0.8, "fraction", "seeds: '80% utilization'"),
    "seeds_h100_memory": Constant(64e9, "B", "seeds: 'VRAM 64GB capacity'"),
    "datasheet_h100_peak_flops": Constant(
        989e12, "FLOP/s", "NVIDIA H100 SXM datasheet: BF16 dense tensor core"
    ),
    "datasheet_h100_memory_bandwidth": Constant(3.35e12, "B/s", "NVIDIA H100 SXM datasheet"),
    "datasheet_h100_memory": Constant(80e9, "B", "NVIDIA H100/H800 SXM datasheet"),
    "fp8_speedup": Constant(
        2.0, "ratio", "NVIDIA H100 SXM datasheet: FP8 1979 vs BF16 989 TFLOP/s dense"
    ),
    "h100_nvlink_bandwidth": Constant(
        450e9, "B/s per direction", "NVIDIA H100 SXM datasheet: NVLink 900 GB/s bidirectional"
    ),
    "h800_nvlink_bandwidth": Constant(
        200e9, "B/s per direction", "NVIDIA H800 SXM: NVLink 400 GB/s bidirectional"
    ),
    "nvlink_latency": Constant(3e-6, "s", "assumption: order of a GPU-initiated NVLink write"),
    "ndr_nic_bandwidth": Constant(
        50e9, "B/s per direction", "ConnectX-7 / InfiniBand NDR 400 Gb/s per GPU"
    ),
    "ndr_latency": Constant(
        5e-6, "s", "assumption: RDMA write + GPU-initiated signalling across one switch tier"
    ),
    "link_efficiency": Constant(
        0.8, "fraction", "seeds' 80% utilization, applied to every link (not fitted)"
    ),
}


def _c(name: str) -> float:
    return CONSTANTS[name].value


@dataclass
class Model:
    name: str = "seeds"
    num_layers: int = 61
    num_dense_layers: int = 3
    hidden: int = 7168
    num_heads: int = 128
    head_dim: int = 128
    num_kv_heads: int = 0
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    rope_head_dim: int = 0
    dense_ffn_hidden: int = 18432
    expert_ffn_hidden: int = 2048
    num_experts: int = 64
    top_k: int = 2
    num_shared_experts: int = 0
    vocab_size: int = 129280
    weight_bytes: float = 2.0
    activation_bytes: float = 2.0


MODELS = {
    # The seeds' model; its dense FFN width and vocabulary are DeepSeek-V3's (whose dims these are).
    "seeds": Model(),
    "deepseek-v3": Model(
        name="deepseek-v3",
        q_lora_rank=1536,
        kv_lora_rank=512,
        rope_head_dim=64,
        num_experts=256,
        top_k=8,
        num_shared_experts=1,
    ),
}


@dataclass
class Hardware:
    """A GPU type and its cluster fabric: one constant set per hardware type, never per case."""

    name: str = "h100-seeds"
    peak_flops_bf16: float = _c("seeds_h100_peak_flops")
    mfu: float = _c("seeds_mfu")
    memory_bandwidth: float = _c("seeds_h100_memory_bandwidth")
    memory_efficiency: float = _c("seeds_memory_efficiency")
    gpu_memory_bytes: float = _c("seeds_h100_memory")
    gpus_per_node: int = 8
    intra_node_bandwidth: float = _c("h100_nvlink_bandwidth")
    intra_node_latency: float = _c("nvlink_latency")
    inter_node_bandwidth: float = _c("ndr_nic_bandwidth")
    inter_node_latency: float = _c("ndr_latency")
    intra_node_efficiency: float = _c("link_efficiency")
    inter_node_efficiency: float = _c("link_efficiency")


_DATASHEET = dict(
    peak_flops_bf16=_c("datasheet_h100_peak_flops"),
    memory_bandwidth=_c("datasheet_h100_memory_bandwidth"),
    gpu_memory_bytes=_c("datasheet_h100_memory"),
)
HARDWARE = {
    "h100-seeds": Hardware(),
    "h100": Hardware(name="h100", **_DATASHEET),
    # H800: H100 compute and memory, NVLink cut to 400 GB/s bidirectional.
    "h800-seeds": Hardware(
        name="h800-seeds",
        gpu_memory_bytes=_c("datasheet_h100_memory"),
        intra_node_bandwidth=_c("h800_nvlink_bandwidth"),
    ),
    "h800": Hardware(name="h800", intra_node_bandwidth=_c("h800_nvlink_bandwidth"), **_DATASHEET),
}


@dataclass
class Strategy:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    dp: int = 1
    micro_batches: int = 1
    overlap: bool = False
    dedup_tokens: bool = True
    expert_imbalance: float = 1.0
    link_imbalance: float = 1.0
    dispatch_bytes: float = 0.0
    combine_bytes: float = 0.0

    @property
    def num_gpus(self) -> int:
        return self.tp * self.pp * self.dp


@dataclass
class Workload:
    phase: str = "decode"
    batch: float = 64
    sequence_length: float = 2048


_STRATEGY_KEYS = ("tp", "pp", "ep", "dp", "mb")
# Named layouts: the seeds' baseline and proposal, and the seeds' 3,904-GPU layout
# (61 layers x 64 GPUs: one pipeline stage per layer, one expert per GPU).
STRATEGY_ALIASES = {"seeds3904": "pp61ep64dp64mb64"}


def parse_strategy(text: str) -> Strategy:
    """Parse 'tp8pp2', 'ep16tp8' (dp = ep / tp), 'pp61ep64dp64mb64'; suffix -serial, -nodedup.

    EP layouts overlap their all-to-all with two micro-batches unless '-serial' is given.
    """
    text = STRATEGY_ALIASES.get(text, text)
    base, *flags = text.split("-")
    parts = re.findall(r"(tp|pp|ep|dp|mb)(\d+)", base)
    if not parts or "".join(k + v for k, v in parts) != base:
        raise ValueError(f"strategy {text!r}: expected e.g. tp8pp2, ep16tp8, pp61ep64dp64mb64")
    unknown = set(flags) - {"serial", "nodedup"}
    if unknown:
        raise ValueError(f"strategy {text!r}: unknown suffix {sorted(unknown)}")
    values = {key: int(value) for key, value in parts}
    tp, pp, ep = values.get("tp", 1), values.get("pp", 1), values.get("ep", 1)
    dp = values.get("dp", max(1, ep // tp))
    overlap = ep > 1 and "serial" not in flags
    micro_batches = values.get("mb", max(pp, 2 if overlap else 1))
    return Strategy(
        tp=tp,
        pp=pp,
        ep=ep,
        dp=dp,
        micro_batches=micro_batches,
        overlap=overlap,
        dedup_tokens="nodedup" not in flags,
    )


def _native(obj, native_cls):
    native = native_cls()
    for f in dataclasses.fields(obj):
        if f.name != "name" and hasattr(native, f.name):
            setattr(native, f.name, getattr(obj, f.name))
    return native


def native_hardware(hw: Hardware, model: Model, num_nodes: int) -> _C.HardwareSpec:
    native = _native(hw, _C.HardwareSpec)
    native.num_nodes = num_nodes
    # FP8 weights run the FP8 tensor-core rate.
    speedup = _c("fp8_speedup") if model.weight_bytes <= 1 else 1.0
    native.gpu.peak_flops = hw.peak_flops_bf16 * speedup
    native.gpu.mfu = hw.mfu
    native.gpu.memory_bandwidth = hw.memory_bandwidth
    native.gpu.memory_efficiency = hw.memory_efficiency
    return native


def predict(model: Model, hw: Hardware, strategy: Strategy, workload: Workload, num_nodes=None):
    """Predict one deployment; num_nodes defaults to the fewest nodes that hold its GPUs."""
    nodes = num_nodes or math.ceil(strategy.num_gpus / hw.gpus_per_node)
    native_workload = _C.WorkloadSpec()
    native_workload.phase = getattr(_C.Phase, workload.phase)
    native_workload.batch = workload.batch
    native_workload.sequence_length = workload.sequence_length
    return _C.perf_predict(
        _native(model, _C.ModelSpec),
        native_hardware(hw, model, nodes),
        _native(strategy, _C.StrategySpec),
        native_workload,
    )


def calibrate(hw: Hardware, path: str) -> Hardware:
    """Replace rates with measured ones from a JSON file (e.g. the package's benchmark output).

    Recognised keys, at top level or under "rates": matmul_flops_per_s (achieved BF16),
    memory_bytes_per_s, intra_node_bytes_per_s, inter_node_bytes_per_s, intra_node_latency_s,
    inter_node_latency_s. A measured rate is already achieved, so its efficiency becomes 1.
    """
    with open(path) as f:
        data = json.load(f)
    rates = data.get("rates", data)
    mapping = {
        "matmul_flops_per_s": ("peak_flops_bf16", "mfu"),
        "memory_bytes_per_s": ("memory_bandwidth", "memory_efficiency"),
        "intra_node_bytes_per_s": ("intra_node_bandwidth", "intra_node_efficiency"),
        "inter_node_bytes_per_s": ("inter_node_bandwidth", "inter_node_efficiency"),
        "intra_node_latency_s": ("intra_node_latency", None),
        "inter_node_latency_s": ("inter_node_latency", None),
    }
    unknown = set(rates) - set(mapping)
    if unknown:
        raise ValueError(f"calibration file {path}: unknown keys {sorted(unknown)}")
    changes = {"name": hw.name + "+calibrated"}
    for key, value in rates.items():
        if not isinstance(value, int | float) or value <= 0:
            raise ValueError(f"calibration file {path}: {key} must be a positive number")
        rate_field, efficiency_field = mapping[key]
        changes[rate_field] = float(value)
        if efficiency_field:
            changes[efficiency_field] = 1.0
    return dataclasses.replace(hw, **changes)


# ----------------------------------------------------------------------------- validation


def _measurement_model(entry) -> Model:
    return dataclasses.replace(MODELS[entry["model"]], **entry.get("model_overrides", {}))


def predict_measurement(entry, hw: Hardware | None = None) -> float:
    """The model's prediction of one published figure, in the entry's unit."""
    hw = hw or HARDWARE[entry["hardware"]]
    config = entry["config"]
    if entry["kind"] == "all_to_all":
        model = MODELS[entry["model"]]
        nodes = math.ceil(config["ep"] / hw.gpus_per_node)
        cost = _C.perf_all_to_all_cost(
            config["tokens_per_gpu"],
            config["bytes_per_token"],
            model.num_experts,
            model.top_k,
            config["ep"],
            config["dedup_tokens"],
            1.0,
            native_hardware(hw, model, nodes),
        )
        if entry["unit"] == "us":
            return cost.time_s * 1e6
        link_bytes = cost.inter_node_bytes if nodes > 1 else cost.intra_node_bytes
        return link_bytes / cost.time_s / 1e9  # GB/s on the bottleneck link
    model = _measurement_model(entry)
    strategy = dataclasses.replace(
        parse_strategy(config["strategy"]), **config.get("strategy_overrides", {})
    )
    workload = Workload(**config["workload"])
    p = predict(model, hw, strategy, workload)
    return p.tokens_per_s / (p.num_gpus / hw.gpus_per_node)  # tokens/s per node


def load_measurements(path: str = MEASUREMENTS_PATH) -> dict:
    with open(path) as f:
        return json.load(f)


def validation_rows(datasheet: bool = False) -> list[dict]:
    """Predictions of every published figure; datasheet swaps the seeds' GPU rates for NVIDIA's."""
    rows = []
    for entry in load_measurements()["measurements"]:
        name = entry["hardware"].removesuffix("-seeds") if datasheet else entry["hardware"]
        predicted = predict_measurement(entry, HARDWARE[name])
        rows.append(
            {
                "id": entry["id"],
                "published": entry["published"],
                "predicted": predicted,
                "unit": entry["unit"],
                "error": predicted / entry["published"] - 1.0,
            }
        )
    return rows


# ----------------------------------------------------------------------------- output


def _fmt_bytes(value: float) -> str:
    return f"{value / 1e9:.2f} GB"


def describe(label: str, p) -> str:
    lines = [
        f"== {label}: {p.num_gpus} GPUs",
        f"throughput      {p.tokens_per_s:,.0f} tokens/s total, "
        f"{p.tokens_per_s_per_gpu:,.0f} tokens/s per GPU",
        f"step time       {p.step_time_s * 1e3:.3f} ms   latency {p.latency_s * 1e3:.3f} ms",
        f"bottleneck      {p.bottleneck}",
        "breakdown (ms per step, slowest pipeline stage):",
    ]
    lines += [f"  {name:<16}{seconds * 1e3:>12.3f}" for name, seconds in p.breakdown]
    lines += [
        f"traffic/GPU     NVLink {_fmt_bytes(p.intra_node_bytes_per_gpu)}, "
        f"network {_fmt_bytes(p.inter_node_bytes_per_gpu)}, "
        f"busiest link {_fmt_bytes(p.busiest_link_bytes)} per step",
        f"memory/GPU      {_fmt_bytes(p.memory_bytes_per_gpu)} (weights "
        f"{_fmt_bytes(p.weight_bytes_per_gpu)}, KV {_fmt_bytes(p.kv_cache_bytes_per_gpu)}) "
        f"fits: {'yes' if p.fits_in_memory else 'NO'}",
    ]
    return "\n".join(lines)


def sweep(model: Model, hw: Hardware, per_gpu_batch: float, workload: Workload, eps, tp: int):
    """Weak scaling: EP (and nodes) grow, the batch per GPU stays fixed."""
    points = []
    for ep in eps:
        strategy = parse_strategy(f"ep{ep}tp{min(tp, ep)}")
        scaled = dataclasses.replace(workload, batch=per_gpu_batch * strategy.num_gpus)
        p = predict(model, hw, strategy, scaled)
        points.append(
            {
                "ep": ep,
                "gpus": p.num_gpus,
                "nodes": math.ceil(p.num_gpus / hw.gpus_per_node),
                "tokens_per_s": p.tokens_per_s,
                "tokens_per_s_per_gpu": p.tokens_per_s_per_gpu,
                "latency_s": p.latency_s,
                "bottleneck": p.bottleneck,
                "fits_in_memory": p.fits_in_memory,
            }
        )
    return points


def plot_sweep(points, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gpus = [pt["gpus"] for pt in points]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    left.plot(gpus, [pt["tokens_per_s"] for pt in points], "o-", label="predicted")
    base = points[0]["tokens_per_s"] / points[0]["gpus"]
    left.plot(gpus, [base * g for g in gpus], "--", color="grey", label="linear")
    left.set(xscale="log", yscale="log", xlabel="GPUs", ylabel="tokens/s (total)")
    left.legend()
    right.plot(gpus, [pt["latency_s"] * 1e3 for pt in points], "o-")
    right.set(xscale="log", xlabel="GPUs", ylabel="step latency (ms)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def placement_imbalance(placement: Placement) -> float:
    """The expert-load factor of a planned placement: every MoE layer waits for its busiest
    GPU, so the step scales with the mean over layers of each layer's max/mean GPU load."""
    layers = placement.moe_layers
    return sum(layer.metrics.imbalance for layer in layers) / len(layers) if layers else 1.0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moe_ep.perf", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--model", default="seeds", choices=sorted(MODELS))
    parser.add_argument("--hardware", default="h100-seeds", choices=sorted(HARDWARE))
    parser.add_argument("--calibrate", metavar="JSON", help="measured rates (see calibrate())")
    parser.add_argument("--strategy", default="ep16tp8", help="e.g. tp8pp2, ep16tp8, seeds3904")
    parser.add_argument("--compare", help="comma-separated strategies, the first is the baseline")
    parser.add_argument("--phase", default="decode", choices=["prefill", "decode"])
    parser.add_argument("--batch", type=float, default=64, help="sequences per step, in total")
    parser.add_argument("--seq", type=float, default=2048, help="prompt or context length")
    parser.add_argument("--nodes", type=int, help="nodes in the cluster (default: as needed)")
    parser.add_argument("--imbalance", type=float, default=1.0, help="placement max/mean load")
    parser.add_argument("--link-imbalance", type=float, help="max/mean link load (default: same)")
    parser.add_argument(
        "--placement",
        metavar="JSON",
        help="a plan from python -m moe_ep.plan: its mean per-layer max/mean GPU load "
        "replaces --imbalance",
    )
    parser.add_argument("--sweep", action="store_true", help="sweep EP 8..256 (weak scaling)")
    parser.add_argument("--plot", help="PNG path for --sweep")
    parser.add_argument("--json", help="JSON path for --sweep or --compare")
    parser.add_argument("--validate", action="store_true", help="published measurements table")
    parser.add_argument("--datasheet", action="store_true", help="--validate with datasheet rates")
    parser.add_argument("--constants", action="store_true", help="list hardware constants")
    args = parser.parse_args(argv)

    if args.constants:
        for name, c in CONSTANTS.items():
            print(f"{name:<32}{c.value:>12.4g} {c.unit:<20}{c.source}")
        return 0
    if args.validate:
        print(f"{'measurement':<34}{'published':>12}{'predicted':>12} unit    error")
        for row in validation_rows(args.datasheet):
            print(
                f"{row['id']:<34}{row['published']:>12.1f}{row['predicted']:>12.1f} "
                f"{row['unit']:<7}{row['error']:+.1%}"
            )
        return 0

    model = MODELS[args.model]
    hw = HARDWARE[args.hardware]
    if args.calibrate:
        hw = calibrate(hw, args.calibrate)
    workload = Workload(args.phase, args.batch, args.seq)

    imbalance = args.imbalance
    if args.placement:
        imbalance = placement_imbalance(Placement.load(args.placement))
        print(f"placement {args.placement}: mean per-layer GPU load max/mean {imbalance:.3f}")

    def with_placement(strategy: Strategy) -> Strategy:
        link = args.link_imbalance if args.link_imbalance is not None else imbalance
        return dataclasses.replace(strategy, expert_imbalance=imbalance, link_imbalance=link)

    if args.sweep:
        per_gpu = args.batch / 16  # --batch is read as the batch of a 16-GPU deployment
        points = sweep(model, hw, per_gpu, workload, [8, 16, 32, 64, 128, 256], tp=8)
        print(f"{'EP':>5}{'GPUs':>6}{'nodes':>6}{'tokens/s':>14}{'per GPU':>10}{'ms':>9}  bound")
        for pt in points:
            print(
                f"{pt['ep']:>5}{pt['gpus']:>6}{pt['nodes']:>6}{pt['tokens_per_s']:>14,.0f}"
                f"{pt['tokens_per_s_per_gpu']:>10,.0f}{pt['latency_s'] * 1e3:>9.2f}  "
                f"{pt['bottleneck']}{'' if pt['fits_in_memory'] else ' (does not fit)'}"
            )
        if args.plot:
            title = f"{model.name} on {hw.name}, {args.phase}, {per_gpu:g} seqs/GPU x {args.seq:g}"
            plot_sweep(points, args.plot, title)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"model": model.name, "hardware": hw.name, "points": points}, f, indent=1)
        return 0

    names = args.compare.split(",") if args.compare else [args.strategy]
    results = []
    for name in names:
        p = predict(model, hw, with_placement(parse_strategy(name)), workload, args.nodes)
        results.append((name, p))
        print(describe(name, p))
    if len(results) > 1:
        base_name, base = results[0]
        print(f"== versus {base_name}")
        for name, p in results[1:]:
            print(
                f"{name:<20} throughput x{p.tokens_per_s / base.tokens_per_s:.2f}, "
                f"latency /{base.latency_s / p.latency_s:.2f}"
            )
    if args.json:
        with open(args.json, "w") as f:
            rows = [
                {
                    "strategy": n,
                    "tokens_per_s": p.tokens_per_s,
                    "latency_s": p.latency_s,
                    "bottleneck": p.bottleneck,
                    "breakdown": dict(p.breakdown),
                }
                for n, p in results
            ]
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

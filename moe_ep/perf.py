"""Cost model of MoE inference deployments: presets, placement input, sweeps and the CLI.

The arithmetic lives in C++ (csrc/core/perf*.cpp, docs/perf_model.md); the constants come from
cited measurements (moe_ep/perf_calibration.py, moe_ep/data/perf_calibration.json) and the
model is checked against published figures it was not fitted to (moe_ep/perf_validation.py).

    python -m moe_ep.perf --model seeds --strategy ep16tp8 --phase decode --batch 64
    python -m moe_ep.perf --compare tp8pp2,ep16tp8
    python -m moe_ep.perf --strategy ep64 --dispatch-dtype fp8      # FP8 dispatch (scales included)
    python -m moe_ep.perf --strategy ep64 --placement plan.json      # a plan from moe_ep.plan
    python -m moe_ep.perf --sweep --plot scaling.png --json scaling.json
    python -m moe_ep.perf --validate
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from dataclasses import dataclass

import torch

from moe_ep import _C
from moe_ep import perf_calibration as calibration
from moe_ep.dispatcher import dispatch_row_bytes
from moe_ep.plan import Placement

CALIBRATION = calibration.load_calibration()
CONSTANTS = calibration.derive_constants(CALIBRATION)


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
    num_expert_groups: int = 1
    topk_groups: int = 1
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
        num_expert_groups=8,
        topk_groups=4,
        num_shared_experts=1,
    ),
}


@dataclass
class Hardware:
    """A GPU type and its cluster fabric: datasheet rates times measured efficiencies."""

    name: str
    peak_flops_bf16: float
    fp8_speedup: float
    memory_bandwidth: float
    num_sms: int
    gpu_memory_bytes: float
    gpus_per_node: int
    intra_node_bandwidth: float
    inter_node_bandwidth: float
    intra_node_efficiency: float
    inter_node_efficiency: float
    gemm_peak_efficiency: float
    gemm_half_rows: float
    gemm_half_depth: float
    memory_efficiency: float
    kernel_fixed_s: float
    attention_compute_efficiency: float
    attention_memory_efficiency: float


def _hardware_presets() -> dict[str, Hardware]:
    measured = {
        **calibration.gpu_fields(CONSTANTS),
        "intra_node_efficiency": CONSTANTS["intra_node_efficiency"].value,
        "inter_node_efficiency": CONSTANTS["inter_node_efficiency"].value,
    }
    presets = {}
    for name, sheet in CALIBRATION["hardware"].items():
        rates = {key: value for key, value in sheet.items() if key != "source"}
        presets[name] = Hardware(name=name, **rates, **measured)
    return presets


HARDWARE = _hardware_presets()


@dataclass(frozen=True)
class Transport:
    """How dispatch and combine move tokens, and what each collective costs besides bytes."""

    name: str
    dedup: str  # "expert", "rank" or "node" (csrc/core/perf_comm.h)
    nvlink_fixed_s: float
    network_fixed_s: float
    per_peer_s: float
    sms: int


TRANSPORTS = {
    name: Transport(name, spec["dedup"], **calibration.transport_fields(CONSTANTS, name))
    for name, spec in CALIBRATION["transports"].items()
}


@dataclass
class Strategy:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    dp: int = 1
    micro_batches: int = 1
    overlap: bool = False
    redundant_experts: int = 0
    expert_imbalance: float = 1.0
    link_imbalance: float = 1.0
    attention_imbalance: float = 1.0
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
    draft_tokens: int = 0
    acceptance_rate: float = 0.0
    disaggregated: bool = False


# Named layouts: the seeds' 3,904-GPU layout (61 layers x 64 GPUs: one pipeline stage per layer,
# one expert per GPU).
STRATEGY_ALIASES = {"seeds3904": "pp61ep64dp64mb64"}


def dispatch_bytes(hidden: int, dispatch_dtype: torch.dtype) -> float:
    """Strategy.dispatch_bytes of a layer that dispatches in dispatch_dtype
    (MoELayer.dispatch_dtype): bytes on the wire per hidden element, FP8's float32 scales
    included (1.03125 at hidden 7168; bf16: 2)."""
    return dispatch_row_bytes(hidden, dispatch_dtype, dispatch_dtype) / hidden


def parse_strategy(text: str) -> Strategy:
    """Parse 'tp8pp2', 'ep16tp8' (dp = ep / tp), 'pp61ep64dp64mb64'; suffix -serial.

    EP layouts overlap their all-to-all with two micro-batches unless '-serial' is given.
    """
    text = STRATEGY_ALIASES.get(text, text)
    base, *flags = text.split("-")
    parts = re.findall(r"(tp|pp|ep|dp|mb)(\d+)", base)
    if not parts or "".join(k + v for k, v in parts) != base:
        raise ValueError(f"strategy {text!r}: expected e.g. tp8pp2, ep16tp8, pp61ep64dp64mb64")
    unknown = set(flags) - {"serial"}
    if unknown:
        raise ValueError(f"strategy {text!r}: unknown suffix {sorted(unknown)}")
    values = {key: int(value) for key, value in parts}
    tp, pp, ep = values.get("tp", 1), values.get("pp", 1), values.get("ep", 1)
    dp = values.get("dp", max(1, ep // tp))
    overlap = ep > 1 and "serial" not in flags
    micro_batches = values.get("mb", max(pp, 2 if overlap else 1))
    return Strategy(tp=tp, pp=pp, ep=ep, dp=dp, micro_batches=micro_batches, overlap=overlap)


def _copy_fields(obj, native, skip=("name",)):
    for f in dataclasses.fields(obj):
        if f.name not in skip and hasattr(native, f.name):
            setattr(native, f.name, getattr(obj, f.name))
    return native


def native_gpu(hw: Hardware) -> _C.GpuSpec:
    gpu = _copy_fields(hw, _C.GpuSpec())
    gpu.peak_flops = hw.peak_flops_bf16
    return gpu


def native_hardware(hw: Hardware, num_nodes: int) -> _C.HardwareSpec:
    native = _copy_fields(hw, _C.HardwareSpec())
    native.num_nodes = num_nodes
    native.gpu = native_gpu(hw)
    return native


def native_transport(transport: Transport) -> _C.TransportSpec:
    return _copy_fields(transport, _C.TransportSpec())


def native_strategy(strategy: Strategy, transport: Transport) -> _C.StrategySpec:
    native = _copy_fields(strategy, _C.StrategySpec())
    native.dedup = calibration.DEDUP[transport.dedup]
    native.all_to_all = native_transport(transport)
    native.collectives = native_transport(TRANSPORTS["nccl"])
    return native


def native_workload(workload: Workload) -> _C.WorkloadSpec:
    native = _copy_fields(workload, _C.WorkloadSpec(), skip=("phase",))
    native.phase = getattr(_C.Phase, workload.phase)
    return native


def predict(
    model: Model,
    hw: Hardware,
    strategy: Strategy,
    workload: Workload,
    transport: Transport | None = None,
    num_nodes: int | None = None,
):
    """Predict one deployment; num_nodes defaults to the fewest nodes that hold its GPUs, the
    transport to NCCL (moe_ep's own all-to-all)."""
    nodes = num_nodes or math.ceil(strategy.num_gpus / hw.gpus_per_node)
    return _C.perf_predict(
        _copy_fields(model, _C.ModelSpec()),
        native_hardware(hw, nodes),
        native_strategy(strategy, transport or TRANSPORTS["nccl"]),
        native_workload(workload),
    )


def calibrate(hw: Hardware, path: str) -> Hardware:
    """Replace rates and efficiencies with those measured by `benchmarks/bench_local.py --json`
    (or a plain {"rates": {...}} file; perf_calibration.fit_benchmark)."""
    changes = calibration.fit_benchmark(path, dataclasses.asdict(hw))
    return dataclasses.replace(hw, name=hw.name + "+calibrated", **changes)


def placement_factors(placement: Placement, ep: int) -> tuple[float, float]:
    """(expert_imbalance, link_imbalance) of a plan from moe_ep.plan, for an EP group of `ep`
    GPUs: every MoE layer waits for its busiest GPU and its busiest NIC, so the step scales with
    the mean over layers of each layer's ratios.

    Expert imbalance: the busiest GPU's expected (token, expert) pairs over the layer's total
    spread over `ep` GPUs (a layer whose experts sit on fewer GPUs is imbalanced by that much).
    Link imbalance: the planner's busiest NIC load (tokens per NIC, its traffic model) over the
    same total spread evenly over the group's nodes, (N - 1) / N of it crossing the network;
    with co-activation samples the planner deduplicates copies, so this ratio is a lower bound.
    """
    layers = placement.moe_layers
    if not layers:
        return 1.0, 1.0
    gpus_per_node = placement.cluster.gpus_per_node
    nodes = max(1, math.ceil(ep / gpus_per_node))
    expert_sum = link_sum = 0.0
    for layer in layers:
        total = layer.metrics.mean_gpu_load * len(set(layer.gpus))
        expert_sum += max(1.0, layer.metrics.max_gpu_load * ep / total) if total else 1.0
        even_link = total * (nodes - 1) / (nodes * nodes * gpus_per_node)
        link_sum += max(1.0, layer.metrics.max_link_load / even_link) if even_link > 0 else 1.0
    return expert_sum / len(layers), link_sum / len(layers)


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


SWEEP_EPS = (8, 16, 32, 64, 128, 256)


def _plan(model: Model, ep: int, gpus_per_node: int, skew: float, policy: str) -> Placement:
    from moe_ep import plan as planner

    moe_layers = model.num_layers - model.num_dense_layers
    planner_model = planner.Model(
        num_layers=model.num_layers,
        dense_layers=tuple(range(model.num_dense_layers)),
        experts_per_layer=model.num_experts,
        top_k=model.top_k,
        bytes_per_expert=planner.gated_ffn_bytes(model.hidden, model.expert_ffn_hidden),
    )
    cluster = planner.Cluster(
        num_nodes=max(1, ep // gpus_per_node),
        gpus_per_node=min(ep, gpus_per_node),
        gpu_memory_bytes=0,
    )
    loads = planner.zipf_loads(moe_layers, model.num_experts, skew)
    return planner.plan(planner_model, cluster, loads=loads, policy=policy)


def sweep(
    model: Model,
    hw: Hardware,
    transport: Transport,
    per_gpu_batch: float,
    workload: Workload,
    tp: int,
    skew: float,
    eps=SWEEP_EPS,
):
    """Weak scaling over EP widths (batch per GPU fixed) for three placements of Zipf(skew)
    expert loads: uniform loads (the ideal), the planner's balanced plan, and no planner (the
    seeds' layout: experts in order, no replicas)."""
    points = []
    for ep in eps:
        strategy = parse_strategy(f"ep{ep}tp{min(tp, ep)}")
        scaled = dataclasses.replace(workload, batch=per_gpu_batch * strategy.num_gpus)
        point = {"ep": ep, "gpus": strategy.num_gpus}
        for label, policy in (
            ("uniform", None),
            ("planner", "balanced"),
            ("no_planner", "sequential"),
        ):
            placed = strategy
            if policy:
                plan = _plan(model, ep, hw.gpus_per_node, skew, policy)
                expert, link = placement_factors(plan, ep)
                slots = len(plan.moe_layers[0].phy2log)
                placed = dataclasses.replace(
                    strategy,
                    expert_imbalance=expert,
                    link_imbalance=link,
                    redundant_experts=max(0, slots - model.num_experts),
                )
                point[f"{label}_imbalance"] = [expert, link]
            p = predict(model, hw, placed, scaled, transport)
            point[f"{label}_tokens_per_s"] = p.tokens_per_s
            point[f"{label}_bottleneck"] = p.bottleneck
            point[f"{label}_fits_in_memory"] = p.fits_in_memory
        points.append(point)
    return points


def plot_sweeps(sweeps: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sweeps), figsize=(4.6 * len(sweeps), 3.8), squeeze=False)
    for axis, (name, points) in zip(axes[0], sweeps.items(), strict=True):
        eps = [pt["ep"] for pt in points]
        styles = (
            ("uniform", "k:", "uniform load"),
            ("planner", "o-", "Zipf, planner"),
            ("no_planner", "s--", "Zipf, no planner"),
        )
        for key, style, label in styles:
            axis.plot(eps, [pt[f"{key}_tokens_per_s"] for pt in points], style, label=label)
        base = points[0]["uniform_tokens_per_s"] / points[0]["gpus"]
        axis.plot(
            eps, [base * pt["gpus"] for pt in points], color="grey", lw=0.8, label="linear from EP8"
        )
        axis.set(
            xscale="log", yscale="log", xlabel="EP width (GPUs)", ylabel="tokens/s", title=name
        )
        axis.set_xticks(eps, [str(ep) for ep in eps])
        axis.legend(fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moe_ep.perf", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--model", default="seeds", choices=sorted(MODELS))
    parser.add_argument("--hardware", default="h100", choices=sorted(HARDWARE))
    parser.add_argument(
        "--transport",
        default="nccl",
        choices=sorted(TRANSPORTS),
        help="all-to-all implementation (default: NCCL, moe_ep's own)",
    )
    parser.add_argument("--calibrate", metavar="JSON", help="bench_local.py --json output")
    parser.add_argument("--strategy", default="ep16tp8", help="e.g. tp8pp2, ep16tp8, seeds3904")
    parser.add_argument("--compare", help="comma-separated strategies, the first is the baseline")
    parser.add_argument(
        "--dispatch-dtype",
        choices=["model", "fp8"],
        default="model",
        help="the dtype dispatch sends tokens in: the model's activations, or FP8 with a float32 "
        "scale per 128 channels (MoELayer(dispatch_dtype=torch.float8_e4m3fn)); combine stays",
    )
    parser.add_argument("--phase", default="decode", choices=["prefill", "decode"])
    parser.add_argument("--batch", type=float, default=64, help="sequences per step, in total")
    parser.add_argument("--seq", type=float, default=2048, help="prompt or context length")
    parser.add_argument("--draft-tokens", type=int, default=0, help="decode: MTP drafts per step")
    parser.add_argument("--acceptance", type=float, default=0.0, help="decode: draft acceptance")
    parser.add_argument(
        "--disaggregated", action="store_true", help="prefill: the KV cache leaves for decode nodes"
    )
    parser.add_argument("--nodes", type=int, help="nodes in the cluster (default: as needed)")
    parser.add_argument("--imbalance", type=float, default=1.0, help="expert load max/mean")
    parser.add_argument("--link-imbalance", type=float, default=1.0, help="link load max/mean")
    parser.add_argument(
        "--attention-imbalance", type=float, default=1.0, help="DP attention time max/mean"
    )
    parser.add_argument(
        "--placement",
        metavar="JSON",
        help="a plan from python -m moe_ep.plan: its per-GPU and per-link "
        "imbalance and replica slots replace --imbalance/--link-imbalance",
    )
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="EP 8..256 for the seeds' model and DeepSeek-V3, with and without the planner",
    )
    parser.add_argument("--zipf", type=float, default=0.5, help="--sweep: expert load skew")
    parser.add_argument("--plot", help="PNG path for --sweep")
    parser.add_argument("--json", help="JSON path for --sweep or --compare")
    parser.add_argument("--validate", action="store_true", help="published measurements table")
    parser.add_argument("--constants", action="store_true", help="derived constants, sources")
    args = parser.parse_args(argv)

    if args.constants:
        for name, c in CONSTANTS.items():
            print(f"{name:<32}{c.value:>12.4g} {c.unit:<9}{c.source}")
        return 0
    if args.validate:
        from moe_ep import perf_validation

        print(perf_validation.report())
        return 0

    hw = HARDWARE[args.hardware]
    if args.calibrate:
        hw = calibrate(hw, args.calibrate)
    transport = TRANSPORTS[args.transport]
    workload = Workload(
        args.phase, args.batch, args.seq, args.draft_tokens, args.acceptance, args.disaggregated
    )

    if args.sweep:
        per_gpu = args.batch / 16  # --batch is read as the batch of a 16-GPU deployment
        sweeps = {}
        for name in ("seeds", "deepseek-v3"):
            points = sweep(MODELS[name], hw, transport, per_gpu, workload, 8, args.zipf)
            sweeps[name] = points
            print(f"== {name}: tokens/s (uniform load | Zipf {args.zipf:g} planner | no planner)")
            for pt in points:
                print(
                    f"EP{pt['ep']:<4}{pt['uniform_tokens_per_s']:>14,.0f}"
                    f"{pt['planner_tokens_per_s']:>14,.0f}{pt['no_planner_tokens_per_s']:>14,.0f}"
                    f"  imbalance planner {pt['planner_imbalance'][0]:.2f}/"
                    f"{pt['planner_imbalance'][1]:.2f}, none {pt['no_planner_imbalance'][0]:.2f}/"
                    f"{pt['no_planner_imbalance'][1]:.2f}  {pt['planner_bottleneck']}"
                    f"{'' if pt['planner_fits_in_memory'] else ' (does not fit)'}"
                )
        if args.plot:
            title = (
                f"{hw.name}, {transport.name}, {args.phase}, {per_gpu:g} seqs/GPU x {args.seq:g}, "
                f"attention TP8 x DP, Zipf {args.zipf:g} expert loads"
            )
            plot_sweeps(sweeps, args.plot, title)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"hardware": hw.name, "sweeps": sweeps}, f, indent=1)
        return 0

    model = MODELS[args.model]
    overrides = {
        "expert_imbalance": args.imbalance,
        "link_imbalance": args.link_imbalance,
        "attention_imbalance": args.attention_imbalance,
    }
    if args.dispatch_dtype == "fp8":
        overrides["dispatch_bytes"] = dispatch_bytes(model.hidden, torch.float8_e4m3fn)
    placement = Placement.load(args.placement) if args.placement else None
    names = args.compare.split(",") if args.compare else [args.strategy]
    results = []
    for name in names:
        strategy = dataclasses.replace(parse_strategy(name), **overrides)
        if placement is not None:
            expert, link = placement_factors(placement, strategy.ep)
            slots = len(placement.moe_layers[0].phy2log) if placement.moe_layers else 0
            strategy = dataclasses.replace(
                strategy,
                expert_imbalance=expert,
                link_imbalance=link,
                redundant_experts=max(0, slots - model.num_experts),
            )
            print(
                f"placement {args.placement} ({placement.cluster.num_gpus} GPUs) for {name}: "
                f"expert imbalance {expert:.3f}, link imbalance {link:.3f}, "
                f"{slots} slots per layer"
            )
        p = predict(model, hw, strategy, workload, transport, args.nodes)
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

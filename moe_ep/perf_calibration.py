"""Constants of the cost model, derived from cited measurements, and fits to moe_ep's benchmarks.

``derive_constants`` turns the few figures of ``moe_ep/data/perf_calibration.json`` into every
efficiency, fixed cost and per-peer cost of the model, each in closed form from two figures where
one term dominates (docs/perf_model.md lists the formulas). It checks that each figure is
reproduced exactly by the model with the derived constants, which also checks that the regime
(memory- or compute-bound, network- or NVLink-bound) each derivation assumed is the one the model
lands in.

``fit_benchmark`` reads the JSON of ``benchmarks/bench_local.py --json`` (a GPU run of moe_ep's
own kernels) and returns the GPU fields it measures: the copy bandwidth, and the GEMM efficiency
curve fitted to the expert-FFN rows and the dense matmul.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

from moe_ep import _C

DATA_DIR = os.path.join(os.path.dirname(__file__), "data")
CALIBRATION_PATH = os.path.join(DATA_DIR, "perf_calibration.json")
DEDUP = {"expert": _C.Dedup.expert, "rank": _C.Dedup.rank, "node": _C.Dedup.node}


@dataclass(frozen=True)
class Constant:
    value: float
    unit: str
    source: str


def load_calibration(path: str = CALIBRATION_PATH) -> dict:
    with open(path) as f:
        return json.load(f)


def routing_spec(routing: dict) -> _C.RoutingSpec:
    native = _C.RoutingSpec()
    for name, value in routing.items():
        setattr(native, name, value)
    return native


def native_gpu(fields: dict) -> _C.GpuSpec:
    gpu = _C.GpuSpec()
    for name, value in fields.items():
        setattr(gpu, name, value)
    return gpu


def link_hardware(hardware: dict, ep: int, intra_efficiency=1.0, inter_efficiency=1.0):
    """A native HardwareSpec with the datasheet links of `hardware` and enough nodes for ep."""
    hw = _C.HardwareSpec()
    hw.gpus_per_node = hardware["gpus_per_node"]
    hw.num_nodes = max(1, math.ceil(ep / hw.gpus_per_node))
    hw.gpu_memory_bytes = hardware["gpu_memory_bytes"]
    hw.intra_node_bandwidth = hardware["intra_node_bandwidth"]
    hw.inter_node_bandwidth = hardware["inter_node_bandwidth"]
    hw.intra_node_efficiency = intra_efficiency
    hw.inter_node_efficiency = inter_efficiency
    return hw


def all_to_all_cost(config: dict, hw: _C.HardwareSpec, transport: _C.TransportSpec):
    """The model's cost of the all-to-all a figure's config describes (balanced links)."""
    return _C.perf_all_to_all_cost(
        config["tokens_per_gpu"],
        config["bytes_per_token"],
        routing_spec(config["routing"]),
        config["ep"],
        DEDUP[config["dedup"]],
        1.0,
        hw,
        transport,
    )


def all_to_all_bytes(config: dict, hardware: dict):
    """(NVLink bytes, network bytes) one GPU sends in the all-to-all of a figure's config."""
    cost = all_to_all_cost(config, link_hardware(hardware, config["ep"]), _C.TransportSpec())
    return cost.intra_node_bytes, cost.inter_node_bytes


def logical_bytes(config: dict, hardware: dict) -> float:
    """The bytes a published all-to-all bandwidth divides by its time, by the source's convention:
    'selections' (DeepEP / NCCL EP low-latency: every (token, expert) pair), 'ranks_hit' (DeepEP
    NVLink: tokens received by a rank, its own included) or 'nodes_hit' (DeepEP RDMA: tokens per
    destination node, the own node included)."""
    routing = routing_spec(config["routing"])
    tokens, size, ep = config["tokens_per_gpu"], config["bytes_per_token"], config["ep"]
    convention = config.get("bandwidth_bytes", "selections")
    if convention == "selections":
        return tokens * routing.top_k * size
    if convention == "ranks_hit":
        return tokens * size * ep * _C.perf_probability_block_hit(routing, routing.num_experts / ep)
    if convention == "nodes_hit":
        nodes = max(1, math.ceil(ep / hardware["gpus_per_node"]))
        hit = _C.perf_probability_block_hit(routing, routing.num_experts / nodes)
        return tokens * size * nodes * hit
    raise ValueError(f"bandwidth_bytes: unknown convention {convention!r}")


def figure_seconds(figure: dict, hardware: dict) -> float:
    """The published figure as a kernel time in seconds."""
    unit, value, config = figure["unit"], figure["published"], figure.get("config", {})
    if unit == "us":
        return value * 1e-6
    if unit == "TFLOPS":
        flops, _ = _gemm_work(config)
        return flops / (value * 1e12)
    if unit == "GB/s":
        return logical_bytes(config, hardware) / (value * 1e9)
    raise ValueError(f"figure {figure['id']}: no time for unit {unit!r}")


def gemm_cost(config: dict, gpu: _C.GpuSpec):
    """The model's cost of the GEMM a figure's config describes."""
    return _C.perf_gemm_cost(
        config["rows"],
        config["cols"],
        config["depth"],
        config["groups"],
        config["input_bytes"],
        config["output_bytes"],
        gpu,
    )


def _gemm_work(config: dict):
    work = gemm_cost(config, _C.GpuSpec())
    return work.flops, work.bytes


def _through_two_figures(figures: list[dict], hardware: dict, amount) -> tuple[float, float]:
    """(rate, fixed) of t = fixed + amount / rate through two figures' times, the amount (bytes)
    of each given by `amount(figure)`."""
    (x1, t1), (x2, t2) = ((amount(f), figure_seconds(f, hardware)) for f in figures)
    rate = (x2 - x1) / (t2 - t1)
    return rate, t1 - x1 / rate


def derive_constants(calibration: dict | None = None) -> dict[str, Constant]:
    """Every efficiency and fixed cost of the model, from the calibration figures."""
    calibration = calibration or load_calibration()
    hardware = calibration["hardware"]
    fig = {f["id"]: f for f in calibration["figures"]}
    out: dict[str, Constant] = {}

    def put(name, value, unit, ids, how):
        out[name] = Constant(value, unit, f"{how} [{', '.join(ids)}]")

    # Memory-bound GEMMs: t = kernel_fixed + bytes / (bandwidth x memory_efficiency).
    h800 = hardware["h800"]
    mem_ids = ["deepgemm-normal-m64-n2112-k7168", "deepgemm-normal-m64-n7168-k16384"]
    rate, fixed = _through_two_figures(
        [fig[i] for i in mem_ids], h800, lambda f: _gemm_work(f["config"])[1]
    )
    put(
        "memory_efficiency",
        rate / h800["memory_bandwidth"],
        "fraction",
        mem_ids,
        "two memory-bound GEMMs: t = fixed + bytes / (HBM x efficiency)",
    )
    put("kernel_fixed_s", fixed, "s", mem_ids, "the same two GEMMs' intercept")

    # Compute-bound GEMMs: efficiency = FLOPs / ((t - fixed) x FP8 peak), then the curve's three
    # parameters from three shapes that differ in one dimension at a time.
    ids = {
        "c": "deepgemm-contiguous-g4-m8192-n4096-k7168",
        "d": "deepgemm-contiguous-g4-m8192-n7168-k2048",
        "e": "deepgemm-masked-g4-m256-n4096-k7168",
    }
    peak_fp8 = h800["peak_flops_bf16"] * h800["fp8_speedup"]
    eff, shape = {}, {}
    for key, figure_id in ids.items():
        flops, _ = _gemm_work(fig[figure_id]["config"])
        eff[key] = flops / ((figure_seconds(fig[figure_id], h800) - fixed) * peak_fp8)
        shape[key] = (fig[figure_id]["config"]["rows"], fig[figure_id]["config"]["depth"])
    (m_c, k_c), (_, k_d), (m_e, _) = shape["c"], shape["d"], shape["e"]
    ratio_k, ratio_m = eff["d"] / eff["c"], eff["e"] / eff["c"]
    half_depth = k_c * k_d * (ratio_k - 1) / (k_d - ratio_k * k_c)
    half_rows = m_c * m_e * (ratio_m - 1) / (m_e - ratio_m * m_c)
    peak_eff = eff["c"] * (m_c + half_rows) / m_c * (k_c + half_depth) / k_c
    put(
        "gemm_half_depth",
        half_depth,
        "K",
        [ids["c"], ids["d"]],
        "same rows, K 7168 vs 2048: ratio of K / (K + K0)",
    )
    put(
        "gemm_half_rows",
        half_rows,
        "rows",
        [ids["c"], ids["e"]],
        "same K, 8192 vs 256 rows per expert: ratio of M / (M + M0)",
    )
    put(
        "gemm_peak_efficiency",
        peak_eff,
        "fraction",
        list(ids.values()),
        "the 8192-row, K 7168 efficiency over its row and depth factors",
    )

    put(
        "attention_memory_efficiency",
        fig["flashmla-decode-memory-bound"]["published"] * 1e9 / h800["memory_bandwidth"],
        "fraction",
        ["flashmla-decode-memory-bound"],
        "3000 GB/s over the H800's 3.35 TB/s",
    )
    put(
        "attention_compute_efficiency",
        fig["flashmla-decode-compute-bound"]["published"] * 1e12 / h800["peak_flops_bf16"],
        "fraction",
        ["flashmla-decode-compute-bound"],
        "660 TFLOP/s over the BF16 peak",
    )

    # Links, each from two DeepEP all-to-alls where its bytes differ: NVLink from a
    # bandwidth-bound and a latency-bound single-node one, the network from two low-latency
    # dispatches across nodes (network-bound).
    links = (
        (
            "intra_node",
            "nvlink",
            0,
            ["deepep-v1-ll-dispatch-ep8", "deepep-v1-normal-intranode-dispatch-ep8"],
        ),
        ("inter_node", "network", 1, ["deepep-v1-ll-dispatch-ep16", "deepep-v1-ll-dispatch-ep256"]),
    )
    for link, fixed_name, side, ids in links:
        rate, link_fixed = _through_two_figures(
            [fig[i] for i in ids],
            h800,
            lambda f, side=side: all_to_all_bytes(f["config"], h800)[side],
        )
        put(
            f"{link}_efficiency",
            rate / h800[f"{link}_bandwidth"],
            "fraction",
            ids,
            f"two all-to-alls: t = fixed + {fixed_name} bytes / ({fixed_name} x efficiency)",
        )
        put(f"deepep.{fixed_name}_fixed_s", link_fixed, "s", ids, "their intercept")
    net_ids = links[1][3]
    put(
        "deepep.per_peer_s",
        0.0,
        "s",
        ["deepep-v1-ll-dispatch-ep16"],
        "assumption: not resolvable from the published table (perf_calibration.json)",
    )
    put(
        "deepep-normal.sms",
        fig["deepep-normal-sms"]["published"],
        "SMs",
        ["deepep-normal-sms"],
        "DeepEP's own setting",
    )

    # NCCL inside one NVLink domain: latency against the number of peers.
    nccl_ids = ["nccl-alltoall-baseline-8gpu-16b", "nccl-alltoall-baseline-32gpu-16b"]
    gb200 = hardware["gb200"]
    gb200_rate = gb200["intra_node_bandwidth"] * out["intra_node_efficiency"].value
    points = []
    for i in nccl_ids:
        intra, _ = all_to_all_bytes(fig[i]["config"], gb200)
        points.append(
            (fig[i]["config"]["ep"] - 1, figure_seconds(fig[i], gb200) - intra / gb200_rate)
        )
    (peers_a, t_a), (peers_b, t_b) = points
    per_peer = (t_b - t_a) / (peers_b - peers_a)
    put("nccl.per_peer_s", per_peer, "s", nccl_ids, "slope of latency against peers")
    put("nccl.nvlink_fixed_s", t_a - peers_a * per_peer, "s", nccl_ids, "its intercept")
    put(
        "nccl.network_fixed_s",
        out["deepep.network_fixed_s"].value,
        "s",
        net_ids,
        "assumption: DeepEP's network intercept",
    )
    put(
        "nccl.sms",
        fig["deepep-normal-sms"]["published"],
        "SMs",
        ["deepep-normal-sms"],
        "assumption: DeepEP normal kernels' SM count",
    )
    _check_physical(out)
    _check_reproduced(calibration, out)
    return out


def _check_physical(constants: dict[str, Constant]) -> None:
    """Efficiencies in (0, 1], times and shape constants not negative."""
    for name, constant in constants.items():
        low_ok = constant.value > 0 if constant.unit == "fraction" else constant.value >= 0
        if not low_ok or (constant.unit == "fraction" and constant.value > 1):
            raise ValueError(
                f"calibration constant {name} = {constant.value:.4g} {constant.unit} is outside "
                f"its physical range; its figures: {constant.source}"
            )


def gpu_fields(constants: dict[str, Constant]) -> dict:
    names = (
        "gemm_peak_efficiency",
        "gemm_half_rows",
        "gemm_half_depth",
        "memory_efficiency",
        "kernel_fixed_s",
        "attention_compute_efficiency",
        "attention_memory_efficiency",
    )
    return {name: constants[name].value for name in names}


def transport_fields(constants: dict[str, Constant], name: str) -> dict:
    """nvlink_fixed_s, network_fixed_s, per_peer_s and sms of one transport of the data file."""
    family = "nccl" if name == "nccl" else "deepep"
    sms = {"nccl": "nccl.sms", "deepep-normal": "deepep-normal.sms"}.get(name)
    return {
        "nvlink_fixed_s": constants[f"{family}.nvlink_fixed_s"].value,
        "network_fixed_s": constants[f"{family}.network_fixed_s"].value,
        "per_peer_s": constants[f"{family}.per_peer_s"].value,
        "sms": int(constants[sms].value) if sms else 0,
    }


def _check_reproduced(calibration: dict, constants: dict[str, Constant]) -> None:
    """Each timed calibration figure, predicted back with the derived constants, must match."""
    hardware = calibration["hardware"]
    gpu_template = gpu_fields(constants)
    for figure in calibration["figures"]:
        config, hw = figure.get("config"), hardware.get(figure.get("hardware", ""))
        if figure["kind"] == "gemm":
            gpu = native_gpu(
                {
                    **gpu_template,
                    "peak_flops": hw["peak_flops_bf16"],
                    "fp8_speedup": hw["fp8_speedup"],
                    "memory_bandwidth": hw["memory_bandwidth"],
                }
            )
            predicted = gemm_cost(config, gpu).time_s
        elif figure["kind"] == "all_to_all":
            transport = _C.TransportSpec()
            for name, value in transport_fields(constants, figure["transport"]).items():
                setattr(transport, name, value)
            links = link_hardware(
                hw,
                config["ep"],
                constants["intra_node_efficiency"].value,
                constants["inter_node_efficiency"].value,
            )
            predicted = all_to_all_cost(config, links, transport).time_s
        else:
            continue
        measured = figure_seconds(figure, hw)
        if not math.isclose(predicted, measured, rel_tol=1e-9):
            raise ValueError(
                f"calibration figure {figure['id']}: the derived constants give "
                f"{predicted * 1e6:.3f} us, the figure {measured * 1e6:.3f} us; the regime its "
                "derivation assumed does not hold"
            )


# ----------------------------------------------------------------------------- moe_ep's benchmarks

BENCHMARK_RATES = (
    "matmul_flops_per_s",
    "memory_bytes_per_s",
    "intra_node_bytes_per_s",
    "inter_node_bytes_per_s",
)


def _positive_rates(path: str, data: dict) -> dict:
    rates = data.get("rates", data if "rows" not in data else {})
    unknown = set(rates) - set(BENCHMARK_RATES)
    if unknown:
        raise ValueError(f"calibration file {path}: unknown keys {sorted(unknown)}")
    for key, value in rates.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ValueError(f"calibration file {path}: {key} must be a positive number")
    return rates


def _achieved(rate: float, nominal: float, rate_field: str, efficiency_field: str) -> dict:
    """A measured rate as an efficiency of the nominal one; above it, the nominal one is wrong
    for this device and the measurement replaces it."""
    if rate > nominal:
        return {rate_field: rate, efficiency_field: 1.0}
    return {efficiency_field: rate / nominal}


def fit_benchmark(path: str, hardware: dict) -> dict:
    """Hardware fields measured by a `bench_local.py --json` file (or a plain {"rates": ...}).

    `hardware` holds the fields the fit starts from (peak_flops_bf16, memory_bandwidth,
    intra/inter_node_bandwidth, gemm_half_rows, gemm_half_depth). Returns the fields to replace:
    memory and link efficiencies from the measured rates; gemm_peak_efficiency and
    gemm_half_rows from a least-squares fit of 1 / efficiency against 1 / rows over the
    compute-bound expert-FFN rows and the dense matmul (BF16), the depth factor K / (K + K0)
    taken out first (gate/up have K = hidden, two thirds of the FLOPs; down has K = ffn)."""
    with open(path) as f:
        data = json.load(f)
    rates = _positive_rates(path, data)
    changes: dict = {}
    links = (
        ("memory_bytes_per_s", "memory_bandwidth", "memory_efficiency"),
        ("intra_node_bytes_per_s", "intra_node_bandwidth", "intra_node_efficiency"),
        ("inter_node_bytes_per_s", "inter_node_bandwidth", "inter_node_efficiency"),
    )
    for key, rate_field, efficiency_field in links:
        if key in rates:
            changes.update(
                _achieved(rates[key], hardware[rate_field], rate_field, efficiency_field)
            )

    peak, half_depth = hardware["peak_flops_bf16"], hardware["gemm_half_depth"]

    def depth_factor(depth: float) -> float:
        return depth / (depth + half_depth)

    points = []  # (rows, efficiency with the depth factor taken out)
    if "matmul_flops_per_s" in rates:
        size = data.get("args", {}).get("mm_size") or 8192
        points.append((size, rates["matmul_flops_per_s"] / (peak * depth_factor(size))))
    copy_rate = rates.get("memory_bytes_per_s")
    for row in data.get("rows", []):
        if row.get("op") not in ("expert_ffn", "ffn_local") or not row.get("flops"):
            continue
        seconds = row["ms ours"] * 1e-3
        if copy_rate and row["bytes"] / copy_rate > 0.5 * seconds:
            continue  # bound by reading the weights, not by the tensor cores
        spread = (2.0 / 3.0) / depth_factor(row["H"]) + (1.0 / 3.0) / depth_factor(row["F"])
        points.append((row["rows/exp"], row["flops"] / seconds / peak * spread))
    if not points:
        return changes
    if len({rows for rows, _ in points}) >= 2:
        xs = [1.0 / rows for rows, _ in points]
        ys = [1.0 / efficiency for _, efficiency in points]
        mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sum(
            (x - mean_x) ** 2 for x in xs
        )
        intercept = mean_y - slope * mean_x
        peak_efficiency, half_rows = 1.0 / intercept, max(0.0, slope / intercept)
    else:
        rows, efficiency = points[0]
        half_rows = hardware["gemm_half_rows"]
        peak_efficiency = efficiency * (rows + half_rows) / rows
    if peak_efficiency > 1.0:  # a faster device than the preset's datasheet
        changes["peak_flops_bf16"] = peak * peak_efficiency
        peak_efficiency = 1.0
    changes["gemm_peak_efficiency"] = peak_efficiency
    changes["gemm_half_rows"] = half_rows
    return changes

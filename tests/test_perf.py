"""Tests of the cost model's Python layer: constants derived from the calibration figures, the
benchmark fit, the placement input, the validation plumbing and the CLI. The physics of each
term is pinned in C++ (csrc/core/tests/test_perf*.cpp); these check the layer above it against
hand-computed cases, never against the validation figures."""

import copy
import dataclasses
import json
import math

import pytest

from moe_ep import _C, perf, perf_calibration, perf_validation
from moe_ep import plan as planner


def test_bindings_match_hand_computed_formulas():
    seeds = perf._copy_fields(perf.MODELS["seeds"], _C.ModelSpec())
    assert _C.perf_attention_params_per_layer(seeds) == 4 * 7168 * 16384
    assert _C.perf_expert_params(seeds) * 2 == 88080384  # gated FFN, 3 matrices, BF16
    v3 = perf._copy_fields(perf.MODELS["deepseek-v3"], _C.ModelSpec())
    assert _C.perf_kv_cache_bytes_per_token_per_layer(v3) == 576 * 2
    routing = perf_calibration.routing_spec({"num_experts": 64, "top_k": 2})
    assert _C.perf_probability_block_hit(routing, 1) == pytest.approx(2 / 64)
    # One FP8 GEMM on an ideal 1 PFLOP/s GPU: 2 M N K FLOPs at twice the BF16 rate.
    gpu = perf_calibration.native_gpu({"peak_flops": 1e15, "memory_bandwidth": 1e15})
    cost = _C.perf_gemm_cost(1024, 2048, 4096, 1, 1, 2, gpu)
    assert cost.time_s == pytest.approx(2 * 1024 * 2048 * 4096 / 2e15)


def _synthetic_calibration(truth: dict) -> dict:
    """The calibration file with every timed figure replaced by what `truth` (efficiencies and
    fixed costs) gives, computed here independently of the C++ model."""
    data = copy.deepcopy(perf_calibration.load_calibration())
    sheets = data["hardware"]
    h800 = sheets["h800"]
    for figure in data["figures"]:
        config = figure.get("config", {})
        if figure["kind"] == "gemm":
            m, n, k, g = config["rows"], config["cols"], config["depth"], config["groups"]
            flops = 2 * m * n * k * g
            nbytes = g * (n * k + m * k) * 1 + g * m * n * 2
            eff = truth["e"] * m / (m + truth["m0"]) * k / (k + truth["k0"])
            seconds = truth["fixed"] + max(
                flops / (h800["peak_flops_bf16"] * 2 * eff),
                nbytes / (h800["memory_bandwidth"] * truth["mem"]),
            )
            figure["published"] = flops / seconds / 1e12
        elif figure["kind"] == "all_to_all":
            sheet = sheets[figure["hardware"]]
            tokens, size, ep = config["tokens_per_gpu"], config["bytes_per_token"], config["ep"]
            top_k = config["routing"]["top_k"]
            ranks = min(ep, sheet["gpus_per_node"])
            if config["dedup"] == "expert":  # one copy per (token, expert)
                nvl = tokens * size * top_k * (ranks - 1) / ep
                net = tokens * size * top_k * (ep - ranks) / ep
            else:  # one node; a rank (32 of 256 experts for DeepEP) is hit with probability p
                every = config["routing"]["num_experts"] == top_k
                p = 1.0 if every else 1 - math.prod((224 - i) / (256 - i) for i in range(8))
                nvl, net = tokens * size * (ranks - 1) * p, 0.0
            nccl = figure["transport"] == "nccl"
            fixed = (
                (truth["nccl_fixed"] if nccl else truth["nvl_fixed"])
                if net == 0
                else truth["net_fixed"]
            )
            per_peer = truth["nccl_peer"] * (ep - 1) if nccl else 0.0
            seconds = (
                fixed
                + per_peer
                + max(
                    nvl / (sheet["intra_node_bandwidth"] * truth["nvl"]),
                    net / (sheet["inter_node_bandwidth"] * truth["net"]),
                )
            )
            if figure["unit"] == "us":
                figure["published"] = seconds * 1e6
            else:  # DeepEP's NVLink convention: tokens received by a rank, its own included
                figure["published"] = tokens * size * ep * p / seconds / 1e9
    return data


def test_constants_are_recovered_from_figures_made_with_known_constants():
    truth = {
        "e": 0.7,
        "m0": 120.0,
        "k0": 250.0,
        "mem": 0.8,
        "fixed": 3e-6,
        "nvl": 0.75,
        "net": 0.9,
        "nvl_fixed": 25e-6,
        "net_fixed": 40e-6,
        "nccl_fixed": 8e-6,
        "nccl_peer": 6e-7,
    }
    constants = perf_calibration.derive_constants(_synthetic_calibration(truth))
    expected = {
        "gemm_peak_efficiency": truth["e"],
        "gemm_half_rows": truth["m0"],
        "gemm_half_depth": truth["k0"],
        "memory_efficiency": truth["mem"],
        "kernel_fixed_s": truth["fixed"],
        "intra_node_efficiency": truth["nvl"],
        "inter_node_efficiency": truth["net"],
        "deepep.nvlink_fixed_s": truth["nvl_fixed"],
        "deepep.network_fixed_s": truth["net_fixed"],
        "nccl.nvlink_fixed_s": truth["nccl_fixed"],
        "nccl.per_peer_s": truth["nccl_peer"],
    }
    for name, value in expected.items():
        assert constants[name].value == pytest.approx(value, rel=1e-6), name
    assert constants["attention_memory_efficiency"].value == pytest.approx(3000e9 / 3.35e12)
    assert constants["attention_compute_efficiency"].value == pytest.approx(660 / 989)


def test_a_derivation_whose_regime_does_not_hold_is_refused():
    data = perf_calibration.load_calibration()
    for figure in data["figures"]:
        if figure["id"] == "deepgemm-normal-m64-n2112-k7168":
            figure["published"] = 1500.0  # compute-bound speed on a memory-bound shape
    with pytest.raises(ValueError, match="calibration"):
        perf_calibration.derive_constants(data)


def test_every_constant_names_its_figures():
    ids = {f["id"] for f in perf.CALIBRATION["figures"]}
    for name, constant in perf.CONSTANTS.items():
        cited = constant.source[constant.source.index("[") + 1 : -1].split(", ")
        assert cited and set(cited) <= ids, name


def _write_benchmark(path, peak, e, m0, k0, copy_rate, rows_per_expert, hidden=7168, ffn=2048):
    """A bench_local.py JSON whose expert-FFN rows follow efficiency e M/(M+m0) K/(K+k0)."""
    rows = []
    for m in rows_per_expert:
        up, down = 2 * m * 2 * ffn * hidden, 2 * m * hidden * ffn
        rate_up = peak * e * m / (m + m0) * hidden / (hidden + k0)
        rate_down = peak * e * m / (m + m0) * ffn / (ffn + k0)
        seconds = up / rate_up + down / rate_down
        rows.append(
            {
                "op": "ffn_local",
                "rows/exp": m,
                "H": hidden,
                "F": ffn,
                "flops": up + down,
                "bytes": 3 * hidden * ffn * 2,
                "ms ours": seconds * 1e3,
            }
        )
    matmul = peak * e * 8192 / (8192 + m0) * 8192 / (8192 + k0)
    path.write_text(
        json.dumps(
            {
                "args": {"mm_size": 8192},
                "rates": {"matmul_flops_per_s": matmul, "memory_bytes_per_s": copy_rate},
                "rows": rows,
            }
        )
    )


def test_benchmark_fit_recovers_the_gemm_curve_and_memory_rate(tmp_path):
    hw = perf.HARDWARE["h100"]
    path = tmp_path / "local.json"
    _write_benchmark(
        path, hw.peak_flops_bf16, 0.66, 150.0, hw.gemm_half_depth, 2.9e12, [256, 512, 1024, 4096]
    )
    calibrated = perf.calibrate(hw, str(path))
    assert calibrated.name == "h100+calibrated"
    assert calibrated.gemm_peak_efficiency == pytest.approx(0.66, rel=1e-9)
    assert calibrated.gemm_half_rows == pytest.approx(150.0, rel=1e-9)
    assert calibrated.memory_efficiency == pytest.approx(2.9e12 / 3.35e12)
    assert calibrated.peak_flops_bf16 == hw.peak_flops_bf16
    assert calibrated.inter_node_efficiency == hw.inter_node_efficiency


def test_benchmark_from_a_faster_device_replaces_the_datasheet(tmp_path):
    hw = perf.HARDWARE["h100"]
    path = tmp_path / "rates.json"
    path.write_text(
        json.dumps(
            {
                "rates": {
                    "matmul_flops_per_s": 2e15,
                    "memory_bytes_per_s": 5e12,
                    "inter_node_bytes_per_s": 45e9,
                }
            }
        )
    )
    calibrated = perf.calibrate(hw, str(path))
    assert calibrated.memory_bandwidth == 5e12 and calibrated.memory_efficiency == 1.0
    assert calibrated.gemm_peak_efficiency == 1.0
    assert calibrated.peak_flops_bf16 * _square_matmul_factor(hw, 8192) == pytest.approx(2e15)
    assert calibrated.inter_node_efficiency == pytest.approx(45e9 / 50e9)


def _square_matmul_factor(hw, size):
    return size / (size + hw.gemm_half_rows) * size / (size + hw.gemm_half_depth)


def test_benchmark_file_errors_name_the_key(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"flops": 1}))
    with pytest.raises(ValueError, match="unknown keys"):
        perf.calibrate(perf.HARDWARE["h100"], str(path))
    path.write_text(json.dumps({"rates": {"memory_bytes_per_s": -3}}))
    with pytest.raises(ValueError, match="memory_bytes_per_s must be a positive number"):
        perf.calibrate(perf.HARDWARE["h100"], str(path))


def test_bad_field_raises_value_error_naming_it():
    with pytest.raises(ValueError, match="model.top_k"):
        perf.predict(
            dataclasses.replace(perf.MODELS["seeds"], top_k=65),
            perf.HARDWARE["h100"],
            perf.Strategy(),
            perf.Workload(),
        )
    with pytest.raises(ValueError, match="strategy.ep"):
        perf.predict(
            perf.MODELS["seeds"], perf.HARDWARE["h100"], perf.Strategy(ep=3), perf.Workload()
        )
    with pytest.raises(ValueError, match="workload.acceptance_rate"):
        perf.predict(
            perf.MODELS["seeds"],
            perf.HARDWARE["h100"],
            perf.Strategy(),
            perf.Workload(acceptance_rate=1.5),
        )


@pytest.mark.parametrize(
    "text, expected",
    [
        ("tp8pp2", perf.Strategy(tp=8, pp=2, micro_batches=2)),
        ("ep16tp8", perf.Strategy(tp=8, ep=16, dp=2, micro_batches=2, overlap=True)),
        ("ep16-serial", perf.Strategy(ep=16, dp=16, micro_batches=1)),
        ("seeds3904", perf.Strategy(pp=61, ep=64, dp=64, micro_batches=64, overlap=True)),
    ],
)
def test_parse_strategy(text, expected):
    assert perf.parse_strategy(text) == expected


def test_parse_strategy_rejects_garbage():
    with pytest.raises(ValueError, match="strategy"):
        perf.parse_strategy("tp8xx2")
    with pytest.raises(ValueError, match="suffix"):
        perf.parse_strategy("ep16-fast")


def test_more_network_bandwidth_is_never_slower():
    model, hw = perf.MODELS["deepseek-v3"], perf.HARDWARE["h800"]
    strategy = perf.parse_strategy("ep64")
    workload = perf.Workload("decode", 64 * 128, 4096)
    times = [
        perf.predict(
            model,
            dataclasses.replace(hw, inter_node_bandwidth=bw),
            strategy,
            workload,
            perf.TRANSPORTS["deepep-ll"],
        ).step_time_s
        for bw in (12.5e9, 25e9, 50e9, 100e9, 400e9)
    ]
    assert all(
        later <= earlier * (1 + 1e-12) for earlier, later in zip(times[:-1], times[1:], strict=True)
    )
    assert times[-1] < times[0]


def _layer(layer, gpus, max_gpu, mean_gpu, max_link):
    return planner.LayerPlacement(
        layer=layer,
        dense=False,
        phy2log=tuple(range(len(gpus))),
        log2phy=tuple((i,) for i in range(len(gpus))),
        replica_count=(1,) * len(gpus),
        gpus=tuple(gpus),
        metrics=planner.LayerMetrics(
            max_gpu_load=max_gpu, mean_gpu_load=mean_gpu, max_link_load=max_link
        ),
    )


def test_placement_factors_by_hand():
    cluster = planner.Cluster(num_nodes=2, gpus_per_node=8, gpu_memory_bytes=0)
    model = planner.Model(num_layers=3, dense_layers=(0,), experts_per_layer=8, top_k=2)
    # Layer 1: 8 experts on GPUs 0..7 (one node), loads max 3, mean 2: 16 pairs in all. Spread
    # over 16 GPUs the mean is 1, so the busiest GPU is 3x it. Evenly over 2 nodes, each NIC
    # would carry 16 x (1/2) / 2 / 8 = 0.5 tokens; the planner's busiest carries 1.0: 2x.
    # Layer 2: 16 experts on 16 GPUs, max 1.5 of mean 1 (1.5x); NIC 0.75 of 0.5 (1.5x).
    layers = (
        planner.LayerPlacement(0, True, (), (), (), (0,)),
        _layer(1, range(8), 3.0, 2.0, 1.0),
        _layer(2, range(16), 1.5, 1.0, 0.75),
    )
    placement = planner.Placement(model, cluster, "balanced", layers, (0.0,) * 16)
    expert, link = perf.placement_factors(placement, 16)
    assert expert == pytest.approx((3.0 + 1.5) / 2)
    assert link == pytest.approx((2.0 + 1.5) / 2)


def test_a_better_placement_predicts_a_faster_step():
    model = perf.MODELS["deepseek-v3"]
    hw, transport = perf.HARDWARE["h100"], perf.TRANSPORTS["deepep-ll"]
    strategy = perf.parse_strategy("ep32")
    workload = perf.Workload("decode", 32 * 128, 2048)
    throughput = {}
    for policy in ("balanced", "sequential"):
        placement = perf._plan(model, 32, hw.gpus_per_node, 1.0, policy)
        expert, link = perf.placement_factors(placement, 32)
        placed = dataclasses.replace(strategy, expert_imbalance=expert, link_imbalance=link)
        throughput[policy] = perf.predict(model, hw, placed, workload, transport).tokens_per_s
        assert expert >= 1.0 and link >= 1.0
    assert throughput["balanced"] > 1.2 * throughput["sequential"]


def test_cli_placement_replaces_the_imbalance(tmp_path, capsys):
    model = perf.MODELS["deepseek-v3"]
    placement = perf._plan(model, 16, 8, 1.0, "sequential")
    path = tmp_path / "plan.json"
    placement.save(str(path))
    expert, link = perf.placement_factors(placement, 16)
    assert (
        perf.main(
            [
                "--model",
                "deepseek-v3",
                "--strategy",
                "ep16",
                "--placement",
                str(path),
                "--json",
                str(tmp_path / "p.json"),
            ]
        )
        == 0
    )
    assert f"expert imbalance {expert:.3f}, link imbalance {link:.3f}" in capsys.readouterr().out
    planned = json.loads((tmp_path / "p.json").read_text())[0]["tokens_per_s"]
    assert (
        perf.main(
            ["--model", "deepseek-v3", "--strategy", "ep16", "--json", str(tmp_path / "u.json")]
        )
        == 0
    )
    assert planned < json.loads((tmp_path / "u.json").read_text())[0]["tokens_per_s"]


def test_validation_data_is_separate_cited_and_complete():
    data = perf_validation.load_validation()
    assert data["tolerance"] == 0.25
    calibration_ids = {f["id"] for f in perf.CALIBRATION["figures"]}
    ids = [row["id"] for row in data["rows"]]
    assert len(ids) == len(set(ids)) and not calibration_ids & set(ids)
    for row in data["rows"] + perf.CALIBRATION["figures"]:
        assert row["source"].startswith("https://"), row["id"]
        assert row["published"] > 0, row["id"]
    for entry in data["out_of_scope"]:
        assert entry["source"].startswith("https://") and entry["reason"], entry
    # Every row of the DeepGEMM, DeepEP V1, NCCL EP and NCCL all-to-all tables is in one file.
    counts = {"deepgemm": 28, "deepep-v1": 20, "nccl-ep": 8, "nccl-alltoall": 8}
    for prefix, count in counts.items():
        both = [i for i in ids + sorted(calibration_ids) if i.startswith(prefix)]
        assert len(both) == count, prefix


def test_every_validation_row_is_predicted_and_summarized():
    data = perf_validation.load_validation()
    rows = perf_validation.validation_rows(data)
    assert len(rows) == len(data["rows"])
    assert all(math.isfinite(r["predicted"]) and r["predicted"] > 0 for r in rows)
    fake = [{"error": e, "within": abs(e) <= 0.25} for e in (0.1, -0.3, 0.2)]
    assert perf_validation.summarize(fake) == pytest.approx(
        {"rows": 3, "within": 2, "mean_signed_error": 0.0, "mean_absolute_error": 0.2}
    )


def test_cli_validate_and_constants(capsys):
    assert perf.main(["--validate"]) == 0
    out = capsys.readouterr().out
    assert "deepep-v1-ll-dispatch-ep128" in out and "mean signed error" in out
    assert "out of scope" in out
    assert perf.main(["--constants"]) == 0
    out = capsys.readouterr().out
    assert "gemm_half_rows" in out and "deepgemm-masked-g4-m256-n4096-k7168" in out


def test_cli_compare_prints_ratios(capsys):
    assert perf.main(["--compare", "tp8pp2,ep16tp8", "--phase", "prefill", "--batch", "16"]) == 0
    out = capsys.readouterr().out
    assert "== versus tp8pp2" in out and "throughput x" in out and "bottleneck" in out


def test_cli_sweep_writes_plot_and_json(tmp_path, capsys):
    png, js = tmp_path / "s.png", tmp_path / "s.json"
    args = ["--sweep", "--phase", "prefill", "--batch", "32", "--seq", "2048"]
    assert perf.main([*args, "--plot", str(png), "--json", str(js)]) == 0
    sweeps = json.loads(js.read_text())["sweeps"]
    assert set(sweeps) == {"seeds", "deepseek-v3"}
    for points in sweeps.values():
        assert [p["ep"] for p in points] == [8, 16, 32, 64, 128, 256]
        for p in points:
            assert p["no_planner_tokens_per_s"] <= p["planner_tokens_per_s"] * (1 + 1e-9)
            assert p["planner_tokens_per_s"] <= p["uniform_tokens_per_s"] * (1 + 1e-9)
    assert png.stat().st_size > 1000
    assert "EP256" in capsys.readouterr().out

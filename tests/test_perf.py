"""Tests of the cost model's Python layer, CLI and the published-measurement regression table."""

import dataclasses
import json

import pytest

from moe_ep import _C, perf


def test_bindings_match_hand_computed_formulas():
    seeds = perf._native(perf.MODELS["seeds"], _C.ModelSpec)
    assert _C.perf_attention_params_per_layer(seeds) == 4 * 7168 * 16384
    assert _C.perf_expert_params(seeds) * 2 == 88080384  # gated FFN, 3 matrices, BF16
    v3 = perf._native(perf.MODELS["deepseek-v3"], _C.ModelSpec)
    assert _C.perf_kv_cache_bytes_per_token_per_layer(v3) == 576 * 2
    assert _C.perf_probability_group_hit(64, 1, 2) == pytest.approx(2 / 64)


def test_bad_field_raises_value_error_naming_it():
    with pytest.raises(ValueError, match="model.top_k"):
        perf.predict(
            dataclasses.replace(perf.MODELS["seeds"], top_k=65),
            perf.HARDWARE["h100-seeds"],
            perf.Strategy(),
            perf.Workload(),
        )
    with pytest.raises(ValueError, match="strategy.ep"):
        perf.predict(
            perf.MODELS["seeds"], perf.HARDWARE["h100-seeds"], perf.Strategy(ep=3), perf.Workload()
        )


@pytest.mark.parametrize(
    "text, expected",
    [
        ("tp8pp2", perf.Strategy(tp=8, pp=2, micro_batches=2)),
        ("ep16tp8", perf.Strategy(tp=8, ep=16, dp=2, micro_batches=2, overlap=True)),
        ("ep16-serial", perf.Strategy(ep=16, dp=16, micro_batches=1)),
        (
            "ep72-nodedup",
            perf.Strategy(ep=72, dp=72, micro_batches=2, overlap=True, dedup_tokens=False),
        ),
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
    model, hw = perf.MODELS["deepseek-v3"], perf.HARDWARE["h800-seeds"]
    strategy = perf.parse_strategy("ep64")
    workload = perf.Workload("decode", 64 * 128, 4096)
    times = [
        perf.predict(
            model, dataclasses.replace(hw, inter_node_bandwidth=bw), strategy, workload
        ).step_time_s
        for bw in (12.5e9, 25e9, 50e9, 100e9, 400e9)
    ]
    assert all(
        later <= earlier * (1 + 1e-12) for earlier, later in zip(times[:-1], times[1:], strict=True)
    )
    assert times[-1] < times[0]


def test_calibration_replaces_rates(tmp_path):
    path = tmp_path / "rates.json"
    path.write_text(
        json.dumps({"rates": {"matmul_flops_per_s": 600e12, "inter_node_bytes_per_s": 45e9}})
    )
    hw = perf.calibrate(perf.HARDWARE["h100-seeds"], str(path))
    assert (hw.peak_flops_bf16, hw.mfu) == (600e12, 1.0)
    assert (hw.inter_node_bandwidth, hw.inter_node_efficiency) == (45e9, 1.0)
    assert hw.memory_bandwidth == perf.HARDWARE["h100-seeds"].memory_bandwidth
    path.write_text(json.dumps({"flops": 1}))
    with pytest.raises(ValueError, match="unknown keys"):
        perf.calibrate(perf.HARDWARE["h100-seeds"], str(path))


def test_published_measurements_within_tolerance():
    table = perf.load_measurements()
    assert len(table["measurements"]) >= 5
    for row in perf.validation_rows():
        assert abs(row["error"]) <= table["tolerance"], row


def test_every_measurement_cites_a_source():
    for entry in perf.load_measurements()["measurements"]:
        assert entry["source"].startswith("https://"), entry["id"]


def test_cli_compare_prints_ratios(capsys):
    assert perf.main(["--compare", "tp8pp2,ep16tp8", "--phase", "prefill", "--batch", "16"]) == 0
    out = capsys.readouterr().out
    assert "== versus tp8pp2" in out and "throughput x" in out and "bottleneck" in out


def test_cli_sweep_writes_plot_and_json(tmp_path, capsys):
    png, js = tmp_path / "s.png", tmp_path / "s.json"
    assert perf.main(["--sweep", "--plot", str(png), "--json", str(js)]) == 0
    points = json.loads(js.read_text())["points"]
    assert [p["ep"] for p in points] == [8, 16, 32, 64, 128, 256]
    assert png.stat().st_size > 1000
    assert "EP" in capsys.readouterr().out


def test_cli_validate_and_constants(capsys):
    assert perf.main(["--validate"]) == 0
    assert "deepep-ll-dispatch-ep256" in capsys.readouterr().out
    assert perf.main(["--constants"]) == 0
    assert "ndr_nic_bandwidth" in capsys.readouterr().out


def test_placement_imbalance_feeds_the_cost_model():
    from moe_ep import plan as planner

    model = planner.Model(
        num_layers=4, dense_layers=(0,), experts_per_layer=8, top_k=2, bytes_per_expert=1e6
    )
    cluster = planner.Cluster(num_nodes=1, gpus_per_node=8, gpu_memory_bytes=0)
    skewed = planner.plan(model, cluster, loads=[[8, 1, 1, 1, 1, 1, 1, 1]] * 3)
    factor = perf.placement_imbalance(skewed)
    expected = sum(layer.metrics.imbalance for layer in skewed.moe_layers) / 3
    assert factor == pytest.approx(expected) and factor > 1.0


def test_calibrate_reads_bench_local_json(tmp_path):
    path = tmp_path / "local.json"
    path.write_text(
        json.dumps(
            {
                "env": {},
                "limits": {"matmul_tflops": 700.0},
                "rates": {"matmul_flops_per_s": 700e12, "memory_bytes_per_s": 3.0e12},
            }
        )
    )
    hw = perf.calibrate(perf.HARDWARE["h100"], str(path))
    assert hw.peak_flops_bf16 == 700e12 and hw.mfu == 1.0
    assert hw.memory_bandwidth == 3.0e12 and hw.memory_efficiency == 1.0

"""moe_ep.plan: the placement planner seen from Python (bindings, JSON, presets, CLI)."""

import dataclasses
import json

import pytest

from moe_ep import plan as planner
from moe_ep.plan import Cluster, Model, Placement

EXPERT = planner.gated_ffn_bytes(7168, 2048)


def small(layers: int = 2, experts: int = 64, top_k: int = 2) -> Model:
    return Model(layers + 1, (0,), experts, top_k, EXPERT, 1e9)


def test_gated_ffn_bytes_counts_three_matrices():
    assert EXPERT == 3 * 7168 * 2048 * 2


def test_seeds_preset_reproduces_the_seeds_layout():
    preset = planner.PRESETS["seeds"]
    placement = planner.plan(preset.model, preset.cluster, policy=preset.policy)
    assert preset.cluster.num_gpus == 3904
    for layer in range(3, 61):
        gpus = placement.layers[layer].gpus
        assert gpus == tuple((layer - 3) * 64 + e for e in range(64))
        assert [g // 8 for g in gpus] == [((layer - 3) * 64 + e) // 8 for e in range(64)]
    assert [placement.layers[d].gpus for d in range(3)] == [(3712,), (3713,), (3714,)]
    used = sum(1 for b in placement.gpu_memory_used if b > 0)
    assert (used, 3904 - used) == (3715, 189)


@pytest.mark.parametrize("gpus", [16, 64, 512])
def test_seeds_preset_on_fewer_gpus(gpus):
    preset = planner.PRESETS["seeds"]
    cluster = dataclasses.replace(preset.cluster, num_nodes=gpus // 8)
    placement = planner.plan(preset.model, cluster, policy="sequential")
    for layer in placement.moe_layers:
        assert layer.gpus == tuple(((layer.layer - 3) * 64 + e) % gpus for e in range(64))
    experts_per_gpu = [round(b / EXPERT) for b in placement.gpu_memory_used[3:]]
    assert max(experts_per_gpu) - min(experts_per_gpu) <= 1


def test_invariants_one_expert_of_a_layer_per_gpu():
    model, cluster = small(3, 64), Cluster(num_nodes=12)
    loads = planner.zipf_loads(3, 64, 1.2)
    placement = planner.plan(model, cluster, loads=loads)
    for layer, load in zip(placement.moe_layers, loads, strict=True):
        assert len(layer.gpus) == len(set(layer.gpus)) == cluster.num_gpus
        assert min(layer.replica_count) >= 1
        assert sum(layer.replica_count) == len(layer.phy2log)
        for expert, slots in enumerate(layer.log2phy):
            assert all(layer.phy2log[s] == expert for s in slots)
        hottest = max(range(64), key=load.__getitem__)
        assert layer.replica_count[hottest] == max(layer.replica_count)
        padded = layer.padded_log2phy()
        assert len({len(row) for row in padded}) == 1
    assert max(placement.gpu_memory_used) <= cluster.gpu_memory_bytes


def test_balancing_beats_greedy_and_no_replicas_on_skewed_loads():
    model, cluster = small(2, 256, 8), Cluster(num_nodes=4)
    loads = planner.zipf_loads(2, 256, 1.0)
    ours = planner.plan(model, cluster, loads=loads)
    greedy = planner.plan(model, cluster, loads=loads, policy="greedy")
    bare = planner.plan(model, cluster, loads=loads, redundant_experts=0)
    for a, b, c in zip(ours.moe_layers, greedy.moe_layers, bare.moe_layers, strict=True):
        assert a.metrics.max_gpu_load <= b.metrics.max_gpu_load * (1 + 1e-12)
        assert a.metrics.max_link_load < b.metrics.max_link_load
        assert a.metrics.imbalance < c.metrics.imbalance


def test_json_round_trip_and_determinism(tmp_path):
    model, cluster = small(2, 32, 4), Cluster(num_nodes=3)
    loads = planner.zipf_loads(2, 32, 0.8)
    samples = [[[(t * 7 + i * 5) % 32 for i in range(4)] for t in range(200)]] * 2
    first = planner.plan(model, cluster, loads=loads, coactivation=samples)
    second = planner.plan(model, cluster, loads=loads, coactivation=samples)
    assert first == second
    assert first.to_json() == second.to_json()
    assert Placement.from_json(first.to_json()) == first
    path = tmp_path / "plan.json"
    first.save(str(path))
    assert Placement.load(str(path)) == first
    assert json.loads(path.read_text())["layers"][1]["phy2log"] == list(first.layers[1].phy2log)


def test_bad_configurations_raise_clear_errors():
    model, cluster = small(2, 64), Cluster(num_nodes=10)
    with pytest.raises(ValueError, match="redundant_experts"):
        planner.plan(model, cluster, redundant_experts=100000)  # beyond 80 GB per GPU
    with pytest.raises(ValueError, match="redundant_experts"):
        planner.plan(model, cluster, redundant_experts=-2)
    with pytest.raises(ValueError, match="model.n_group"):
        planner.plan(dataclasses.replace(model, n_group=5), cluster)
    with pytest.raises(ValueError, match="model.expert_group"):
        planner.plan(dataclasses.replace(model, n_group=2, expert_group=(0,) * 64), cluster)
    with pytest.raises(ValueError, match="model.bytes_per_expert"):
        planner.plan(model, dataclasses.replace(cluster, gpu_memory_bytes=50e6))
    with pytest.raises(ValueError, match="cluster.gpu_memory_bytes"):
        planner.plan(model, Cluster(num_nodes=1, gpu_memory_bytes=2e9))
    with pytest.raises(ValueError, match="loads"):
        planner.plan(model, cluster, loads=[[1.0] * 64])
    with pytest.raises(ValueError, match=r"stats\[0\].expert_load"):
        planner.plan(model, cluster, loads=[[1.0] * 63, [1.0] * 64])
    with pytest.raises(ValueError, match="policy"):
        planner.plan(model, cluster, policy="random")


def test_cli_prints_summary_and_writes_json(tmp_path, capsys):
    out = tmp_path / "v3.json"
    args = ["--preset", "deepseek-v3", "--gpus", "64", "--zipf", "1.0", "--out", str(out)]
    placement = planner.main(args)
    printed = capsys.readouterr().out
    assert "GPUs used: 64 of 64" in printed
    assert "max inter-node link load" in printed
    assert Placement.load(str(out)) == placement
    assert len(placement.layers[3].phy2log) == 5 * 64  # 256 experts + one spare slot per GPU
    # The preset's groups (8 of 32 experts, 4 per token) stay whole on the 8 nodes; with
    # --n-group 1 the same run ignores them.
    layer = placement.layers[3]
    assert all(
        len({g // 8 for g, e in zip(layer.gpus, layer.phy2log, strict=True) if e // 32 == group})
        == 1
        for group in range(8)
    )
    ungrouped = planner.main([*args, "--n-group", "1", "--out", str(tmp_path / "flat.json")])
    assert ungrouped.model.n_group == 1 and ungrouped.layers[3].phy2log != layer.phy2log
    capsys.readouterr()
    # Re-plan from it for other loads: few copies, within the budget.
    again = tmp_path / "v3-next.json"
    args = ["--preset", "deepseek-v3", "--gpus", "64", "--zipf", "1.5", "--out", str(again)]
    replanned = planner.main([*args, "--previous", str(out), "--max-moves", "8"])
    assert "expert copies to migrate" in capsys.readouterr().out
    assert all(layer.moves <= 8 for layer in replanned.moe_layers)
    assert Placement.load(str(again)) == replanned


def test_replan_from_previous_moves_few_slots():
    model, cluster = small(2, 64), Cluster(num_nodes=1)
    loads = planner.zipf_loads(2, 64, 1.2)
    before = planner.plan(model, cluster, loads=loads)
    same = planner.plan(model, cluster, loads=loads, previous=before.moe_layers)
    assert [layer.moves for layer in same.moe_layers] == [0, 0]
    assert [layer.gpus for layer in same.moe_layers] == [layer.gpus for layer in before.moe_layers]
    drifted = planner.zipf_loads(2, 64, 1.2, seed=5)
    fresh = planner.plan(model, cluster, loads=drifted)
    for budget in (0, 6, -1):
        after = planner.plan(
            model, cluster, loads=drifted, previous=before.moe_layers, max_moves=budget
        )
        assert after == planner.plan(
            model, cluster, loads=drifted, previous=before.moe_layers, max_moves=budget
        )
        for old, new, ref in zip(
            before.moe_layers, after.moe_layers, fresh.moe_layers, strict=True
        ):
            copies = set(zip(new.gpus, new.phy2log, strict=True)) - set(
                zip(old.gpus, old.phy2log, strict=True)
            )
            assert new.moves == len(copies) <= (budget if budget >= 0 else len(new.gpus))
            assert sum(new.replica_count) == len(new.phy2log) == len(ref.phy2log)
            if budget == -1:
                assert new.metrics.max_gpu_load <= ref.metrics.max_gpu_load * 1.02
    assert Placement.from_json(after.to_json()) == after


def test_replan_rejects_bad_previous_placements():
    model, cluster = small(1, 8), Cluster(num_nodes=1, gpus_per_node=4)
    before = planner.plan(model, cluster).moe_layers
    with pytest.raises(ValueError, match="previous"):
        planner.plan(model, cluster, previous=before * 2)
    bad = dataclasses.replace(before[0], gpus=(4,) + before[0].gpus[1:])
    with pytest.raises(ValueError, match=r"stats\[0\].previous_gpus"):
        planner.plan(model, cluster, previous=[bad])
    bad = dataclasses.replace(before[0], phy2log=(8,) + before[0].phy2log[1:])
    with pytest.raises(ValueError, match=r"stats\[0\].previous_phy2log"):
        planner.plan(model, cluster, previous=[bad])
    with pytest.raises(ValueError, match="max_moves"):
        planner.plan(model, cluster, previous=before, max_moves=-2)


def test_group_limited_model_keeps_groups_on_nodes_and_round_trips(tmp_path):
    # DeepSeek-V3's routing on 4 nodes: every group of 32 experts (its replicas too) on one
    # node, two groups per node; the groups survive the JSON round trip.
    model = dataclasses.replace(small(1, 256, 8), n_group=8, topk_group=4)
    cluster = Cluster(num_nodes=4)
    placement = planner.plan(model, cluster, loads=planner.zipf_loads(1, 256, 1.0))
    layer = placement.moe_layers[0]
    nodes_of_group = {}
    for gpu, expert in zip(layer.gpus, layer.phy2log, strict=True):
        nodes_of_group.setdefault(expert // 32, set()).add(gpu // cluster.gpus_per_node)
    assert all(len(nodes) == 1 for nodes in nodes_of_group.values())
    assert (
        sorted(len([g for g, n in nodes_of_group.items() if n == {k}]) for k in range(4)) == [2] * 4
    )
    mapped = dataclasses.replace(model, expert_group=tuple(e // 32 for e in range(256)))
    assert planner.plan(
        mapped, cluster, loads=planner.zipf_loads(1, 256, 1.0)
    ) == dataclasses.replace(placement, model=mapped)
    path = tmp_path / "grouped.json"
    placement.save(str(path))
    assert Placement.load(str(path)) == placement
    assert planner.PRESETS["deepseek-v3"].model.n_group == 8

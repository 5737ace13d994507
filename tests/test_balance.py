"""Runtime load balancing: replica placement and routing (single process), re-planning and
migration over Gloo (balance_worker.py in spawned processes)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from balance_worker import worker

import moe_ep
from moe_ep import plan
from moe_ep.placement import ExpertPlacement, map_to_slots


def planned_layer(experts, world, loads, redundant=-1):
    model = plan.Model(1, (), experts, 2, bytes_per_expert=1.0)
    cluster = plan.Cluster(num_nodes=1, gpus_per_node=world, gpu_memory_bytes=0)
    return plan.plan(model, cluster, loads=[loads], redundant_experts=redundant).layers[0]


def zipf_ids(tokens, experts, top_k, seed=0):
    """Skewed top-k ids: Zipf-like preference, k distinct experts per token."""
    g = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, experts + 1, dtype=torch.float64) ** 1.2
    return torch.multinomial(weights.expand(tokens, -1), top_k, generator=g).int()


def test_one_replica_placement_is_the_old_map():
    placement = ExpertPlacement.from_ranks([0, 0, 1, 1, 2, 2], world_size=4)
    assert not placement.has_replicas and placement.num_slots == placement.num_experts == 6
    assert placement.log2phy.view(-1).tolist() == list(range(6))
    assert torch.equal(placement.expert_rank, placement.slot_rank)
    ids = torch.tensor([[0, 5], [3, 2]], dtype=torch.int32)
    assert map_to_slots(ids, placement, rank=1) is ids


def test_from_plan_and_replica_mapping():
    world, experts = 4, 8
    layer = planned_layer(experts, world, [100.0, 40.0] + [10.0] * 6)
    placement = ExpertPlacement.from_plan(layer, world)
    assert placement.num_slots == len(layer.phy2log) > experts
    assert placement.phy2log.tolist() == list(layer.phy2log)
    assert placement.replica_count.tolist() == list(layer.replica_count)
    assert placement.slot_rank.tolist() == list(layer.gpus)
    for rank in range(world):  # local numbers follow slot order on each rank
        assert placement.local_slots(rank) == [s for s, g in enumerate(layer.gpus) if g == rank]
    ids = zipf_ids(500, experts, 2)
    for rank in range(world):
        slots = map_to_slots(ids, placement, rank)
        assert slots.dtype == ids.dtype and slots.shape == ids.shape
        assert torch.equal(placement.phy2log[slots.long()], ids.long())  # same logical expert
        # Each expert's pairs spread within one pair of even over its replicas.
        per_slot = torch.bincount(slots.view(-1).long(), minlength=placement.num_slots)
        for e in range(experts):
            replicas = placement.log2phy[e][placement.log2phy[e] >= 0].long()
            share = per_slot[replicas]
            assert int(share.max() - share.min()) <= 1, (rank, e, share.tolist())
            assert int(share.sum()) == int((ids == e).sum())


def test_rank_loads_share_replicas():
    # Two experts on four ranks: the planner gives the hot expert the two spare slots.
    placement = ExpertPlacement.from_plan(planned_layer(2, 4, [90.0, 10.0]), 4)
    assert placement.replica_count.tolist() == [3, 1]
    loads = placement.rank_loads(torch.tensor([90, 10]))
    assert sorted(loads.tolist()) == [10.0, 30.0, 30.0, 30.0]
    # One slot each on ranks 0 and 1: [90, 10, 0, 0].
    assert ExpertPlacement.contiguous(2, 4).rank_loads(torch.tensor([90, 10])).tolist() == [
        90.0,
        10.0,
        0.0,
        0.0,
    ]


def test_placement_rejects_uncovered_experts_and_bad_maps():
    ranks = torch.tensor([0, 1, 1], dtype=torch.int32)
    local = torch.tensor([0, 0, 1], dtype=torch.int32)
    with pytest.raises(ValueError, match="log2phy: expert"):
        ExpertPlacement(ranks, local, 2, torch.tensor([[0, 1], [2, -1], [-1, -1]]))
    with pytest.raises(ValueError, match="log2phy: must list every slot"):
        ExpertPlacement(ranks, local, 2, torch.tensor([[0, 1], [1, -1]]))
    with pytest.raises(ValueError, match="slot_rank"):
        ExpertPlacement(ranks, local, 1)
    with pytest.raises(ValueError, match="slot_local"):
        ExpertPlacement(ranks, torch.tensor([0, 0, 2], dtype=torch.int32), 2)
    layer = planned_layer(4, 4, [1.0] * 4, redundant=0)
    with pytest.raises(ValueError, match="layer.gpus"):
        ExpertPlacement.from_plan(layer, 2)


def test_replanning_is_deterministic():
    loads = [float(x) for x in (1000 / torch.arange(1, 17) ** 1.1).tolist()]
    first, second = planned_layer(16, 4, loads), planned_layer(16, 4, loads)
    assert first == second
    a, b = ExpertPlacement.from_plan(first, 4), ExpertPlacement.from_plan(second, 4)
    assert torch.equal(a.slot_rank, b.slot_rank) and torch.equal(a.log2phy, b.log2phy)
    ids = zipf_ids(300, 16, 2)
    assert torch.equal(map_to_slots(ids, a, 2), map_to_slots(ids, b, 2))


@pytest.fixture
def world_of_one(tmp_path):
    """A one-rank Gloo group in this process, for the balancer's argument checks."""
    store = dist.FileStore(os.path.join(tmp_path, "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def test_balancer_rejects_bad_configuration(world_of_one):
    layer = moe_ep.MoELayer(16, 8, 4, 2, dtype=torch.float32, group=world_of_one)
    for kwargs, name in (
        ({"threshold": 1.0}, "threshold"),
        ({"threshold": 0.5}, "threshold"),
        ({"window": 0}, "window"),
        ({"interval": -1}, "interval"),
        ({"max_moves": -2}, "max_moves"),
        ({"gpus_per_node": 3}, "gpus_per_node"),
        ({"bias_update_rate": 0.1}, "bias_update_rate"),  # the layer has no expert_bias
    ):
        with pytest.raises(ValueError, match=name):
            moe_ep.LoadBalancer(layer, **kwargs)
    with pytest.raises(ValueError, match="layer"):
        moe_ep.LoadBalancer(moe_ep.MoELayer(16, 8, 4, 2, dtype=torch.float32))
    # One rank: every load is on it, nothing to balance.
    balancer = moe_ep.LoadBalancer(layer, window=1)
    balancer.observe(torch.tensor([[0, 1], [0, 2]]))
    assert balancer.expert_loads().tolist() == [2, 1, 1, 0]
    assert balancer.imbalance() == 1.0 and balancer.maybe_rebalance() is None


@pytest.mark.parametrize("world", [2, 4])
def test_rebalance_and_migration_gloo(world, tmp_path):
    mp.spawn(worker, args=(world, os.path.join(tmp_path, "init")), nprocs=world, join=True)


def test_a_plan_without_replicas_may_number_its_slots_otherwise():
    # The planner orders slots by GPU: with one copy per expert, slot e need not be expert e,
    # and map_to_slots must still go through log2phy (the fuzz found this, issue 15).
    placement = ExpertPlacement(
        torch.tensor([0, 0, 1, 1], dtype=torch.int32),
        torch.tensor([0, 1, 0, 1], dtype=torch.int32),
        2,
        torch.tensor([[0], [2], [3], [1]], dtype=torch.int32),
    )
    assert not placement.has_replicas and not placement.slots_are_experts
    ids = torch.tensor([[1, 3], [2, 0]], dtype=torch.int32)
    assert map_to_slots(ids, placement, rank=0).tolist() == [[2, 1], [3, 0]]
    assert ExpertPlacement.contiguous(4, 2).slots_are_experts

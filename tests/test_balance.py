"""Runtime load balancing: replica placement and routing, the migration's pieces on one rank
(single process); counts, re-planning, background migration, abandonment over Gloo
(balance_worker.py in spawned processes)."""

import collections
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from balance_worker import worker

import moe_ep
from moe_ep import plan
from moe_ep.migration import (
    ABANDON,
    READY,
    WORKING,
    SwitchVote,
    WeightTransfer,
    experts_by_rank,
    keep_rows,
    migration_transfers,
)
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


def test_a_plan_without_replicas_maps_experts_to_their_slots():
    """A plan's slots are numbered by GPU, not by expert, even with one slot per expert:
    expert e must go to its slot, not to slot e (the map once took ids for slots)."""
    world, experts = 4, 8
    layer = planned_layer(experts, world, [50.0, 40.0, 30.0, 20.0, 4.0, 3.0, 2.0, 1.0], 0)
    placement = ExpertPlacement.from_plan(layer, world)
    assert not placement.has_replicas and not placement.slots_are_experts
    ids = zipf_ids(300, experts, 2)
    for rank in range(world):
        slots = map_to_slots(ids, placement, rank)
        assert slots.dtype == ids.dtype
        assert torch.equal(placement.phy2log[slots.long()], ids.long())


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
        ({"piece_bytes": 0}, "piece_bytes"),
        ({"rounds_per_step": 0}, "rounds_per_step"),
        ({"deadline_steps": 0}, "deadline_steps"),
        ({"deadline_s": 0.0}, "deadline_s"),
    ):
        with pytest.raises(ValueError, match=name):
            moe_ep.LoadBalancer(layer, **kwargs)
    with pytest.raises(ValueError, match="layer"):
        moe_ep.LoadBalancer(moe_ep.MoELayer(16, 8, 4, 2, dtype=torch.float32))
    # One rank: every load is on it, nothing to balance. The counts come from the dispatch.
    balancer = moe_ep.LoadBalancer(layer, window=2)
    x = torch.randn(5, 16)
    for _ in range(2):
        layer(x)
        assert balancer.step() is None
    ids, _ = layer.route(x)
    expected = 2 * torch.bincount(ids.view(-1).long(), minlength=4)
    assert balancer.expert_loads().tolist() == expected.tolist()
    assert balancer.imbalance() == 1.0 and not balancer.migrating


def random_placement(experts, world, seed):
    """A planner placement with replicas for random loads."""
    g = torch.Generator().manual_seed(seed)
    loads = (torch.rand(experts, generator=g) ** 3 * 100).tolist()
    return ExpertPlacement.from_plan(planned_layer(experts, world, loads), world)


def test_keep_rows_moves_only_the_arrivals():
    world, experts = 4, 12
    for seed in range(30):
        old = random_placement(experts, world, seed)
        new = random_placement(experts, world, 1000 + seed)
        kept = keep_rows(old, new)
        assert torch.equal(kept.slot_rank, new.slot_rank) and torch.equal(kept.log2phy, new.log2phy)
        for p in (old, new, kept):  # the host-list shortcut agrees with the tensor methods
            assert experts_by_rank(p) == [p.local_experts(r) for r in range(world)]
        for rank in range(world):
            old_rows, new_rows = old.local_experts(rank), kept.local_experts(rank)
            assert sorted(new_rows) == sorted(new.local_experts(rank))
            arrivals = collections.Counter(new_rows) - collections.Counter(old_rows)
            changed = [i for i, e in enumerate(new_rows) if i >= len(old_rows) or old_rows[i] != e]
            if len(new_rows) == len(old_rows):  # the switch rewrites the arrivals' rows only
                assert len(changed) == sum(arrivals.values()), (seed, rank, old_rows, new_rows)
        # The copies: each expert a rank gains, once, from a rank that holds it.
        for e, source, dest in migration_transfers(old, new):
            assert e in old.local_experts(source) and e not in old.local_experts(dest)
            assert e in new.local_experts(dest)


def test_weight_transfer_on_one_rank(world_of_one):
    """No copy travels on one rank; a new replica's slot is rebuilt from the held rows, and
    an unchanged slot count switches in place."""
    experts = 4
    w13, w2 = torch.randn(experts, 6, 8), torch.randn(experts, 8, 3)
    old = ExpertPlacement.contiguous(experts, 1)
    new = ExpertPlacement.from_plan(planned_layer(experts, 1, [9.0, 1.0, 1.0, 1.0], 1), 1)
    assert new.num_slots == experts + 1
    transfer = WeightTransfer(old, new, w13, w2, world_of_one)
    assert transfer.rounds == 0 and transfer.transfers == [] and transfer.resized
    with pytest.raises(RuntimeError, match="before the transfer is ready"):
        transfer.finish(w13, w2)
    transfer.run()
    assert transfer.ready
    placement, new_w13, new_w2 = transfer.finish(w13, w2)
    experts_in_rows = placement.local_experts(0)
    assert torch.equal(new_w13, w13[experts_in_rows]) and torch.equal(new_w2, w2[experts_in_rows])
    assert transfer.spare_bytes == new_w13.nbytes + new_w2.nbytes  # the rebuilt weights
    same = WeightTransfer(new, new, new_w13, new_w2, world_of_one)
    same.run()
    assert same.finish(new_w13, new_w2)[1] is new_w13 and same.spare_bytes == 0
    for kwargs, name in (({"piece_bytes": 0}, "piece_bytes"), ({"rounds_per_step": 0}, "rounds")):
        with pytest.raises(ValueError, match=name):
            WeightTransfer(old, new, w13, w2, world_of_one, **kwargs)
    with pytest.raises(ValueError, match="group"):
        WeightTransfer(ExpertPlacement.contiguous(4, 2), new, w13, w2, world_of_one)


def test_switch_vote_on_one_rank(world_of_one):
    vote = SwitchVote(world_of_one)
    assert vote.outcome() is None
    for value in (READY, WORKING, ABANDON):
        vote.cast(value)
        assert vote.outcome() == value and vote.outcome() is None


@pytest.mark.parametrize("world", [2, 4])
def test_rebalance_and_migration_gloo(world, tmp_path):
    mp.spawn(worker, args=(world, os.path.join(tmp_path, "init")), nprocs=world, join=True)

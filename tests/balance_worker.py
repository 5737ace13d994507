"""Runtime load balancing scenarios run inside each rank's process (spawned by
test_balance.py, or under torchrun: `torchrun --nproc-per-node 4 tests/balance_worker.py`)."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import assert_close_relative, process_group  # noqa: E402
from ep_worker import FFN, HIDDEN, full_weights  # noqa: E402

import moe_ep  # noqa: E402
from moe_ep import reference  # noqa: E402
from moe_ep.placement import ExpertPlacement  # noqa: E402


def make_layer(experts, dtype, gate, w13, w2, **kwargs):
    layer = moe_ep.MoELayer(HIDDEN, FFN, experts, 2, dtype=dtype, group=dist.group.WORLD, **kwargs)
    layer.load_full_weights(gate, w13, w2, transposed=False)
    return layer


def tokens(count, seed, dtype=torch.float32, sign=1.0):
    """Random tokens whose feature 0 is `sign`: the gate's column 0 acts as a per-expert skew
    (turned around by sign -1)."""
    g = torch.Generator().manual_seed(seed * 7919 + dist.get_rank())
    x = torch.rand(count, HIDDEN, generator=g) * 2 - 1
    x[:, 0] = sign
    return x.to(dtype)


def skew(gate, hot):
    """Adds hot[e] to expert e's logit for every token (see tokens)."""
    gate[:, 0] = 0.0
    for e, value in hot.items():
        gate[e, 0] = value
    return gate


def same_on_all_ranks(t: torch.Tensor) -> bool:
    gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, t)
    return all(torch.equal(g, t) for g in gathered)


def check_layer_weights(layer, w13, w2):
    """Every local slot holds exactly the full weights of its logical expert."""
    for i, e in enumerate(layer.local_expert_ids):
        assert torch.equal(layer.w13[i], w13[e]) and torch.equal(layer.w2[i], w2[e]), (i, e)


def run_migration():
    """A skewed phase, then re-planning and migration: lower imbalance, the same output."""
    world, rank = dist.get_world_size(), dist.get_rank()
    experts = 4 * world
    gate, w13, w2 = full_weights(experts, torch.float32, seed=11)
    skew(gate, {0: 1.0, 1: 0.5})  # experts 0 and 1 (both on rank 0 at first) run hot
    layer = make_layer(experts, torch.float32, gate, w13, w2)
    balancer = moe_ep.LoadBalancer(layer, window=4, threshold=1.2)
    for step in range(4):
        ids, _ = layer.route(tokens(64, step))
        balancer.observe(ids)
        if step < 3:  # the window is not full yet
            assert balancer.maybe_rebalance() is None
    x = tokens(128, 100)
    before_out = layer(x)
    before = balancer.imbalance()
    assert before > 1.2, before
    old_slots = layer.placement.num_slots
    migration = balancer.maybe_rebalance()
    assert migration is not None
    after = balancer.imbalance()
    assert after < before and after == migration.imbalance_after, (before, after)
    assert migration.imbalance_before == before
    assert layer.placement.has_replicas and layer.placement.num_slots > old_slots
    # The same decision everywhere (all-reduced counts, deterministic planner).
    assert same_on_all_ranks(layer.placement.slot_rank)
    assert same_on_all_ranks(layer.placement.log2phy)
    check_layer_weights(layer, w13, w2)
    # Only moved slots travel: a copy per (expert, new rank) that lacked it, each one expert.
    expert_bytes = (w13[0].numel() + w2[0].numel()) * 4
    assert migration.bytes == len(migration.transfers) * expert_bytes > 0
    assert migration.bytes < layer.placement.num_slots * expert_bytes
    assert balancer.migrated_bytes == migration.bytes
    for e, source, dest in migration.transfers:
        assert e in _contiguous(experts, source) and e not in _contiguous(experts, dest)
        assert e in layer.placement.local_experts(dest)
    after_out = layer(x)
    # Bitwise: float32 and k = 2 (a sum of two products is the same in either grouping), and
    # every expert's GEMM batch has enough rows (CPU BLAS switches kernels below 4 rows).
    assert torch.equal(after_out, before_out)
    ids, weights = layer.route(x)
    expected = reference.moe(x, ids, weights, w13, w2)
    assert_close_relative(after_out, expected, torch.float32)
    # No schedule and the window not refilled: nothing more happens.
    assert balancer.maybe_rebalance() is None
    if rank == 0:
        print(f"world {world}: imbalance {before:.3f} -> {after:.3f}, {migration.bytes} bytes")

    # The skew turns around; a scheduled re-plan from the current placement, at most 6 moves.
    balancer.interval, balancer.max_moves = 4, 6
    for step in range(4):
        balancer.observe(layer.route(tokens(64, 200 + step, sign=-1.0))[0])
    x = tokens(128, 300, sign=-1.0)
    before_out, before, slots = layer(x), balancer.imbalance(), layer.placement.num_slots
    held = [set(layer.placement.local_experts(r)) for r in range(world)]
    migration = balancer.maybe_rebalance()
    assert migration is not None and 0 < len(migration.transfers) <= 6, migration
    assert migration.imbalance_after < before == migration.imbalance_before
    assert layer.placement.num_slots == slots
    for e, source, dest in migration.transfers:
        assert e in held[source] and e not in held[dest]
    check_layer_weights(layer, w13, w2)
    # Close, not bitwise as above: the cold experts' GEMM batches now have few rows, and
    # rows split differently over replicas take other CPU BLAS kernels.
    assert_close_relative(layer(x), before_out, torch.float32)
    if rank == 0:
        print(
            f"world {world}: turned skew {before:.3f} -> {migration.imbalance_after:.3f}, "
            f"{len(migration.transfers)} copies"
        )


def _contiguous(experts, rank):
    """The experts on `rank` in the contiguous placement (the one before the migration)."""
    return ExpertPlacement.contiguous(experts, dist.get_world_size()).local_experts(rank)


def run_schedule_and_bias():
    """A scheduled re-plan; the bias update is bounded, identical on all ranks, and off
    by default."""
    world = dist.get_world_size()
    experts = 2 * world
    gate, w13, w2 = full_weights(experts, torch.float32, seed=12)
    skew(gate, {experts - 1: 3.0})
    layer = make_layer(experts, torch.float32, gate, w13, w2, expert_bias=True)
    off = moe_ep.LoadBalancer(layer, window=2, interval=2, threshold=None)
    for step in range(2):
        off.observe(layer.route(tokens(32, step))[0])
    assert torch.count_nonzero(layer.expert_bias) == 0
    assert off.maybe_rebalance() is not None  # the schedule: every 2 steps
    check_layer_weights(layer, w13, w2)
    on = moe_ep.LoadBalancer(layer, threshold=None, bias_update_rate=0.01, max_bias=0.025)
    for step in range(5):
        on.observe(layer.route(tokens(32, step))[0])
    bias = layer.expert_bias
    assert bias.abs().max() <= 0.025 and bias[experts - 1] == -0.025, bias
    assert same_on_all_ranks(bias)


def run_replicas_match_reference():
    """Layers whose placement has replicas (from the planner) against the reference."""
    world = dist.get_world_size()
    experts = 2 * world
    model = moe_ep.plan.Model(1, (), experts, 2, bytes_per_expert=1.0)
    cluster = moe_ep.plan.Cluster(num_nodes=1, gpus_per_node=world, gpu_memory_bytes=0)
    loads = [[100.0] + [1.0] * (experts - 1)]
    planned = moe_ep.plan.plan(model, cluster, loads=loads, redundant_experts=world)
    placement = ExpertPlacement.from_plan(planned.layers[0], world)
    assert placement.replica_count[0] > 1
    for dtype in (torch.float32, torch.bfloat16):
        for mode in ("exact", "capacity"):
            gate, w13, w2 = full_weights(experts, dtype, seed=13)
            skew(gate, {0: 1.0})
            layer = make_layer(
                experts, dtype, gate, w13, w2, placement=placement, dispatch_mode=mode, capacity=40
            )
            check_layer_weights(layer, w13, w2)
            x = tokens(40, 7, dtype)
            ids, weights = layer.route(x)
            expected = reference.moe(x, ids, weights, w13, w2)
            assert_close_relative(layer(x), expected, dtype)
        # The group's pairs for expert 0 spread over its replicas: each rank's within one.
        slots = layer.slot_ids(ids).view(-1).long()
        per_slot = torch.bincount(slots, minlength=placement.num_slots)
        dist.all_reduce(per_slot)
        share = per_slot[placement.log2phy[0][placement.log2phy[0] >= 0].long()]
        assert int(share.min()) > 0 and int(share.max() - share.min()) <= world, share


def worker(rank: int, world: int, init_file: str):
    with process_group(rank, world, init_file):
        run_all()


def run_all():
    run_migration()
    run_schedule_and_bias()
    run_replicas_match_reference()


if __name__ == "__main__":  # under torchrun
    dist.init_process_group("gloo")
    run_all()
    print(f"rank {dist.get_rank()}: all load-balancing scenarios passed")
    dist.destroy_process_group()

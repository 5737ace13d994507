"""Runtime load balancing scenarios run inside each rank's process (spawned by test_balance.py,
or under torchrun: `torchrun --nproc-per-node 4 tests/balance_worker.py`)."""

from __future__ import annotations

import functools
import logging
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import assert_close_relative, process_group  # noqa: E402
from ep_worker import FFN, HIDDEN, full_weights  # noqa: E402

import moe_ep  # noqa: E402
from moe_ep import balance, debug, reference  # noqa: E402
from moe_ep.migration import WeightTransfer  # noqa: E402
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


class ReferenceLayers:
    """The layer the balanced one should be at any step: the same placement, its weights
    loaded from the full weights (never migrated), one layer per placement."""

    def __init__(self, experts, gate, w13, w2):
        self.args, self.layers = (experts, torch.float32, gate, w13, w2), {}

    def __call__(self, layer, x):
        p = layer.placement
        key = (tuple(p.slot_rank.tolist()), tuple(p.slot_local.tolist()), str(p.log2phy.tolist()))
        if key not in self.layers:
            self.layers[key] = make_layer(*self.args, placement=p)
        return self.layers[key](x)


def check_same_placement_everywhere(layer):
    p = layer.placement
    for t in (p.slot_rank, p.slot_local, p.log2phy):
        assert same_on_all_ranks(t), t


def routed_counts(layer, xs):
    """Reference counts: (token, expert) pairs of every rank's inputs, from the router alone."""
    counts = torch.zeros(layer.num_experts, dtype=torch.int64)
    for x in xs:
        ids, _ = layer.route(x)
        counts += torch.bincount(ids.view(-1).long(), minlength=layer.num_experts)
    dist.all_reduce(counts)
    return counts


def run_counts_cost_nothing():
    """The counts come from the dispatch: a step costs the balancer no operator, no collective
    and no host read (the layer's own budget unchanged); a window's end one all-reduce and one
    read; the counts equal the router's, for the fused op, the Python pipeline and fixed
    capacity, with a rank that has no token in one step."""
    world, rank = dist.get_world_size(), dist.get_rank()
    experts = 3 * world
    gate, w13, w2 = full_weights(experts, torch.float32, seed=21)
    hook = lambda chunk, x: None  # noqa: E731  (takes the pipeline path in exact mode)
    for mode, chunks, overlap_fn, reads_per_step in (
        ("exact", 1, None, 1),
        ("exact", 2, None, 1),
        ("exact", 1, hook, 1),
        ("capacity", 2, None, 0),
    ):
        kwargs = {"dispatch_mode": mode, "num_chunks": chunks, "capacity": 64}
        layer = make_layer(experts, torch.float32, gate, w13, w2, **kwargs)
        plain = make_layer(experts, torch.float32, gate, w13, w2, **kwargs)
        for warm in (layer, plain):  # the capacity handshake
            warm(tokens(8, 0), overlap_fn=overlap_fn)
            warm.check_dispatch_status()
        balancer = moe_ep.LoadBalancer(layer, window=3, threshold=None)
        xs = [tokens(0 if (s == 1 and rank == 0) else 20 + 3 * rank + s, s) for s in range(3)]
        for s, x in enumerate(xs):
            with debug.counting_host_reads() as reads:
                out = layer(x, overlap_fn=overlap_fn)
            with debug.counting_host_reads() as plain_reads:
                expected = plain(x, overlap_fn=overlap_fn)
            assert reads.count == plain_reads.count == reads_per_step, (mode, reads.count)
            assert torch.equal(out, expected)
            for checked in (layer, plain):  # fixed capacity: the status, after the step
                checked.check_dispatch_status()
            with debug.counting_host_reads() as reads:
                ops = debug.op_counts(balancer.step)
            if s < 2:  # within the window: nothing at all
                assert not ops and reads.count == 0, (mode, s, ops, reads.count)
            else:  # the window's end: one all-reduce of the counts, one read
                collectives = {k: v for k, v in ops.items() if k.startswith("c10d::")}
                assert collectives == {"c10d::allreduce_": 1}, ops
                assert reads.count == 1, reads.count
        assert torch.equal(balancer.expert_loads(), routed_counts(layer, xs)), mode
        assert int(layer.slot_counts.sum()) == 0  # restarted for the next window
        # What counting adds to a step: the difference of the offsets and its sum, per chunk;
        # the same collectives as without.
        x = xs[0]
        with_counts = debug.op_counts(functools.partial(layer, x, overlap_fn=overlap_fn))
        without = debug.op_counts(functools.partial(plain, x, overlap_fn=overlap_fn))
        extra = with_counts - without
        assert sum(extra.values()) <= 2 * chunks and not (without - with_counts), extra
        assert not any(name.startswith("c10d::") for name in extra), extra


def run_slot_counts_errors():
    """A bad slot_counts on one rank raises on every rank, naming the argument."""
    world, rank = dist.get_world_size(), dist.get_rank()
    experts = 2 * world
    gate, w13, w2 = full_weights(experts, torch.float32, seed=22)
    layer = make_layer(experts, torch.float32, gate, w13, w2)
    local = len(layer.local_expert_ids)
    for bad in (
        torch.zeros(local + 1, dtype=torch.int64),
        torch.zeros(local, dtype=torch.int32),
        torch.zeros(1, local, dtype=torch.int64),
    ):
        layer.slot_counts = bad if rank == world - 1 else torch.zeros(local, dtype=torch.int64)
        try:
            layer(tokens(10, 1))
        except RuntimeError as error:
            assert "slot_counts" in str(error), str(error)
        else:
            raise AssertionError("a bad slot_counts did not raise")


def run_background_migration():
    """A skewed phase, then a re-plan whose weights travel in the background (paced to one
    round per step, so it spans steps) beside the same re-plan done synchronously: at every
    step each layer's output equals, bitwise, a layer that holds its placement with weights
    loaded directly; every rank switches at the same boundary; both end on the same placement
    and outputs. Then the skew turns around: a re-plan with the same slot count, switched in
    place."""
    world, rank = dist.get_world_size(), dist.get_rank()
    experts = 4 * world
    gate, w13, w2 = full_weights(experts, torch.float32, seed=11)
    skew(gate, {0: 1.0, 1: 0.5})  # experts 0 and 1 (both on rank 0 at first) run hot
    row_bytes = (w13[0].numel() + w2[0].numel()) * 4
    piece = row_bytes // 3 + 1  # three rounds per expert on a stream
    layer = make_layer(experts, torch.float32, gate, w13, w2)
    sync_layer = make_layer(experts, torch.float32, gate, w13, w2)
    balancer = moe_ep.LoadBalancer(
        layer, window=4, threshold=1.2, piece_bytes=piece, rounds_per_step=1
    )
    sync = moe_ep.LoadBalancer(sync_layer, window=4, threshold=1.2, background=False)
    references = ReferenceLayers(experts, gate, w13, w2)

    def serve(seed, sign=1.0):
        """Steps both layers until a migration of each ended; returns the migrations, and the
        boundaries at which the background layer's placement changed."""
        ended, switched = [], []
        for step in range(64):
            if {id(b) for b, _ in ended} == {id(layer), id(sync_layer)}:
                break
            x = tokens(64, seed + step, sign=sign)
            out, sync_out = layer(x), sync_layer(x)
            assert torch.equal(out, references(layer, x)), step
            assert torch.equal(sync_out, references(sync_layer, x)), step
            check_same_placement_everywhere(layer)
            serving = layer.placement
            for balanced, b in ((layer, balancer), (sync_layer, sync)):
                m = b.step()
                if m is not None:
                    ended.append((balanced, m))
                    b.threshold, b.interval = None, 0  # one re-plan per phase
            if layer.placement is not serving:
                switched.append(balancer.steps)
        return ended, switched

    slots_before = layer.placement.num_slots
    ended, switched = serve(0)
    [(_, synchronous)] = [(b, m) for b, m in ended if b is sync_layer]
    [(_, background)] = [(b, m) for b, m in ended if b is layer]
    assert synchronous.live and background.live
    assert synchronous.started_step == synchronous.ended_step == 4
    assert background.started_step == 4 and background.ended_step > 5, background
    assert switched == [background.ended_step]  # the old placement served until then
    assert same_on_all_ranks(torch.tensor([background.ended_step]))
    assert background.transfers == synchronous.transfers and background.bytes > 0
    assert background.bytes == len(background.transfers) * row_bytes
    assert background.imbalance_after < background.imbalance_before > 1.2
    assert layer.placement.has_replicas and layer.placement.num_slots > slots_before
    for name in ("slot_rank", "slot_local", "log2phy"):
        assert torch.equal(getattr(layer.placement, name), getattr(sync_layer.placement, name))
    check_layer_weights(layer, w13, w2)
    # Spare memory: this rank's arriving rows, or its rebuilt weights where the slot count
    # changed (the arrivals land there), and at most one piece per peer each way.
    arriving = sum(1 for _, _, dest in background.transfers if dest == rank)
    rows = len(layer.local_expert_ids)
    low = rows * row_bytes if rows != 4 else arriving * row_bytes
    assert low <= background.spare_bytes <= low + 2 * (world - 1) * piece, background
    x = tokens(128, 100)
    assert torch.equal(layer(x), sync_layer(x))
    ids, weights = layer.route(x)
    assert_close_relative(layer(x), reference.moe(x, ids, weights, w13, w2), torch.float32)

    # The skew turns around; a scheduled re-plan of the same slot count, at most 6 moves.
    for b in (balancer, sync):
        b.interval, b.max_moves = 4, 6  # a schedule: the threshold stays off
    storage, slots_before = layer.w13.data_ptr(), layer.placement.num_slots
    ended, switched = serve(200, sign=-1.0)
    [(_, background)] = [(b, m) for b, m in ended if b is layer]
    assert switched == [background.ended_step]
    assert background.live and 0 < len(background.transfers) <= 6, background
    assert layer.placement.num_slots == slots_before
    assert layer.w13.data_ptr() == storage  # the arrivals were copied in place
    check_layer_weights(layer, w13, w2)
    assert balancer.migrated_bytes == sum(m.bytes for m in balancer.migrations) > 0
    assert balancer.abandoned == 0
    if rank == 0:
        print(f"world {world}: background migration live after {background.ended_step - 4} steps")


class LateOnLastRank(WeightTransfer):
    """A transfer whose rank reports it ready only after `late` serving steps, on the last
    rank: the ranks' transfers then end at different boundaries."""

    late = 6

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps_seen = 0

    def on_step(self):
        super().on_step()
        self.steps_seen += 1

    @property
    def ready(self):
        last = dist.get_rank() == dist.get_world_size() - 1
        return super().ready and (not last or self.steps_seen >= self.late)


def skewed_layer(seed):
    """A layer whose experts 0 and 1 (both on rank 0 at first) run hot, its full weights and
    the reference layers."""
    experts = 4 * dist.get_world_size()
    gate, w13, w2 = full_weights(experts, torch.float32, seed=seed)
    skew(gate, {0: 1.0, 1: 0.5})
    layer = make_layer(experts, torch.float32, gate, w13, w2)
    return layer, w13, w2, ReferenceLayers(experts, gate, w13, w2)


def checked_steps(layer, balancer, references, seed, steps):
    """Serves up to `steps` steps, each output checked bitwise against the reference and the
    placement against every rank's; yields each Migration that ended."""
    for step in range(steps):
        x = tokens(48, seed + step)
        assert torch.equal(layer(x), references(layer, x)), step
        check_same_placement_everywhere(layer)
        migration = balancer.step()
        if migration is not None:
            yield migration


def run_switch_waits_for_every_rank():
    """The last rank's transfer ends later than the others': every rank keeps serving with
    the old placement (bitwise the reference's) until it is ready too, and all switch at the
    same boundary."""
    layer, w13, w2, references = skewed_layer(seed=14)
    balancer = moe_ep.LoadBalancer(layer, window=4, threshold=1.2)
    original, balance.WeightTransfer = balance.WeightTransfer, LateOnLastRank
    try:
        migration = next(checked_steps(layer, balancer, references, 500, 16), None)
    finally:
        balance.WeightTransfer = original
    assert migration is not None and migration.live, migration
    # Ready on the last rank at boundary 4 + late; the vote cast there is read at the next.
    assert migration.ended_step == 4 + LateOnLastRank.late + 1, migration
    assert same_on_all_ranks(torch.tensor([migration.ended_step]))
    check_layer_weights(layer, w13, w2)
    x = tokens(48, 600)
    assert torch.equal(layer(x), references(layer, x))


def run_stalled_transfer_abandoned():
    """One rank's transfer stalls (paced to one tiny round per step): at the deadline every
    rank abandons the migration at the same boundary, keeps the old placement (the outputs
    stay bitwise those of the reference at every step), counts and logs it; the next
    re-plan, unpaced, goes live on a fresh transfer group."""
    world, rank = dist.get_world_size(), dist.get_rank()
    layer, w13, w2, references = skewed_layer(seed=13)
    balancer = moe_ep.LoadBalancer(
        layer,
        window=4,
        threshold=1.2,
        piece_bytes=256,  # a row is 6 KiB: many rounds
        rounds_per_step=1 if rank == world - 1 else None,
        deadline_steps=3,
        deadline_s=10.0,  # also the transfer group's timeout: the stuck round ends by then
    )
    logged = []
    handler = logging.Handler()
    handler.emit = logged.append
    logging.getLogger("moe_ep.balance").addHandler(handler)
    contiguous = ExpertPlacement.contiguous(layer.num_experts, world)
    try:
        ended = []
        for migration in checked_steps(layer, balancer, references, 300, 40):
            ended.append(migration)
            if migration.live:
                break
            balancer.rounds_per_step, balancer.piece_bytes = None, 1 << 20  # full speed
    finally:
        logging.getLogger("moe_ep.balance").removeHandler(handler)
    abandoned, live = ended
    assert not abandoned.live and abandoned.started_step == 4, abandoned
    assert abandoned.ended_step == 4 + 3 + 1  # the deadline's vote, read one step later
    assert same_on_all_ranks(torch.tensor([abandoned.ended_step, live.ended_step]))
    assert balancer.abandoned == 1 and live.live and live.started_step > abandoned.ended_step
    assert any("abandoned" in record.getMessage() for record in logged), logged
    assert balancer.migrated_bytes == live.bytes
    assert not torch.equal(layer.placement.slot_rank, contiguous.slot_rank)
    check_layer_weights(layer, w13, w2)


def run_schedule_and_bias():
    """A scheduled re-plan; the bias update is bounded, identical on all ranks, and off
    by default."""
    world = dist.get_world_size()
    experts = 2 * world
    gate, w13, w2 = full_weights(experts, torch.float32, seed=12)
    skew(gate, {experts - 1: 3.0})
    layer = make_layer(experts, torch.float32, gate, w13, w2, expert_bias=True)
    off = moe_ep.LoadBalancer(layer, window=2, interval=2, threshold=None, background=False)
    for step in range(2):
        layer(tokens(32, step))
        migration = off.step()
    assert torch.count_nonzero(layer.expert_bias) == 0
    assert migration is not None and migration.live  # the schedule: every 2 steps
    check_layer_weights(layer, w13, w2)
    on = moe_ep.LoadBalancer(layer, window=1, threshold=None, bias_update_rate=0.01, max_bias=0.025)
    for step in range(5):
        layer(tokens(32, step))
        on.step()
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
    run_counts_cost_nothing()
    run_slot_counts_errors()
    run_background_migration()
    run_switch_waits_for_every_rank()
    run_stalled_transfer_abandoned()
    run_schedule_and_bias()
    run_replicas_match_reference()


if __name__ == "__main__":  # under torchrun
    dist.init_process_group("gloo")
    run_all()
    print(f"rank {dist.get_rank()}: all load-balancing scenarios passed")
    dist.destroy_process_group()

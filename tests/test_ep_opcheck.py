"""torch.library.opcheck on the expert-parallel ops, in a one-rank Gloo group in this process
(conftest's group_name; schema, fake kernels with data-dependent sizes, dispatcher
registration)."""

import pytest
import torch

from moe_ep import dispatcher
from moe_ep.placement import ExpertPlacement


def inputs():
    placement = ExpertPlacement.contiguous(4, 1)
    x = torch.randn(6, 8)
    ids = torch.stack([torch.randperm(4)[:2] for _ in range(6)]).int()
    return placement, x, ids, torch.rand(6, 2)


def test_opcheck_dispatch_ops(group_name):
    placement, x, ids, weights = inputs()
    maps = (placement.expert_rank, placement.expert_local)
    ops = torch.ops.moe_ep
    torch.library.opcheck(ops.dispatch_layout.default, (ids, *maps, 1, 4))
    torch.library.opcheck(ops.dispatch.default, (x, ids, weights, *maps, 4, group_name))
    torch.library.opcheck(ops.dispatch_capacity.default, (x, ids, weights, *maps, 4, 6, group_name))
    received = dispatcher.dispatch(x, ids, weights, placement, group_name)
    torch.library.opcheck(
        ops.combine.default,
        (
            received.x_sorted,
            received.recv_row_of,
            received.recv_weights,
            received.recv_counts,
            received.send_counts,
            received.token_slot,
            group_name,
        ),
    )


def test_opcheck_moe_forward(group_name):
    placement, x, ids, weights = inputs()
    w13, w2 = torch.randn(4, 6, 8) / 3, torch.randn(4, 8, 3) / 2
    maps = (placement.expert_rank, placement.expert_local)
    args = (x, ids, weights, *maps, 4, w13, w2, "silu", 3, group_name)
    torch.library.opcheck(torch.ops.moe_ep.moe_forward.default, args)
    # With the load balancer's accumulator (mutated in place): the entries of each expert.
    slot_counts = torch.zeros(4, dtype=torch.int64)
    torch.ops.moe_ep.moe_forward(*args, slot_counts)
    assert torch.equal(slot_counts, torch.bincount(ids.view(-1).long(), minlength=4))
    torch.library.opcheck(torch.ops.moe_ep.moe_forward.default, (*args, slot_counts))


@pytest.mark.parametrize(
    "experts, top_k, tokens",
    [(1, 1, 5), (4, 2, 1), (4, 2, 0), (4, 1, 1)],
    ids=["one-expert", "one-token", "no-token", "one-token-one-choice"],
)
def test_opcheck_dispatch_halves(group_name, experts, top_k, tokens):
    """The async halves, where their outputs could alias their inputs: one local expert with
    one choice (the received rows are already grouped) and 0 or 1 received rows (the narrowed
    weights are contiguous views)."""
    placement = ExpertPlacement.contiguous(experts, 1)
    x = torch.randn(tokens, 8)
    ids = torch.rand(tokens, experts).argsort(dim=1)[:, :top_k].int()
    weights = torch.rand(tokens, top_k)
    maps = (placement.expert_rank, placement.expert_local)
    ops = torch.ops.moe_ep
    x_recv, meta_recv, _, _, _, entries = ops.dispatch_start(
        x, ids, weights, *maps, experts, 1, group_name
    )
    torch.library.opcheck(ops.dispatch_finish.default, (x_recv, meta_recv, entries, experts))
    x_sorted, offsets, _, recv_weights = ops.dispatch_finish(x_recv, meta_recv, entries, experts)
    # One rank: every (token, choice) arrives; grouped by expert, stable in token order.
    flat = ids.view(-1).long()
    order = flat.argsort(stable=True)
    assert torch.equal(x_sorted[: flat.numel()], x.repeat_interleave(top_k, 0)[order])
    counts = torch.bincount(flat, minlength=experts)
    assert torch.equal(offsets, torch.cat([counts.new_zeros(1), counts.cumsum(0)]))
    assert torch.equal(recv_weights.sort(dim=1).values, weights.sort(dim=1).values)
    for output in (x_sorted, recv_weights):
        for given in (x_recv, meta_recv):
            mine, theirs = output.untyped_storage(), given.untyped_storage()
            assert output.numel() == 0 or mine.data_ptr() != theirs.data_ptr()

    if tokens == 0:
        return  # a fixed buffer's unused rows are never written: two runs differ there
    capacity = tokens  # the buffer's world x capacity x width rows all filled
    x_recv, meta_recv, _ = ops.dispatch_capacity_start(
        x, ids, weights, *maps, experts, capacity, group_name
    )
    args = (x_recv, meta_recv, experts, capacity)
    torch.library.opcheck(ops.dispatch_capacity_finish.default, args)
    ops.dispatch_capacity_finish(*args)

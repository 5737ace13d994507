"""torch.library.opcheck on the expert-parallel ops, in a one-rank Gloo group in this process
(conftest's group_name; schema, fake kernels with data-dependent sizes, dispatcher
registration)."""

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

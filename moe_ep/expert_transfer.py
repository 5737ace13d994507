"""Moving expert weights between the ranks of a group (the load balancer's migration, the
elastic recovery): one message per (source, destination) pair, point-to-point and batched,
each row of a message one expert's w13 then w2, flattened, experts in ascending order."""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["exchange", "flat_row", "assemble"]


def flat_row(w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One expert's weights ([2F, H], [H, F]) as the row a message carries."""
    return torch.cat([w13.flatten(), w2.flatten()])


@torch.no_grad()
def exchange(
    w13: torch.Tensor,
    w2: torch.Tensor,
    row_of: dict[int, int],
    sends: dict[int, list[int]],
    recvs: dict[int, list[int]],
    group: dist.ProcessGroup,
    timeout: timedelta | None = None,
) -> dict[int, torch.Tensor]:
    """Sends the experts sends[dest] (this rank's local rows row_of[e] of w13 [L, 2F, H] and
    w2 [L, H, F]) to each dest and receives recvs[source] from each source (group ranks);
    returns the flat row of each expert received. Every wait ends within `timeout` if given."""
    ops, arrived = [], {}
    for dest, experts in sorted(sends.items()):
        rows = torch.tensor([row_of[e] for e in experts], device=w13.device)
        message = torch.cat([w13[rows].flatten(1), w2[rows].flatten(1)], dim=1)
        ops.append(dist.P2POp(dist.isend, message, group=group, group_peer=dest))
    for source, experts in sorted(recvs.items()):
        message = w13.new_empty(len(experts), w13[0].numel() + w2[0].numel())
        arrived.update(zip(experts, message, strict=True))
        ops.append(dist.P2POp(dist.irecv, message, group=group, group_peer=source))
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait(timeout) if timeout is not None else work.wait()
    return arrived


def assemble(
    w13: torch.Tensor,
    w2: torch.Tensor,
    row_of: dict[int, int],
    arrived: dict[int, torch.Tensor],
    experts: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights of `experts` in order: a kept row (row_of) or an arrived flat row."""
    split = w13[0].numel()

    def rows(weights: torch.Tensor, part: slice) -> torch.Tensor:
        out = [
            weights[row_of[e]] if e in row_of else arrived[e][part].view(weights.shape[1:])
            for e in experts
        ]
        return torch.stack(out) if out else weights.new_empty(0, *weights.shape[1:])

    return rows(w13, slice(0, split)), rows(w2, slice(split, None))

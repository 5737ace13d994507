"""Dispatch and combine: latency and algorithmic bandwidth per rank, moe_ep against a plain
PyTorch exchange (torch.distributed.all_to_all_single + torch indexing) in the same run.

    torchrun --standalone --nproc-per-node 4 benchmarks/bench_dispatch.py            # CPU, Gloo
    torchrun --standalone --nproc-per-node 8 benchmarks/bench_dispatch.py            # GPUs, NCCL

The experts are the identity, so only the exchange is timed; both paths must then return
x * sum_j w_j, which the script checks. The baseline sends one row per (token, choice) pair,
as a plain implementation does; moe_ep sends one row per (token, destination rank), the
deduplicated minimum, so its bytes moved are printed beside the baseline's.

Per configuration and path: the median over iterations of the slowest rank's time, and the
algorithmic bandwidth = hidden-state bytes this rank sends / time (metadata excluded).

A second table holds what no machine can hide, for the exact-size and the fixed-capacity
dispatch (capacity = the tokens per rank): host reads per dispatch + combine
(moe_ep.debug.host_reads), operators per dispatch and per combine (moe_ep.debug.op_counts:
kernels and collectives), bytes per dispatched row (hidden state + metadata), and the rows the
experts compute against the rows they need (the (token, choice) pairs routed to the rank); the
design before the device-driven path computed every local expert's block of world x capacity
rows in fixed-capacity mode, printed beside it.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from moe_ep import debug, dispatcher  # noqa: E402
from moe_ep.placement import ExpertPlacement  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", help="tokens per rank (default 128 4096)")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--topk", type=int, nargs="+", default=[2, 8])
    p.add_argument("--dtype", choices=sorted(common.DTYPES), default="bf16")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even with GPUs")
    p.add_argument("--json", help="also write the rows to this file (rank 0)")
    return p.parse_args()


def baseline_dispatch(x, ids, weights, expert_rank, world):
    """One row per (token, choice), sorted by destination rank; counts then rows."""
    top_k = ids.shape[1]
    dest = expert_rank[ids.long()].view(-1).long()
    order = dest.argsort(stable=True)
    send_counts = torch.bincount(dest, minlength=world)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts)
    send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()
    rows = x.index_select(0, order // top_k)
    received = rows.new_empty((sum(recv_splits), x.shape[1]))
    dist.all_to_all_single(received, rows, recv_splits, send_splits)
    meta = torch.stack([ids.view(-1)[order].float(), weights.view(-1)[order].float()], dim=1)
    received_meta = meta.new_empty((sum(recv_splits), 2))
    dist.all_to_all_single(received_meta, meta, recv_splits, send_splits)
    return received, received_meta, order, send_splits, recv_splits


def baseline_combine(y, received_meta, order, send_splits, recv_splits, num_tokens, top_k):
    """Weights applied on the expert side; rows back; index_add into token order."""
    weighted = y * received_meta[:, 1:2].to(y.dtype)
    returned = weighted.new_empty((sum(send_splits), y.shape[1]))
    dist.all_to_all_single(returned, weighted, send_splits, recv_splits)
    out = torch.zeros((num_tokens, y.shape[1]), dtype=torch.float32, device=y.device)
    out.index_add_(0, order // top_k, returned.float())
    return out.to(y.dtype)


def hot_path_counts(x, ids, weights, placement, mode, rank, world):
    """Host reads, operators, bytes per row and rows computed / needed of one dispatch +
    combine (after a warm-up call, which makes the fixed-capacity handshake)."""
    tokens = x.shape[0]
    capacity = max(1, tokens)

    def run():
        if mode == "exact":
            received = dispatcher.dispatch(x, ids, weights, placement)
        else:
            received = dispatcher.dispatch_capacity(x, ids, weights, placement, capacity)
        return received, dispatcher.combine(received.x_sorted, received)

    received, _ = run()
    if mode == "capacity":
        received.check()
    with debug.counting_host_reads() as reads:
        run()
    held = {}
    dispatch_ops = debug.op_counts(lambda: held.update(r=run()[0]))
    received = held["r"]
    combine_ops = debug.op_counts(lambda: dispatcher.combine(received.x_sorted, received))
    if mode == "capacity":
        received.check()  # after the counted step, as a serving loop does
    local = placement.num_local_experts
    width = min(ids.shape[1], local)
    everyone = [None] * world
    dist.all_gather_object(everyone, ids.cpu())
    needed = sum(int((placement.slot_rank.cpu()[i.long()] == rank).sum()) for i in everyone)
    computed = int(received.expert_offsets[-1])
    old_computed = local * world * capacity if mode == "capacity" else needed
    row_bytes = x.shape[1] * x.element_size() + 8 * width
    return {
        "mode": mode,
        "host reads": reads.count,
        "disp ops": sum(dispatch_ops.values()) - sum(combine_ops.values()),
        "comb ops": sum(combine_ops.values()),
        "B/row": row_bytes,
        "rows needed": needed,
        "computed/needed": computed / max(needed, 1),
        "old computed/needed": old_computed / max(needed, 1),
    }


def main() -> None:
    args = parse_args()
    rank, world, device = common.init_distributed(args.cpu)
    use_cuda = device.type == "cuda"
    dtype = common.DTYPES[args.dtype]
    element = torch.finfo(dtype).bits // 8
    tokens_list = args.tokens or ([128, 4096] if use_cuda else [128, 1024])
    placement = ExpertPlacement.contiguous(args.experts, world).to(device)
    say = print if rank == 0 else (lambda *a, **k: None)
    env = common.environment(device)
    say(
        f"# {env['device']} x {world} ranks ({dist.get_backend()}) | torch {env['torch']} | "
        f"{args.dtype} | hidden {args.hidden} | {args.experts} experts | {env['date']}"
    )
    say(f"# {env['command']}")

    rows = []
    for tokens in tokens_list:
        for top_k in args.topk:
            torch.manual_seed(rank)
            x = torch.randn(tokens, args.hidden, device=device).to(dtype)
            logits = torch.randn(tokens, args.experts, device=device)
            weights, ids = logits.softmax(-1).topk(top_k, dim=-1)
            ids = ids.int()

            received, t_disp = common.time_collective(
                device, args.iters, dispatcher.dispatch, x, ids, weights, placement
            )
            ours, t_comb = common.time_collective(
                device, args.iters, dispatcher.combine, received.x_sorted, received, None
            )
            base, t_bdisp = common.time_collective(
                device, args.iters, baseline_dispatch, x, ids, weights, placement.expert_rank, world
            )
            theirs, t_bcomb = common.time_collective(
                device, args.iters, baseline_combine, *base, tokens, top_k
            )

            expected = x.float() * weights.sum(-1, keepdim=True)
            scale = max(expected.abs().max().item(), 1e-6)
            err = (
                max(
                    (ours.float() - expected).abs().max().item(),
                    (theirs.float() - expected).abs().max().item(),
                )
                / scale
            )
            ours_bytes = received.send_counts.sum().item() * args.hidden * element
            base_bytes = tokens * top_k * args.hidden * element
            stats = torch.tensor([ours_bytes, base_bytes, err])
            dist.all_reduce(stats, op=dist.ReduceOp.MAX)
            ours_bytes, base_bytes, err = stats.tolist()
            row = {
                "T/rank": tokens,
                "k": top_k,
                "disp ms": t_disp,
                "base disp ms": t_bdisp,
                "disp x": t_bdisp / t_disp,
                "comb ms": t_comb,
                "base comb ms": t_bcomb,
                "comb x": t_bcomb / t_comb,
                "MB sent": ours_bytes / 1e6,
                "base MB": base_bytes / 1e6,
                "dedup saves": 1 - ours_bytes / base_bytes,
                "disp GB/s": ours_bytes / t_disp / 1e6,
                "base GB/s": base_bytes / t_bdisp / 1e6,
                "rel err": err,
            }
            rows.append(row)
            say(common.format_table([row], list(row)))

    say("\n" + common.format_table(rows, list(rows[0])))
    counts = []
    for tokens in tokens_list:
        for top_k in args.topk:
            torch.manual_seed(rank)
            x = torch.randn(tokens, args.hidden, device=device).to(dtype)
            ids = torch.randn(tokens, args.experts, device=device).topk(top_k, dim=-1)[1].int()
            weights = torch.rand(tokens, top_k, device=device)
            for mode in ("exact", "capacity"):
                row = {"T/rank": tokens, "k": top_k}
                row.update(hot_path_counts(x, ids, weights, placement, mode, rank, world))
                counts.append(row)
    say("\n" + common.format_table(counts, list(counts[0])))
    say(
        "# host reads: per dispatch + combine (rank 0). ops: kernels and collectives per call "
        "(CPU operator count; the CUDA counting sort is 3 kernels). B/row: hidden state + "
        "metadata bytes per dispatched row. computed/needed: expert rows computed over the "
        "(token, choice) pairs routed to rank 0; old: the fixed-capacity design before this one."
    )
    say(
        "# MB sent: hidden-state bytes the busiest rank sends per dispatch (moe_ep: one row per "
        "(token, rank), the deduplicated minimum; base: one row per (token, choice))."
    )
    say("# disp x / comb x: baseline time / moe_ep time. GB/s: those bytes / dispatch time.")
    if args.json and rank == 0:
        common.write_json(
            args.json, {"environment": env, "world": world, "rows": rows, "hot_path": counts}
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

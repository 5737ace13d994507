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

The FP8 dispatch (dispatch_dtype=torch.float8_e4m3fn, docs/dispatch.md) is timed beside the
plain one ("fp8 disp ms", and its error against float64: the quantization's), its bytes per row
are measured on the tensors that travel (hidden state, scales, metadata), and a third table
puts what it costs, the quantizing pack and the dequantizing row scatter against the plain
ones (from the profiler: kernel time on a GPU, operator time on the CPU), beside the wire time
its smaller rows save at the NVLink and network rates of the cost model's --hardware preset.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from moe_ep import debug, dispatcher, perf  # noqa: E402
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
    p.add_argument(
        "--hardware",
        choices=sorted(perf.HARDWARE),
        default="h200",
        help="cost-model preset whose link rates price the bytes the FP8 dispatch saves",
    )
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


def wire_bytes_per_row(x, ids, weights, placement, mode, capacity, dispatch_dtype):
    """Bytes per row of the tensors that travel (rows and metadata, FP8 scales included),
    measured on what this rank received."""
    args = (x, ids, weights, placement.expert_rank, placement.expert_local)
    local, group = placement.num_local_experts, dist.group.WORLD.group_name
    if mode == "exact":
        x_recv, meta_recv, _, _, _, entries = torch.ops.moe_ep.dispatch_start(
            *args, local, 1, group, dispatch_dtype
        )
        torch.ops.moe_ep.dispatch_finish(x_recv, meta_recv, entries, local, x.dtype)
    else:
        x_recv, meta_recv, _ = torch.ops.moe_ep.dispatch_capacity_start(
            *args, local, capacity, group, dispatch_dtype
        )
        torch.ops.moe_ep.dispatch_capacity_finish(x_recv, meta_recv, local, capacity, x.dtype)
    return (x_recv.nbytes + meta_recv.nbytes) / max(1, x_recv.shape[0])


def hot_path_counts(x, ids, weights, placement, mode, rank, world, dispatch_dtype=None):
    """Host reads, operators, bytes per row and rows computed / needed of one dispatch +
    combine (after a warm-up call, which makes the fixed-capacity handshake)."""
    tokens = x.shape[0]
    capacity = max(1, tokens)

    def run():
        if mode == "exact":
            received = dispatcher.dispatch(
                x, ids, weights, placement, dispatch_dtype=dispatch_dtype
            )
        else:
            received = dispatcher.dispatch_capacity(
                x, ids, weights, placement, capacity, dispatch_dtype=dispatch_dtype
            )
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
    everyone = [None] * world
    dist.all_gather_object(everyone, ids.cpu())
    needed = sum(int((placement.slot_rank.cpu()[i.long()] == rank).sum()) for i in everyone)
    computed = int(received.expert_offsets[-1])
    old_computed = local * world * capacity if mode == "capacity" else needed
    return {
        "mode": mode,
        "wire": "fp8" if dispatch_dtype == torch.float8_e4m3fn else str(x.dtype)[6:],
        "host reads": reads.count,
        "disp ops": sum(dispatch_ops.values()) - sum(combine_ops.values()),
        "comb ops": sum(combine_ops.values()),
        "B/row": wire_bytes_per_row(x, ids, weights, placement, mode, capacity, dispatch_dtype),
        "rows needed": needed,
        "computed/needed": computed / max(needed, 1),
        "old computed/needed": old_computed / max(needed, 1),
    }


FP8 = torch.float8_e4m3fn
# The layout kernels the FP8 dispatch changes (they record themselves for the profiler).
PACK, SCATTER, DEQUANTIZE = (
    "moe_ep::pack",
    "moe_ep::scatter_rows",
    "moe_ep::scatter_dequantized_rows",
)


def layout_kernel_ms(fn, device, iters):
    """Milliseconds per call of each moe_ep layout kernel that fn() runs, from the profiler:
    the device time of the kernels launched inside it on a GPU, its operator time on the CPU."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    fn()  # warm-up
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(iters):
            fn()
        common.synchronize(device)
    return {
        e.key: (e.device_time_total if device.type == "cuda" else e.cpu_time_total) / e.count / 1e3
        for e in prof.key_averages()
        if e.key in (PACK, SCATTER, DEQUANTIZE)
    }


def quantize_cost(x, ids, weights, placement, iters, hw):
    """What the FP8 dispatch costs in kernels (the quantizing pack and the dequantizing row
    scatter over the plain ones) beside the wire time its smaller rows save this rank."""
    row = {}
    for wire in (None, FP8):
        times = layout_kernel_ms(
            lambda w=wire: dispatcher.dispatch(x, ids, weights, placement, dispatch_dtype=w),
            x.device,
            iters,
        )
        name = "fp8" if wire else "plain"
        row[f"{name} pack ms"] = times.get(PACK, 0.0)
        row[f"{name} scatter ms"] = times.get(DEQUANTIZE if wire else SCATTER, 0.0)
    row["extra ms"] = (
        row["fp8 pack ms"] + row["fp8 scatter ms"] - row["plain pack ms"] - row["plain scatter ms"]
    )
    rows_sent = dispatcher.dispatch(x, ids, weights, placement).send_counts.sum().item()
    hidden = x.shape[1]
    saved = rows_sent * (
        dispatcher.dispatch_row_bytes(hidden, x.dtype)
        - dispatcher.dispatch_row_bytes(hidden, x.dtype, FP8)
    )
    row["MB saved"] = saved / 1e6
    row["NVLink ms saved"] = saved / (hw.intra_node_bandwidth * hw.intra_node_efficiency) * 1e3
    row["network ms saved"] = saved / (hw.inter_node_bandwidth * hw.inter_node_efficiency) * 1e3
    return row


def main() -> None:
    args = parse_args()
    rank, world, device = common.init_distributed(args.cpu)
    use_cuda = device.type == "cuda"
    dtype = common.DTYPES[args.dtype]
    element = torch.finfo(dtype).bits // 8
    tokens_list = args.tokens or ([128, 4096] if use_cuda else [128, 1024])
    placement = ExpertPlacement.contiguous(args.experts, world).to(device)
    say, env = common.announce(
        rank, world, device, f"{args.dtype} | hidden {args.hidden} | {args.experts} experts"
    )

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
            fp8_received, t_fp8 = common.time_collective(
                device,
                args.iters,
                dispatcher.dispatch,
                x,
                ids,
                weights,
                placement,
                None,
                False,
                FP8,
            )
            fp8_out = dispatcher.combine(fp8_received.x_sorted, fp8_received)
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
            # The FP8 dispatch's error against float64: the quantization's (e4m3: <= 2^-4
            # of each element, reference.fp8_error_bound), over the largest output.
            exact = x.double() * weights.double().sum(-1, keepdim=True)
            fp8_err = (fp8_out.double() - exact).abs().max().item() / max(
                exact.abs().max().item(), 1e-6
            )
            ours_bytes = received.send_counts.sum().item() * args.hidden * element
            base_bytes = tokens * top_k * args.hidden * element
            stats = torch.tensor([ours_bytes, base_bytes, err, fp8_err])
            dist.all_reduce(stats, op=dist.ReduceOp.MAX)
            ours_bytes, base_bytes, err, fp8_err = stats.tolist()
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
                "fp8 disp ms": t_fp8,
                "fp8 x": t_disp / t_fp8,
                "fp8 err": fp8_err,
            }
            rows.append(row)
            say(common.format_table([row], list(row)))

    say("\n" + common.format_table(rows, list(rows[0])))
    hw = perf.HARDWARE[args.hardware]
    counts, costs = [], []
    for tokens in tokens_list:
        for top_k in args.topk:
            torch.manual_seed(rank)
            x = torch.randn(tokens, args.hidden, device=device).to(dtype)
            ids = torch.randn(tokens, args.experts, device=device).topk(top_k, dim=-1)[1].int()
            weights = torch.rand(tokens, top_k, device=device)
            for mode in ("exact", "capacity"):
                for wire in (None, FP8):
                    row = {"T/rank": tokens, "k": top_k}
                    row.update(hot_path_counts(x, ids, weights, placement, mode, rank, world, wire))
                    counts.append(row)
                plain, fp8 = counts[-2:]
                fp8["B/row vs plain"] = fp8["B/row"] / plain["B/row"]
            row = {"T/rank": tokens, "k": top_k}
            row.update(quantize_cost(x, ids, weights, placement, args.iters, hw))
            costs.append(row)
    say("\n" + common.format_table(counts, list(counts[-1])))
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
    say(
        "# disp x / comb x: baseline time / moe_ep time. GB/s: those bytes / dispatch time. "
        "fp8 disp ms: the FP8 dispatch; fp8 x: plain / FP8 time; fp8 err: its error (max over "
        "the largest output) after the identity experts and combine."
    )
    say("\n" + common.format_table(costs, list(costs[0])))
    say(
        f"# rank 0, per dispatch. pack / scatter: the sender's pack (FP8: quantizing) and the "
        f"receiver's row scatter (FP8: dequantizing), {'kernel' if use_cuda else 'operator'} "
        f"time from the profiler; extra: FP8 minus plain. MB saved: the bytes this rank does not "
        f"send; ms saved: those bytes at {args.hardware}'s NVLink "
        f"{hw.intra_node_bandwidth * hw.intra_node_efficiency / 1e9:.0f} GB/s and network "
        f"{hw.inter_node_bandwidth * hw.inter_node_efficiency / 1e9:.0f} GB/s per GPU (the cost "
        f"model's rates)."
    )
    if args.json and rank == 0:
        common.write_json(
            args.json,
            {
                "environment": env,
                "world": world,
                "rows": rows,
                "hot_path": counts,
                "fp8_cost": costs,
            },
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

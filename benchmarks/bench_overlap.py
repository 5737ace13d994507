"""Compute-communication overlap of the expert-parallel MoE layer, in one run:

    compute alone    the local experts on the rows this rank receives (no communication)
    comm alone       dispatch + combine with identity experts (no expert compute)
    sequential       the layer with num_chunks = 1 (each phase waits for the previous one)
    overlapped       the layer with num_chunks = n (moe_ep.pipeline)
    efficiency       (sequential - overlapped) / min(compute, comm): the share of the hideable
                     time that the pipeline hid (1 = all of it)

    torchrun --standalone --nproc-per-node 2 benchmarks/bench_overlap.py            # CPU, Gloo
    torchrun --standalone --nproc-per-node 8 benchmarks/bench_overlap.py --profile out.json

Times are the median over iterations of the slowest rank. --profile writes a torch.profiler
trace of the overlapped run (rank 0) that shows the transfers next to the expert GEMMs.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from moe_ep import MoELayer, dispatcher  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, help="tokens per rank (default: 4096 GPU, 512 CPU)")
    p.add_argument("--hidden", type=int, help="default: 7168 GPU, 1024 CPU")
    p.add_argument("--ffn", type=int, help="default: 2048 GPU, 512 CPU")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--chunks", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--mode", choices=["exact", "capacity"], default="exact")
    p.add_argument("--dtype", choices=sorted(common.DTYPES), help="default: bf16 GPU, fp32 CPU")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--profile", help="torch.profiler trace of the overlapped run (rank 0)")
    p.add_argument("--json", help="also write the results to this file (rank 0)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    rank, world, device = common.init_distributed(args.cpu)
    use_cuda = device.type == "cuda"
    tokens = args.tokens or (4096 if use_cuda else 512)
    hidden = args.hidden or (7168 if use_cuda else 1024)
    ffn = args.ffn or (2048 if use_cuda else 512)
    dtype = common.DTYPES[args.dtype or ("bf16" if use_cuda else "fp32")]
    say = print if rank == 0 else (lambda *a, **k: None)
    env = common.environment(device)
    say(
        f"# {env['device']} x {world} ranks ({dist.get_backend()}) | torch {env['torch']} | "
        f"T/rank {tokens} H {hidden} F {ffn} E {args.experts} k {args.topk} {dtype} "
        f"{args.mode} | {env['date']}"
    )
    say(f"# {env['command']}")

    torch.manual_seed(0)
    layer = MoELayer(
        hidden,
        ffn,
        args.experts,
        args.topk,
        dtype=dtype,
        device=device,
        group=dist.group.WORLD,
        dispatch_mode=args.mode,
        capacity=tokens,
    )
    torch.manual_seed(1 + rank)
    x = torch.randn(tokens, hidden, device=device).to(dtype)
    slots, weights = layer.route_slots(x)

    def dispatched():
        return layer.finish_dispatch(layer.start_dispatches(x, slots, weights, 1)[0])

    def exchange_only():
        received = dispatched()
        return layer.start_combine(received.x_sorted, received).wait()

    received = dispatched()
    _, t_compute = common.time_collective(device, args.iters, layer.local_experts, received)
    _, t_comm = common.time_collective(device, args.iters, exchange_only)

    def step(tokens):
        # A serving loop checks fixed-capacity statuses once per step, not per layer: here
        # the capacity holds every rank's tokens, and one check follows the timing.
        out = layer(tokens)
        statuses.extend(layer.dispatch_status)
        layer.dispatch_status = []
        return out

    statuses = []
    layer.num_chunks = 1
    reference, t_seq = common.time_collective(device, args.iters, step, x)
    rows = []
    for chunks in args.chunks:
        layer.num_chunks = chunks
        out, t_over = common.time_collective(device, args.iters, step, x)
        err = (out.float() - reference.float()).abs().max().item()
        hideable = min(t_compute, t_comm)
        rows.append(
            {
                "chunks": chunks,
                "compute ms": t_compute,
                "comm ms": t_comm,
                "sequential ms": t_seq,
                "overlapped ms": t_over,
                "efficiency": (t_seq - t_over) / hideable if hideable > 0 else None,
                "max |diff|": err,
            }
        )
        say(common.format_table(rows[-1:], list(rows[-1])))
    say("\n" + common.format_table(rows, list(rows[0])))
    dispatcher.check_status(statuses, tokens)

    if args.profile:
        layer.num_chunks = max(args.chunks)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if use_cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(3):
                step(x)
            common.synchronize(device)
        if rank == 0:
            prof.export_chrome_trace(args.profile)
            say(f"# trace written to {args.profile}")
    if args.json and rank == 0:
        common.write_json(args.json, {"environment": env, "world": world, "rows": rows})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""The main job: an expert-parallel MoE layer at the seeds' dimensions, checked against the
plain PyTorch reference, with per-stage times.

    torchrun --standalone --nproc-per-node 4 -m moe_ep.demo          # CPU, Gloo
    torchrun --standalone --nproc-per-node 8 -m moe_ep.demo          # GPUs, NCCL

On a CPU the seeds' dimensions (hidden 7168, expert FFN 2048, 64 experts, top-2) are scaled
down to fit; on GPUs they are used as they are. Without torchrun it runs on one rank.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from moe_ep import MoELayer, dispatcher, ops, reference
from moe_ep.placement import ExpertPlacement

SEEDS = {"hidden": 7168, "ffn": 2048, "experts": 64, "topk": 2, "tokens": 4096}
CPU_SCALED = {"hidden": 512, "ffn": 128, "experts": 64, "topk": 2, "tokens": 256}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hidden", type=int)
    p.add_argument("--ffn", type=int)
    p.add_argument("--experts", type=int)
    p.add_argument("--topk", type=int)
    p.add_argument("--tokens", type=int, help="tokens per rank")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even with GPUs")
    return p.parse_args()


def init_distributed(use_cuda: bool) -> tuple[int, int, torch.device]:
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if use_cuda else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=5))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn, iters: int):
    """(last result, median seconds) of fn over iters runs after one warm-up."""
    result = fn()
    samples = []
    for _ in range(iters):
        synchronize(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        samples.append(time.perf_counter() - start)
    return result, statistics.median(samples)


def main() -> None:
    args = parse_args()
    use_cuda = torch.cuda.is_available() and not args.cpu
    rank, world, device = init_distributed(use_cuda)
    dims = dict(SEEDS if use_cuda else CPU_SCALED)
    for key in dims:
        if getattr(args, key) is not None:
            dims[key] = getattr(args, key)
    dtype = getattr(torch, args.dtype or ("bfloat16" if use_cuda else "float32"))
    group = dist.group.WORLD if world > 1 else None
    say = print if rank == 0 else (lambda *a, **k: None)

    placement = ExpertPlacement.contiguous(dims["experts"], world)
    say(
        f"moe_ep demo: {world} rank(s) on {device.type}, backend "
        f"{dist.get_backend() if world > 1 else 'none'}, dtype {dtype}, dims {dims}"
    )
    per_rank = [placement.local_experts(r) for r in range(world)]
    say(
        "placement (rank: experts): "
        + "; ".join(
            f"{r}: {ids[0]}-{ids[-1]}" if ids else f"{r}: -" for r, ids in enumerate(per_rank)
        )
    )

    # The same full weights on every rank; each rank keeps its own experts.
    torch.manual_seed(0)
    layer = MoELayer(
        dims["hidden"],
        dims["ffn"],
        dims["experts"],
        dims["topk"],
        dtype=dtype,
        device=device,
        group=group,
        placement=placement if group else None,
    )
    full = MoELayer(dims["hidden"], dims["ffn"], dims["experts"], dims["topk"], dtype=dtype)
    layer.load_full_weights(full.gate_weight.to(device), full.w13.to(device), full.w2.to(device))
    torch.manual_seed(1 + rank)
    x = torch.randn(dims["tokens"], dims["hidden"]).to(dtype).to(device)

    # Per-stage times, each stage run on its own (the layer's forward is the same sequence).
    ids_weights, t_route = timed(device, lambda: layer.route(x), args.iters)
    ids, weights = ids_weights
    times = {"route": t_route}
    if group is None:
        permuted, t_perm = timed(device, lambda: ops.permute(x, ids, dims["experts"]), args.iters)
        rows, offsets, row_of = permuted
        y, t_exp = timed(
            device, lambda: ops.expert_ffn(rows, offsets, layer.w13, layer.w2), args.iters
        )
        _, t_comb = timed(device, lambda: ops.unpermute(y, row_of, weights), args.iters)
        times.update(permute=t_perm, experts=t_exp, unpermute=t_comb)
    else:
        received, t_disp = timed(
            device, lambda: dispatcher.dispatch(x, ids, weights, layer.placement, group), args.iters
        )
        offsets = received.expert_offsets[: layer.w13.shape[0] + 1]
        y, t_exp = timed(
            device,
            lambda: ops.expert_ffn(received.x_sorted, offsets, layer.w13, layer.w2),
            args.iters,
        )
        _, t_comb = timed(device, lambda: dispatcher.combine(y, received, group), args.iters)
        layout = dispatcher.dispatch_layout(ids, layer.placement)
        times.update(dispatch=t_disp, experts=t_exp, combine=t_comb)
    out, t_layer = timed(device, lambda: layer(x), args.iters)
    times["layer"] = t_layer

    # Check against the float64 reference on this rank's tokens (a sample on big inputs).
    sample = slice(0, min(dims["tokens"], 512))
    expected = reference.moe(
        x[sample].cpu(), ids[sample].cpu(), weights[sample].cpu(), full.w13, full.w2
    )
    error = (out[sample].double().cpu() - expected).abs().max().item()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    tolerance = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    ok = error <= tolerance * max(scale, 1e-6)

    stats = torch.tensor([error, scale, float(not ok)] + [times[k] for k in times])
    if world > 1:
        gathered = [torch.zeros_like(stats) for _ in range(world)]
        dist.all_gather_object(gathered, stats)
    else:
        gathered = [stats]
    for r, s in enumerate(gathered):
        stage = ", ".join(
            f"{k} {1e3 * v:.2f} ms" for k, v in zip(times, s[3:].tolist(), strict=True)
        )
        say(f"rank {r}: {stage}")
    if group is not None:
        say(
            f"rank 0 token batching: {layout.rows_sent} rows sent for {ids.numel()} choices "
            f"({layout.bytes_saved(dims['hidden'], dtype) / 2**20:.2f} MiB saved)"
        )
    failed = [r for r, s in enumerate(gathered) if s[2] > 0]
    worst = max(s[0].item() / max(s[1].item(), 1e-6) for s in gathered)
    say(
        f"check against the float64 reference: max relative error {worst:.2e} "
        f"(tolerance {tolerance:.0e}): {'PASS' if not failed else f'FAIL on ranks {failed}'}"
    )
    if world > 1:
        dist.destroy_process_group()
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()

"""What the FP8 dispatch costs in accuracy: an expert-parallel MoELayer with
dispatch_dtype=torch.float8_e4m3fn against the same layer dispatching in its own dtype, and both
against the float64 reference, on Gaussian and on heavy-tailed activations.

    torchrun --standalone --nproc-per-node 2 benchmarks/bench_fp8_accuracy.py          # CPU, Gloo
    torchrun --standalone --nproc-per-node 8 benchmarks/bench_fp8_accuracy.py          # GPUs, NCCL

Activations: "gaussian" N(0, 1); "student-t" Student-t with 3 degrees of freedom (heavy tails);
"outlier channels" N(0, 1) with 0.5% of the channels 100x larger, the massive activations of
LLM residual streams (the other channels of a 128-channel block share the outlier's scale).
Weights as MoELayer.reset_parameters draws them, the same on every rank; routing by the layer.

Errors, over all ranks' tokens: max |out - ref| / max |ref| and ||out - ref|| / ||ref||.
bound: the largest error that e4m3's precision allows (reference.fp8_error_bound per element,
propagated through the experts by reference.moe_error_bound), over max |ref|; fp8 / bound: how
much of it the FP8 dispatch uses. x: the round trip's own error on the activations.
fp8 / predicted (hidden <= 1024 only: a Jacobian per token): the FP8 layer's rms error against
float64 over the one predicted to first order from uniform roundings over e4m3's spacing
(reference.fp8_error_variance, reference.moe_error_std), the model behind the tests' tolerance.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import moe_ep  # noqa: E402
from moe_ep import reference  # noqa: E402

FP8 = torch.float8_e4m3fn


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, default=128, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--dtype", choices=sorted(common.DTYPES), default="bf16")
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even with GPUs")
    p.add_argument("--json", help="also write the rows to this file (rank 0)")
    return p.parse_args()


def activations(kind: str, tokens: int, hidden: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(tokens, hidden, generator=g)
    if kind == "student-t":
        chi2 = torch.randn(tokens, hidden, 3, generator=g).pow(2).sum(-1)
        x = x / (chi2 / 3).sqrt()
    elif kind == "outlier channels":
        outliers = torch.randperm(hidden, generator=g)[: max(1, hidden // 200)]
        x[:, outliers] *= 100.0
    return x


class Errors:
    """max |out - ref|, ||out - ref||^2 and the reference's max and squared norm, summed over
    ranks."""

    def __init__(self, out: torch.Tensor, ref: torch.Tensor):
        diff = out.double().cpu() - ref.double().cpu()
        self.values = torch.tensor(
            [
                diff.abs().max().item() if diff.numel() else 0.0,
                diff.pow(2).sum().item(),
                ref.abs().max().item() if ref.numel() else 0.0,
                ref.double().pow(2).sum().item(),
            ],
            dtype=torch.float64,
        )

    def reduce(self) -> tuple[float, float]:
        maxima, sums = self.values[[0, 2]].clone(), self.values[[1, 3]].clone()
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
        dist.all_reduce(sums)
        return maxima[0].item() / maxima[1].item(), math.sqrt(sums[0].item() / sums[1].item())


def main() -> None:
    args = parse_args()
    rank, world, device = common.init_distributed(args.cpu)
    dtype = common.DTYPES[args.dtype]
    say, env = common.announce(
        rank,
        world,
        device,
        f"{args.dtype} layer | hidden {args.hidden}, ffn {args.ffn}, {args.experts} experts, "
        f"top-{args.topk}, {args.tokens} tokens per rank",
    )

    torch.manual_seed(0)  # all experts' weights, the same on every rank, on the CPU
    full = moe_ep.MoELayer(args.hidden, args.ffn, args.experts, args.topk, dtype=dtype)
    w13, w2 = full.w13, full.w2
    layers = {}
    for wire in (dtype, FP8):
        layer = moe_ep.MoELayer(
            args.hidden,
            args.ffn,
            args.experts,
            args.topk,
            dtype=dtype,
            device=device,
            group=dist.group.WORLD,
            dispatch_dtype=wire,
        )
        layer.load_full_weights(*(t.to(device) for t in (full.gate_weight, w13, w2)))
        layers[wire] = layer

    rows = []
    for kind in ("gaussian", "student-t", "outlier channels"):
        g = torch.Generator().manual_seed(1000 * rank + len(kind))
        x = activations(kind, args.tokens, args.hidden, g).to(dtype)
        plain = layers[dtype](x.to(device)).cpu()
        fp8 = layers[FP8](x.to(device)).cpu()
        ids, weights = layers[dtype].route(x.to(device))
        ids, weights = ids.cpu(), weights.cpu()
        ref = reference.moe(x, ids, weights, w13, w2)
        bound = reference.moe_error_bound(x, reference.fp8_error_bound(x), ids, weights, w13, w2)
        x_err = Errors(reference.fp8_round_trip(x), x).reduce()
        plain_err = Errors(plain, ref).reduce()
        fp8_err = Errors(fp8, ref).reduce()
        versus_plain = Errors(fp8, plain).reduce()
        bound_rel = Errors(ref + bound, ref).reduce()[0]
        predicted = None
        if args.hidden <= 1024:
            variance = reference.fp8_error_variance(x)
            std = reference.moe_error_std(x, variance, ids, weights, w13, w2)
            predicted = fp8_err[1] / Errors(ref + std, ref).reduce()[1]
        rows.append(
            {
                "activations": kind,
                "x max": x_err[0],
                "x rms": x_err[1],
                "plain max": plain_err[0],
                "plain rms": plain_err[1],
                "fp8 max": fp8_err[0],
                "fp8 rms": fp8_err[1],
                "fp8-plain max": versus_plain[0],
                "fp8-plain rms": versus_plain[1],
                "bound max": bound_rel,
                "fp8 max / bound": fp8_err[0] / bound_rel,
                "fp8 / predicted": predicted,
            }
        )
        say(common.format_table(rows[-1:], list(rows[-1])))
    say("\n" + common.format_table(rows, list(rows[0])))
    say(
        "# relative errors: max = max |out - ref| / max |ref|, rms = ||out - ref|| / ||ref||, "
        "over all ranks' tokens. x: the FP8 round trip of the activations against themselves. "
        f"plain: the layer dispatching in {args.dtype}, against float64; fp8: dispatching in "
        f"FP8, against float64; fp8-plain: FP8 against the {args.dtype} path; bound: the e4m3 "
        "bound propagated through the experts (reference.moe_error_bound), over max |ref|; "
        "predicted: the first-order rms error of uniform e4m3 roundings (hidden <= 1024)."
    )
    if args.json and rank == 0:
        common.write_json(args.json, {"environment": env, "world": world, "rows": rows})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

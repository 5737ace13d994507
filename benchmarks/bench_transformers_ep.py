"""transformers' expert-parallel implementations against moe_ep's, on the same model and
prompts: ep_implementation = "all_to_all", "all_reduce" and "moe_ep" through
from_pretrained(..., distributed_config=DistributedConfig(ep_size=N, tp_size=N, ...)).

    torchrun --standalone --nproc-per-node 4 benchmarks/bench_transformers_ep.py     # CPU, Gloo

The model: a Mixtral-shaped model with random weights (saved once, loaded three times), every
rank holding the same prompts (tp_size == ep_size, transformers' shared batch). Per
implementation:

* time per forward (prefill of --batch x --seq tokens; median over --iters rounds of the
  slowest rank, ranks started together; the rounds go round-robin over the three loaded
  models, so that the machine's load changes hit them alike);
* bytes sent per MoE layer per rank, from the step's routing and what each implementation's
  code sends (counted here, not traced):
  all_to_all: each rank's slice of the batch, one row per (token, expert) on another rank,
  there and back (+ the per-expert counts), then the TP all-gather of the outputs;
  all_reduce: a ring all-reduce of the [T, H] output, 2 (N - 1) / N x T x H per rank;
  moe_ep: each rank's slice, one row per (token, destination rank) on another rank, there
  (with W local ids and W float32 weights) and back, the header, then the TP all-gather;
* host reads per MoE layer: moe_ep's own counter (moe_ep.debug) plus, for every path, the
  torch calls that make the host wait for tensor data (.tolist(), .item() and ops whose
  output size depends on data), counted while the forward runs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, DistributedConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import moe_ep.integrations.transformers  # noqa: E402, F401  (registers "moe_ep")
from moe_ep import debug  # noqa: E402
from moe_ep.examples import models  # noqa: E402

IMPLEMENTATIONS = ("all_to_all", "all_reduce", "moe_ep")
HEADER_BYTES = (
    36 * 8
)  # moe_ep's header row per peer: kHeaderSize int64 (csrc/core/dispatch_layout.h)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=256)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--dtype", choices=list(common.DTYPES), default="fp32")
    p.add_argument("--json", help="write the results here (rank 0)")
    return p.parse_args()


class HostWaits(TorchDispatchMode):
    """Counts the aten ops that read tensor data on the host, while active."""

    DATA_DEPENDENT = {
        "_local_scalar_dense", "nonzero", "masked_select", "unique_consecutive", "_unique2",
        "bincount", "repeat_interleave",
    }  # fmt: skip

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        kwargs = kwargs or {}
        if name in self.DATA_DEPENDENT and not (
            name == "repeat_interleave" and kwargs.get("output_size") is not None
        ):
            self.count += 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def counting_host_waits():
    """(HostWaits mode, moe_ep reads at entry): Tensor.tolist is counted too (it reads the
    data without an aten op)."""
    mode = HostWaits()
    original = torch.Tensor.tolist

    def tolist(self):
        mode.count += 1
        return original(self)

    torch.Tensor.tolist = tolist
    try:
        with mode:
            yield mode
    finally:
        torch.Tensor.tolist = original


def routing(model, prompts) -> list[torch.Tensor]:
    """Each MoE layer's top-k ids [T, k] for the prompts (the plain model's routers)."""
    ids = []
    hooks = [
        m.register_forward_hook(lambda mod, i, out: ids.append(out[2]))
        for name, m in model.named_modules()
        if name.endswith("mlp.gate")
    ]
    with torch.no_grad():
        model(prompts)
    for hook in hooks:
        hook.remove()
    return ids


def bytes_per_layer(ids: torch.Tensor, world: int, rank: int, experts: int, row: int) -> dict:
    """(exchange, TP all-gather) bytes this rank sends for one MoE layer, per implementation
    (module docstring)."""
    tokens = ids.shape[0]
    per_rank = -(-tokens // world)
    mine = ids[rank * per_rank : (rank + 1) * per_rank]
    home = mine // (experts // world)  # contiguous experts (transformers' Shard(0))
    remote_pairs = int((home != rank).sum())
    # moe_ep: one row per (token, destination rank) off this rank
    destinations = torch.zeros(mine.shape[0], world, dtype=torch.bool)
    destinations.scatter_(1, home, True)
    remote_rows = int(destinations.sum() - destinations[:, rank].sum())
    width = min(ids.shape[1], experts // world)
    gather = (world - 1) * mine.shape[0] * row
    return {
        "all_to_all": (2 * remote_pairs * row + experts * 8, gather),
        "all_reduce": (int(2 * (world - 1) / world * tokens * row), 0),
        "moe_ep": (remote_rows * (2 * row + 8 * width) + (world - 1) * HEADER_BYTES, gather),
    }


def main() -> None:
    args = parse_args()
    rank, world, device = common.init_distributed(cpu_only=True)
    dtype = common.DTYPES[args.dtype]
    torch.set_num_threads(1)
    config = models.small_config(
        "mixtral",
        hidden=args.hidden,
        ffn=args.ffn,
        experts=args.experts,
        top_k=args.topk,
        layers=args.layers,
        heads=8,
        vocab=1024,
    )
    with models.shared_directory() as scratch:
        path = os.path.join(scratch, "model")
        models.save_random_model(config, path, dtype)
        g = torch.Generator().manual_seed(0)  # the same prompts on every rank
        prompts = torch.randint(config.vocab_size, (args.batch, args.seq), generator=g)
        plain = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        layer_ids = routing(plain, prompts)
        with torch.no_grad():
            expected = plain(prompts).logits
        del plain
        row = args.hidden * torch.finfo(dtype).bits // 8
        sent = [bytes_per_layer(ids, world, rank, args.experts, row) for ids in layer_ids]
        loaded = {
            name: AutoModelForCausalLM.from_pretrained(
                path,
                dtype=dtype,
                distributed_config=DistributedConfig(
                    ep_size=world, tp_size=world, ep_implementation=name
                ),
            ).eval()
            for name in IMPLEMENTATIONS
        }
    # Round-robin: each round times one forward of every implementation, so that a change
    # of the machine's load hits them alike.
    samples = {name: [] for name in IMPLEMENTATIONS}
    logits = {}
    with torch.no_grad():
        for _ in range(args.iters):
            for name, model in loaded.items():
                logits[name], ms = common.time_collective(
                    device, 1, lambda m=model: m(prompts).logits
                )
                samples[name].append(ms)
    results = {}
    for name, model in loaded.items():
        with torch.no_grad():
            reads_before = debug.host_reads()
            with counting_host_waits() as waits:
                model(prompts)
            reads = debug.host_reads() - reads_before + waits.count
        error = (logits[name] - expected).abs().max() / expected.abs().max()
        results[name] = dict(
            ms=statistics.median(samples[name]),
            exchange_bytes_per_layer=sum(s[name][0] for s in sent) / len(sent),
            gather_bytes_per_layer=sum(s[name][1] for s in sent) / len(sent),
            host_reads_per_layer=reads / args.layers,
            max_relative_error=float(error),
        )
    totals = [None] * world
    dist.all_gather_object(totals, results)
    if rank == 0:
        print(
            f"transformers EP implementations vs moe_ep: Mixtral-shaped, hidden {args.hidden}, "
            f"FFN {args.ffn}, {args.experts} experts top-{args.topk}, {args.layers} layers, "
            f"{args.batch}x{args.seq} tokens on every rank, {world} ranks ({dist.get_backend()}), "
            f"{args.dtype}"
        )
        print(
            "KiB sent per MoE layer and rank (mean over ranks): the experts' exchange, then the"
            " all-gather of the TP group's output slices"
        )
        print("implementation  ms/forward  exchange KiB  gather KiB  host reads/layer  rel err")
        for name in IMPLEMENTATIONS:
            r = results[name]
            exchange, gather = (
                sum(t[name][key] for t in totals) / world / 1024
                for key in ("exchange_bytes_per_layer", "gather_bytes_per_layer")
            )
            print(
                f"{name:<14}  {r['ms']:>10.1f}  {exchange:>12.1f}  {gather:>10.1f}"
                f"  {r['host_reads_per_layer']:>16.1f}  {r['max_relative_error']:.1e}"
            )
        if args.json:
            common.write_json(args.json, {"env": common.environment(device), "results": totals})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

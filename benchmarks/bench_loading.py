"""Sharded loading: peak resident memory of a rank that loads a MoE model with
moe_ep.integrations.transformers.from_pretrained (its own experts only) against the model's
size and against a plain from_pretrained of the whole model.

    python benchmarks/bench_loading.py --save /tmp/moe-model                 # once
    torchrun --standalone --nproc-per-node 4 benchmarks/bench_loading.py --load /tmp/moe-model
    python benchmarks/bench_loading.py --load /tmp/moe-model --plain         # the whole model

The model: Mixtral-shaped, bfloat16, random weights (default 64 experts x 4 layers of
hidden 1024, FFN 1024: 1.5 GiB of experts). Each loading run is a fresh process, so its
peak (ru_maxrss) is the load's; the baseline is the resident memory after the imports.
"""

from __future__ import annotations

import argparse
import os
import resource

import torch
import torch.distributed as dist


def resident_mib() -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def save(path: str, args) -> None:
    from moe_ep.examples import models

    config = models.small_config(
        "mixtral",
        hidden=args.hidden,
        ffn=args.ffn,
        experts=args.experts,
        layers=args.layers,
        heads=8,
        vocab=1024,
    )
    models.random_model(config, torch.bfloat16).save_pretrained(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--save", help="write the model here and stop")
    p.add_argument("--load", help="load the model from here")
    p.add_argument(
        "--plain", action="store_true", help="transformers' from_pretrained, all experts"
    )
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    args = p.parse_args()
    if args.save:
        save(args.save, args)
        return
    from transformers import AutoModelForCausalLM

    import moe_ep.integrations.transformers as integration

    files = [f for f in os.listdir(args.load) if f.endswith(".safetensors")]
    size = sum(os.path.getsize(os.path.join(args.load, f)) for f in files) / 2**20
    baseline = resident_mib()
    if args.plain:
        model = AutoModelForCausalLM.from_pretrained(args.load, dtype=torch.bfloat16)
        rank, world = 0, 1
    else:
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        model = integration.from_pretrained(args.load, group=dist.group.WORLD)
    held = sum(t.nbytes for t in model.state_dict().values()) / 2**20
    line = (
        f"rank {rank}/{world}: checkpoint {size:.0f} MiB; after imports {baseline:.0f} MiB "
        f"resident; peak {peak_mib():.0f} MiB (+{peak_mib() - baseline:.0f}); "
        f"model tensors held {held:.0f} MiB"
    )
    if args.plain:
        print("plain from_pretrained: " + line)
        return
    lines = [None] * world
    dist.all_gather_object(lines, line)
    if rank == 0:
        print("moe_ep sharded loading:\n" + "\n".join(lines))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""The main job: a small DeepSeek-V3-shaped model (group-limited sigmoid routing with a
correction bias, a shared expert) served with data-parallel attention and expert-parallel
MoE, checked against the same model without expert parallelism.

    torchrun --standalone --nproc-per-node 4 -m moe_ep.demo          # CPU, Gloo
    torchrun --standalone --nproc-per-node 8 -m moe_ep.demo          # GPUs, NCCL

1. Rank 0 builds the model from a config with random weights and saves it (save_pretrained).
2. Every rank routes a calibration batch through the plain model; the summed expert loads
   go to the planner (moe_ep.plan), whose placement of each MoE layer the model is served
   with.
3. Every rank builds the model empty, converts its MoE blocks to moe_ep MoELayers on that
   placement and reads only its own experts from the checkpoint (sharded loading).
4. Each rank serves its own prompts (data-parallel attention), greedy, with a KV cache; the
   MoE layers dispatch tokens over the group; a LoadBalancer per layer counts the routing
   and re-plans (replicas, migrated weights) between steps when a rank is overloaded.
5. Printed: per-layer stage times (route, dispatch, experts, combine, shared expert),
   bytes sent per layer, balance before and after, and the check of tokens and logits
   against the plain model (every expert on every rank, no moe_ep).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, DynamicCache

from moe_ep import LoadBalancer, dispatcher, ops, plan
from moe_ep.examples import models
from moe_ep.examples.generate import logits_error
from moe_ep.integrations.transformers import (
    MoEBlock,
    convert,
    empty_model,
    load_pretrained,
    moe_blocks,
)
from moe_ep.integrations.transformers.families import family_of
from moe_ep.placement import ExpertPlacement

# DeepSeek-V3's routing (sigmoid, 8 groups with 4 chosen, top-8 scaled by 2.5, a correction
# bias, one shared expert) at a small size.
CPU_MODEL = dict(hidden=256, ffn=64, experts=32, heads=8)
GPU_MODEL = dict(hidden=2048, ffn=512, experts=64, heads=16)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, default=4, help="decoder layers (the first is dense)")
    p.add_argument("--prompts", type=int, default=4, help="prompts per rank")
    p.add_argument("--new-tokens", type=int, default=12)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--iters", type=int, default=5, help="timed repetitions per stage")
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even with GPUs")
    p.add_argument("--no-balancer", action="store_true", help="serve on the planner's placement")
    return p.parse_args()


def init_distributed(use_cuda: bool) -> torch.device:
    if "RANK" not in os.environ:  # a group of one
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533"
        )
    local_rank = int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=5))
    return torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


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


@torch.no_grad()
def planned_placements(reference, prompts, world: int) -> list[ExpertPlacement]:
    """The planner's placement of every MoE layer for the expert loads that the plain model's
    routers give this group's calibration prompts (summed over the ranks)."""
    routers = [m.gate for m in reference.modules() if family_of(m)]
    loads = []
    hooks = [
        r.register_forward_hook(lambda m, i, out: loads.append(out[2].reshape(-1))) for r in routers
    ]
    reference(prompts)
    for hook in hooks:
        hook.remove()
    experts = routers[0].num_experts
    counts = torch.stack([torch.bincount(ids, minlength=experts) for ids in loads])
    dist.all_reduce(counts)
    config = reference.config
    model = plan.Model(
        num_layers=len(routers),
        dense_layers=(),
        experts_per_layer=experts,
        top_k=config.num_experts_per_tok,
        bytes_per_expert=plan.gated_ffn_bytes(config.hidden_size, config.moe_intermediate_size),
        n_group=config.n_group,
        topk_group=config.topk_group,
    )
    cluster = plan.Cluster(num_nodes=1, gpus_per_node=world, gpu_memory_bytes=0)
    placed = plan.plan(model, cluster, loads=counts.tolist(), redundant_experts=0)
    return [ExpertPlacement.from_plan(layer, world) for layer in placed.layers]


@torch.no_grad()
def greedy(model, prompts, new_tokens, between_steps=None):
    """Greedy decoding with a KV cache: (tokens [B, new], logits [new, B, V])."""
    cache = DynamicCache(config=model.config)
    out = model(input_ids=prompts, cache=cache, use_cache=True)
    tokens, logits = [], []
    for _ in range(new_tokens):
        step_logits = out.logits[:, -1].float()
        logits.append(step_logits)
        tokens.append(step_logits.argmax(-1, keepdim=True))
        if between_steps is not None:
            between_steps()
        out = model(input_ids=tokens[-1], cache=cache, use_cache=True)
    return torch.cat(tokens, 1), torch.stack(logits)


def stage_times(block: MoEBlock, x: torch.Tensor, device, iters: int) -> dict[str, float]:
    """One MoE layer's stages timed one by one on its captured input (every rank runs the
    same sequence: the dispatch and combine are collective)."""
    moe = block.moe
    (ids, weights), t_route = timed(device, lambda: moe.route(x), iters)
    slots = moe.slot_ids(ids)
    received, t_dispatch = timed(
        device, lambda: dispatcher.dispatch(x, slots, weights, moe.placement, moe.group), iters
    )
    offsets = received.expert_offsets[: moe.w13.shape[0] + 1]
    y, t_experts = timed(
        device, lambda: ops.expert_ffn(received.x_sorted, offsets, moe.w13, moe.w2), iters
    )
    _, t_combine = timed(device, lambda: dispatcher.combine(y, received, moe.group), iters)
    _, t_shared = timed(device, lambda: block.shared_experts(x), iters)
    _, t_layer = timed(device, lambda: block(x), iters)
    return dict(
        route=t_route,
        dispatch=t_dispatch,
        experts=t_experts,
        combine=t_combine,
        shared=t_shared,
        layer=t_layer,
    )


def bytes_sent(moe, x: torch.Tensor) -> tuple[int, int]:
    """(moe_ep's bytes to other ranks for one dispatch + combine, the bytes of one row per
    (token, expert) as a plain all-to-all sends them) for this rank's tokens x."""
    ids, _ = moe.route(x)
    layout = dispatcher.dispatch_layout(moe.slot_ids(ids), moe.placement)
    rank = moe.group.rank()
    row = x.shape[1] * x.element_size()
    width = min(moe.top_k, moe.placement.num_local_experts)
    remote_rows = int(layout.send_counts.sum() - layout.send_counts[rank])
    remote_pairs = int(layout.entry_counts.sum() - layout.entry_counts[rank])
    # rows there and back, plus each row's metadata: W local ids and W float32 weights
    return remote_rows * (2 * row + 8 * width), remote_pairs * 2 * row


def main() -> None:
    args = parse_args()
    use_cuda = torch.cuda.is_available() and not args.cpu
    device = init_distributed(use_cuda)
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = getattr(torch, args.dtype)
    dims = GPU_MODEL if use_cuda else CPU_MODEL
    say = print if rank == 0 else (lambda *a, **k: None)
    config = models.small_config(
        "deepseek_v3", **dims, top_k=8, groups=8, layers=args.layers, vocab=1024
    )
    say(
        f"moe_ep demo: DeepSeek-V3-shaped model ({args.layers} layers, the first dense; hidden "
        f"{config.hidden_size}, {config.n_routed_experts} routed experts of FFN "
        f"{config.moe_intermediate_size} + 1 shared, top-{config.num_experts_per_tok} in "
        f"{config.topk_group} of {config.n_group} groups, sigmoid, scaling "
        f"{config.routed_scaling_factor}), {world} rank(s) on {device.type} "
        f"({dist.get_backend()}), {dtype}; data-parallel attention, expert-parallel MoE"
    )

    with models.shared_directory() as scratch:
        path = os.path.join(scratch, "model")
        models.save_random_model(config, path, dtype)

        # The plain model: every expert on every rank, for the planner's loads and the check.
        reference = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        g = torch.Generator().manual_seed(1000 + rank)
        calibration = torch.randint(config.vocab_size, (args.prompts, 16), generator=g).to(device)
        placements = planned_placements(reference, calibration, world)

        model = empty_model(config, dtype)
        convert(model, group=dist.group.WORLD, placement=placements, device=device)
        report = load_pretrained(model, path, device=device)
        model.eval()
    blocks = moe_blocks(model)
    # Synchronous migration at a window's end, so that the short demo ends with every
    # re-plan live (bench_balance.py measures the background migration).
    balancers = [
        LoadBalancer(block.moe, window=4, threshold=1.05, background=False) for block in blocks
    ]
    expert_bytes = sum(b.moe.w13.nbytes + b.moe.w2.nbytes for b in blocks)
    say(
        f"sharded loading: rank 0 read {report.expert_bytes_read / 2**20:.2f} MiB of experts "
        f"(its {expert_bytes / 2**20:.2f} MiB) and {report.bytes_read / 2**20:.2f} MiB of the rest"
    )
    for i, placement in enumerate(placements):
        experts = [placement.local_experts(r) for r in range(world)]
        say(
            f"layer {i + 1} placement (planner, calibration loads): "
            + "; ".join(f"rank {r}: {ids}" for r, ids in enumerate(experts))
        )

    # Serving: each rank its own prompts, of its own length.
    prompts = torch.randint(config.vocab_size, (args.prompts, 6 + rank), generator=g).to(device)
    captured: dict[int, torch.Tensor] = {}

    def capture(index: int):
        def hook(module, inputs) -> None:  # keeps each layer's first (prefill) input
            captured.setdefault(index, inputs[0].flatten(0, 1))

        return hook

    hooks = [b.register_forward_pre_hook(capture(i)) for i, b in enumerate(blocks)]

    def rebalance() -> None:
        for balancer in balancers:
            if not args.no_balancer:
                balancer.step()

    tokens, logits = greedy(model, prompts, args.new_tokens, rebalance)
    for hook in hooks:
        hook.remove()
    expected_tokens, expected_logits = greedy(reference, prompts, args.new_tokens)
    logit_error = logits_error(logits, expected_logits)
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    ok = torch.equal(tokens, expected_tokens) and logit_error <= tolerance

    # Per-layer figures on each layer's prefill input, on the balancer's final placement.
    rows = []
    for i, (block, balancer) in enumerate(zip(blocks, balancers, strict=True)):
        balance = [balancer.imbalance(placements[i]), balancer.imbalance()]
        times = stage_times(block, captured[i], device, args.iters)
        sent, per_pair = bytes_sent(block.moe, captured[i])
        rows.append(
            [1e3 * t for t in times.values()]
            + [sent, per_pair, *balance, len(balancer.migrations), balancer.migrated_bytes]
        )
    table = torch.tensor(rows, dtype=torch.float64)
    status = torch.tensor([float(not ok), logit_error])
    gathered = [torch.zeros_like(table) for _ in range(world)]
    statuses = [torch.zeros_like(status) for _ in range(world)]
    dist.all_gather(gathered, table)
    dist.all_gather(statuses, status)
    stages = ("route", "dispatch", "experts", "combine", "shared", "layer")
    say("per MoE layer, median ms over the ranks' own prefill batches (max over ranks):")
    say(
        "layer  "
        + "  ".join(f"{s:>8}" for s in stages)
        + "   KiB sent by all ranks (one row per (token, expert) would be)"
    )
    worst = torch.stack(gathered).amax(0)
    total = torch.stack(gathered).sum(0)
    for i in range(len(blocks)):
        times = "  ".join(f"{v:8.2f}" for v in worst[i, :6].tolist())
        say(f"{i + 1:>5}  {times}   {total[i, 6] / 1024:8.1f}  ({total[i, 7] / 1024:.1f})")
    say(
        "balance: max/mean rank load over the balancer's last window (4 served steps, all "
        "ranks' tokens)"
    )
    for i in range(len(blocks)):
        say(
            f"layer {i + 1}: on the planner's placement {worst[i, 8]:.3f}, on the balancer's "
            f"{worst[i, 9]:.3f} ({int(worst[i, 10])} re-plan(s), "
            f"{worst[i, 11] / 2**10:.1f} KiB of weights migrated)"
        )
    failed = [r for r, s in enumerate(statuses) if s[0] > 0]
    worst_error = max(float(s[1]) for s in statuses)
    say(
        f"check against the model without expert parallelism ({args.new_tokens} greedy tokens "
        f"per prompt, {args.prompts} prompts per rank): tokens "
        f"{'equal' if not failed else 'DIFFER'}, max relative logit error {worst_error:.2e} "
        f"(tolerance {tolerance:.0e}): {'PASS' if not failed else f'FAIL on ranks {failed}'}"
    )
    dist.destroy_process_group()
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()

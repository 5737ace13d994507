"""Expert placement plans: a thin view of the C++ planner (csrc/core/placement.h).

The planner decides, for every MoE layer, the physical expert slots (``phy2log``,
``log2phy``, replica counts) and the GPU of each slot; ``Placement`` holds the result,
round-trips through JSON and prints a summary. The traffic model behind the link loads
(tokens originate uniformly on all GPUs, node-deduplicated dispatch) is documented in the
C++ header.

    python -m moe_ep.plan --preset seeds --out seeds.json
    python -m moe_ep.plan --preset deepseek-v3 --zipf 1.0 --out v3.json
    python -m moe_ep.plan --preset deepseek-v3 --loads new.json --previous v3.json \
        --max-moves 16 --out v3-next.json      # re-plan, moving few expert weights

``rebalance_experts`` takes and returns what DeepSeek EPLB's function of that name does, so
a serving stack that calls EPLB can call it instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from moe_ep import _C

POLICIES = ("balanced", "greedy", "sequential")


@dataclass(frozen=True)
class Cluster:
    num_nodes: int = 488
    gpus_per_node: int = 8
    intra_node_bandwidth: float = 450e9  # bytes/s per GPU and direction (H100 NVLink)
    intra_node_latency: float = 3e-6
    inter_node_bandwidth: float = 50e9  # bytes/s per GPU NIC (400 Gb/s InfiniBand)
    inter_node_latency: float = 10e-6
    gpu_memory_bytes: float = 80e9  # 0: no limit

    @property
    def num_gpus(self) -> int:
        return self.num_nodes * self.gpus_per_node


@dataclass(frozen=True)
class Model:
    num_layers: int = 61
    dense_layers: tuple[int, ...] = (0, 1, 2)
    experts_per_layer: int = 64
    top_k: int = 2
    bytes_per_expert: float = 0.0
    dense_layer_bytes: float = 0.0
    # Group-limited routing: expert e is in group expert_group[e], or with expert_group
    # empty in group e // (experts_per_layer // n_group); a token's experts come from at
    # most topk_group groups (0: unknown, taken as limited). n_group == 1: no groups.
    n_group: int = 1
    topk_group: int = 0
    expert_group: tuple[int, ...] = ()

    @property
    def moe_layers(self) -> list[int]:
        return [layer for layer in range(self.num_layers) if layer not in self.dense_layers]


def one_layer(experts: int, top_k: int, bytes_per_expert: float) -> Model:
    """The Model of a single MoE layer: what a run-time re-plan of one layer plans."""
    return Model(
        num_layers=1,
        dense_layers=(),
        experts_per_layer=experts,
        top_k=top_k,
        bytes_per_expert=float(max(bytes_per_expert, 1)),
    )


def gated_ffn_bytes(hidden: int, ffn_hidden: int, dtype_bytes: int = 2) -> float:
    """Weights of one gated FFN (gate, up and down: 3 x hidden x ffn_hidden x dtype bytes)."""
    return _C.gated_ffn_bytes(hidden, ffn_hidden, dtype_bytes)


@dataclass(frozen=True)
class Preset:
    model: Model
    cluster: Cluster
    policy: str


def _presets() -> dict[str, Preset]:
    expert = gated_ffn_bytes(7168, 2048)
    # The seeds' model; their dense layers' FFN width is not given, 2048 is assumed.
    seeds = Model(61, (0, 1, 2), 64, 2, expert, expert)
    # DeepSeek-V3's public config: 256 routed experts, top-8 from 4 of 8 groups, dense FFN
    # 18432.
    v3 = Model(61, (0, 1, 2), 256, 8, expert, gated_ffn_bytes(7168, 18432), 8, 4)
    return {
        # The seeds run 64 GB GPUs; the layout is the seeds' own (see kSequential).
        "seeds": Preset(seeds, Cluster(gpu_memory_bytes=64e9), "sequential"),
        "deepseek-v3": Preset(v3, Cluster(), "balanced"),
    }


PRESETS = _presets()


@dataclass(frozen=True)
class LayerMetrics:
    """Expected per-step figures of one MoE layer (tokens are (token, expert) pairs)."""

    max_gpu_load: float = 0.0
    mean_gpu_load: float = 0.0
    max_link_load: float = 0.0  # tokens per NIC crossing the network, busiest node
    max_nvlink_load: float = 0.0

    @property
    def imbalance(self) -> float:
        return self.max_gpu_load / self.mean_gpu_load if self.mean_gpu_load else 1.0


@dataclass(frozen=True)
class LayerPlacement:
    layer: int
    dense: bool
    phy2log: tuple[int, ...]  # slot -> logical expert (slots ordered by GPU)
    log2phy: tuple[tuple[int, ...], ...]  # logical expert -> its slots
    replica_count: tuple[int, ...]
    gpus: tuple[int, ...]  # MoE: GPU of each slot; dense: GPUs that hold the layer
    metrics: LayerMetrics = field(default_factory=LayerMetrics)
    moves: int = 0  # re-planned: (GPU, expert) pairs the previous placement lacked

    def padded_log2phy(self) -> list[list[int]]:
        """log2phy as a rectangle padded with -1 (the shape a dispatch kernel indexes)."""
        width = max(self.replica_count, default=0)
        return [list(slots) + [-1] * (width - len(slots)) for slots in self.log2phy]


@dataclass(frozen=True)
class Placement:
    model: Model
    cluster: Cluster
    policy: str
    layers: tuple[LayerPlacement, ...]
    gpu_memory_used: tuple[float, ...]  # bytes per GPU

    @property
    def moe_layers(self) -> list[LayerPlacement]:
        return [layer for layer in self.layers if not layer.dense]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: dict) -> Placement:
        model = d["model"]
        tuples = {key: tuple(model.get(key, ())) for key in ("dense_layers", "expert_group")}
        return cls(
            model=Model(**{**model, **tuples}),
            cluster=Cluster(**d["cluster"]),
            policy=d["policy"],
            layers=tuple(_layer_from_dict(layer) for layer in d["layers"]),
            gpu_memory_used=tuple(d["gpu_memory_used"]),
        )

    @classmethod
    def from_json(cls, text: str) -> Placement:
        return cls.from_dict(json.loads(text))

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            f.write(self.to_json())

    @classmethod
    def load(cls, path: str) -> Placement:
        with open(path) as f:
            return cls.from_json(f.read())

    def summary(self) -> str:
        used = [b for b in self.gpu_memory_used if b > 0]
        moe = [layer.metrics for layer in self.moe_layers]
        worst = max(moe, key=lambda m: m.imbalance)
        slots = {len(layer.phy2log) for layer in self.moe_layers}
        lines = [
            f"policy {self.policy}: {len(self.layers)} layers ({len(moe)} MoE, "
            f"{self.model.experts_per_layer} experts, {sorted(slots)} slots per layer) on "
            f"{self.cluster.num_nodes} x {self.cluster.gpus_per_node} GPUs",
            f"GPUs used: {len(used)} of {self.cluster.num_gpus}",
            f"memory per used GPU: max {max(used) / 1e9:.3f} GB, mean "
            f"{sum(used) / len(used) / 1e9:.3f} GB, min {min(used) / 1e9:.3f} GB "
            f"(of {self.cluster.gpu_memory_bytes / 1e9:.1f} GB)",
            f"expected GPU load max/mean: worst layer {worst.imbalance:.3f} "
            f"(layer max {worst.max_gpu_load:.1f}), mean over layers "
            f"{sum(m.imbalance for m in moe) / len(moe):.3f}",
            f"max inter-node link load: {max(m.max_link_load for m in moe):.1f} tokens per NIC "
            f"per layer step; max NVLink load {max(m.max_nvlink_load for m in moe):.1f}",
        ]
        return "\n".join(lines)


def _layer_from_dict(d: dict) -> LayerPlacement:
    return LayerPlacement(
        layer=d["layer"],
        dense=d["dense"],
        phy2log=tuple(d["phy2log"]),
        log2phy=tuple(tuple(slots) for slots in d["log2phy"]),
        replica_count=tuple(d["replica_count"]),
        gpus=tuple(d["gpus"]),
        metrics=LayerMetrics(**d["metrics"]),
        moves=d.get("moves", 0),
    )


def plan(
    model: Model,
    cluster: Cluster,
    loads: Sequence[Sequence[float]] | None = None,
    coactivation: Sequence[Sequence[Sequence[int]]] | None = None,
    policy: str = "balanced",
    redundant_experts: int = -1,
    memory_reserve_bytes: float = 0.0,
    topology_aware: bool = True,
    previous: Sequence[LayerPlacement] | None = None,
    max_moves: int = -1,
    fault_domain: str = "none",
) -> Placement:
    """Plans every layer. ``loads[i]`` holds the token counts of the experts of the i-th MoE
    layer; ``coactivation[i]`` holds samples of the top-k experts one token chose (rows of
    ``model.top_k`` ids). Both are optional (uniform loads when absent).

    Re-planning: ``previous[i]`` is the current placement of the i-th MoE layer (its
    ``gpus`` and ``phy2log`` are read); the planner keeps its slots where they are and moves
    only what lowers the load, at most ``max_moves`` optional (GPU, expert) copies per layer
    beyond those a change of slot count forces (-1: no limit); each layer's ``moves`` counts
    the copies. A previous placement may lack experts (their GPUs failed): each gets a slot.

    ``fault_domain``: "gpu" or "node" spreads the replicas so that losing any one GPU (or
    node of ``cluster.gpus_per_node`` GPUs) loses no expert, where the slots allow (2E slots
    protect every expert; fewer protect the most loaded first); "none" (default) does not.
    Raises ValueError naming the bad field."""
    raw = _plan_raw(
        model,
        cluster,
        loads,
        coactivation,
        policy,
        redundant_experts,
        memory_reserve_bytes,
        topology_aware,
        previous,
        max_moves,
        fault_domain,
    )
    return Placement(
        model=model,
        cluster=cluster,
        policy=policy,
        layers=tuple(_layer_from_dict(layer) for layer in raw["layers"]),
        gpu_memory_used=tuple(raw["gpu_memory_used"]),
    )


def _plan_raw(
    model: Model,
    cluster: Cluster,
    loads: Sequence[Sequence[float]] | None,
    coactivation: Sequence[Sequence[Sequence[int]]] | None,
    policy: str,
    redundant_experts: int,
    memory_reserve_bytes: float,
    topology_aware: bool,
    previous: Sequence[LayerPlacement] | None,
    max_moves: int,
    fault_domain: str = "none",
) -> dict:
    """plan() up to the planner's plain dicts (see plan() for the arguments)."""
    if policy not in POLICIES:
        raise ValueError(f"policy: expected one of {POLICIES}, got {policy!r}")
    num_moe = len(model.moe_layers)
    stats: list[dict] = []
    given = {"loads": loads, "coactivation": coactivation, "previous": previous}
    if any(value is not None for value in given.values()):
        for name, value in given.items():
            if value is not None and len(value) != num_moe:
                raise ValueError(f"{name}: expected {num_moe} MoE layers, got {len(value)}")
        for i in range(num_moe):
            entry = {}
            if loads is not None:
                entry["expert_load"] = [float(x) for x in loads[i]]
            if coactivation is not None:
                entry["coactivation"] = [int(e) for row in coactivation[i] for e in row]
            if previous is not None:
                entry["previous_gpus"] = [int(g) for g in previous[i].gpus]
                entry["previous_phy2log"] = [int(e) for e in previous[i].phy2log]
            stats.append(entry)
    options = {
        "policy": policy,
        "redundant_experts": redundant_experts,
        "memory_reserve_bytes": memory_reserve_bytes,
        "topology_aware": topology_aware,
        "max_moves": max_moves,
        "fault_domain": fault_domain,
    }
    model_dict = {
        **dataclasses.asdict(model),
        "dense_layers": list(model.dense_layers),
        "expert_group": list(model.expert_group),
    }
    return _C.plan_placement(model_dict, dataclasses.asdict(cluster), stats, options)


def zipf_loads(
    num_layers: int, experts: int, skew: float, tokens: float = 1e5, seed: int = 0
) -> list[list[float]]:
    """Synthetic per-expert token counts: Zipf weights 1 / rank^skew, ranks shuffled per
    layer with a fixed seed, scaled to ``tokens`` (token, expert) pairs per layer."""
    import random

    rng = random.Random(seed)
    layers = []
    for _ in range(num_layers):
        weights = [1.0 / math.pow(rank + 1, skew) for rank in range(experts)]
        rng.shuffle(weights)
        total = sum(weights)
        layers.append([tokens * w / total for w in weights])
    return layers


def rebalance_experts(
    weight: torch.Tensor | Sequence[Sequence[float]],
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    coactivation: Sequence[torch.Tensor | Sequence[Sequence[int]]] | None = None,
    topk_group: int = 0,
    previous: torch.Tensor | None = None,
    max_moves: int = -1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSeek EPLB's ``rebalance_experts``, planned by moe_ep: the same arguments and the
    same results, so that a serving stack that calls EPLB can call this instead.

    Args:
        weight: [layers, experts], the load of every logical expert (any device, numbers >= 0).
        num_replicas: physical experts per layer, a multiple of num_gpus.
        num_groups: expert groups (experts e // (experts // num_groups)). As in EPLB, when
            the nodes divide the groups, every group and its replicas stay on one node.
        num_nodes: server nodes (the fast links are inside a node).
        num_gpus: GPUs, a multiple of num_nodes; GPU g holds physical experts
            g * num_replicas / num_gpus and the following ones.
    What EPLB cannot take (keyword only):
        coactivation: per layer, samples of the experts one token chose ([samples, top_k]
            ids): the planner then places experts chosen together on one node.
        topk_group: the groups a token may use (0: unknown, taken as limited); with
            topk_group == num_groups the groups limit nothing and are not kept on nodes.
        previous: the phy2log [layers, replicas] of an earlier call: re-plan from it,
            copying few expert weights (at most max_moves optional copies per layer, -1:
            no limit).

    Returns (phy2log, log2phy, logcnt), int64 on the CPU: phy2log [layers, num_replicas] the
    logical expert of every physical one; log2phy [layers, experts, X] the physical experts
    of every logical one, padded with -1 (X: the most replicas of any expert); logcnt
    [layers, experts] the replicas of every logical expert. Raises ValueError naming the bad
    argument."""
    weight = torch.as_tensor(weight).detach().cpu().double()
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(f"weight: expected [layers, experts], got shape {tuple(weight.shape)}")
    if not bool(torch.isfinite(weight).all()) or bool((weight < 0).any()):
        raise ValueError("weight: loads must be finite and >= 0")
    layers, experts = weight.shape
    for name, value in (("num_nodes", num_nodes), ("num_gpus", num_gpus)):
        if value < 1:
            raise ValueError(f"{name}: must be >= 1, got {value}")
    if num_gpus % num_nodes:
        raise ValueError(f"num_gpus: {num_gpus} is not a multiple of num_nodes {num_nodes}")
    if num_replicas % num_gpus or num_replicas < experts:
        raise ValueError(
            f"num_replicas: expected a multiple of num_gpus ({num_gpus}), at least the "
            f"{experts} experts, got {num_replicas}"
        )
    if num_groups < 1:
        raise ValueError(f"num_groups: must be >= 1, got {num_groups}")
    n_group = num_groups if experts % num_groups == 0 else 1
    if n_group == 1 and num_groups % num_nodes == 0 and num_groups > 1:
        raise ValueError(f"num_groups: {num_groups} groups do not divide {experts} experts")
    samples = None
    top_k = 1
    if coactivation is not None:
        samples = [torch.as_tensor(rows).reshape(len(rows), -1).tolist() for rows in coactivation]
        top_k = max((len(rows[0]) for rows in samples if rows), default=1)
    previous_layers = None
    if previous is not None:
        previous = torch.as_tensor(previous)
        if previous.dim() != 2 or previous.shape[0] != layers or previous.shape[1] % num_gpus:
            raise ValueError(
                f"previous: expected phy2log [{layers}, a multiple of {num_gpus}], got shape "
                f"{tuple(previous.shape)}"
            )
        per_gpu = previous.shape[1] // num_gpus
        gpus = tuple(p // per_gpu for p in range(previous.shape[1]))
        previous_layers = [
            LayerPlacement(i, False, tuple(row), (), (), gpus)
            for i, row in enumerate(previous.tolist())
        ]
    model = Model(layers, (), experts, top_k, 1.0, 0.0, n_group, topk_group)
    cluster = Cluster(num_nodes=num_nodes, gpus_per_node=num_gpus // num_nodes, gpu_memory_bytes=0)
    planned = _plan_raw(
        model,
        cluster,
        weight.tolist(),
        samples,
        "balanced",
        num_replicas - experts,
        0.0,
        True,
        previous_layers,
        max_moves,
    )["layers"]
    phy2log = torch.tensor([layer["phy2log"] for layer in planned], dtype=torch.int64)
    logcnt = torch.tensor([layer["replica_count"] for layer in planned], dtype=torch.int64)
    # log2phy[l, e, r]: the r-th physical expert (in slot order) of logical expert e.
    slot = torch.arange(num_replicas).expand(layers, -1)
    order = (phy2log * num_replicas + slot).argsort(dim=1)
    first = logcnt.cumsum(1) - logcnt
    rank = torch.arange(num_replicas) - first.gather(1, phy2log.gather(1, order))
    width = max(max(layer["replica_count"]) for layer in planned)
    log2phy = torch.full((layers, experts, width), -1, dtype=torch.int64)
    log2phy[torch.arange(layers).view(-1, 1), phy2log.gather(1, order), rank] = order
    return phy2log, log2phy, logcnt


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m moe_ep.plan",
        description="Plan expert placement, print a summary, write the plan as JSON.",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="seeds")
    p.add_argument("--gpus", type=int, help="total GPUs (nodes = gpus / gpus-per-node)")
    p.add_argument("--nodes", type=int)
    p.add_argument("--gpus-per-node", type=int)
    p.add_argument("--gpu-memory-gb", type=float, help="per GPU, 0 for no limit")
    p.add_argument("--reserve-gb", type=float, default=0.0, help="memory kept for the rest")
    p.add_argument("--experts", type=int, help="experts per MoE layer")
    p.add_argument("--top-k", type=int)
    p.add_argument("--n-group", type=int, help="expert groups of group-limited routing")
    p.add_argument("--topk-group", type=int, help="groups a token may use (0: unknown)")
    p.add_argument("--policy", choices=POLICIES, help="default: the preset's")
    p.add_argument("--redundant", type=int, default=-1, help="replicas per layer; -1: auto")
    p.add_argument("--no-topology", action="store_true", help="skip the node-level step")
    loads = p.add_mutually_exclusive_group()
    loads.add_argument("--loads", help="JSON file: per MoE layer, token counts per expert")
    loads.add_argument("--zipf", type=float, help="synthetic Zipf loads with this skew")
    p.add_argument("--coactivation", help="JSON file: per MoE layer, rows of top-k expert ids")
    p.add_argument("--previous", help="a plan JSON to re-plan from (moving few experts)")
    p.add_argument("--max-moves", type=int, default=-1, help="optional copies per layer; -1: any")
    p.add_argument(
        "--fault-domain",
        choices=("none", "gpu", "node"),
        default="none",
        help="spread replicas so that losing one GPU or node loses no expert",
    )
    p.add_argument("--out", default="placement.json", help="where to write the plan")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> Placement:
    args = _parse_args(argv)
    preset = PRESETS[args.preset]
    model, cluster = preset.model, preset.cluster
    if args.experts is not None:
        model = dataclasses.replace(model, experts_per_layer=args.experts)
    if args.n_group is not None:  # the preset's topk_group belongs to its groups
        model = dataclasses.replace(model, n_group=args.n_group, topk_group=0)
    for name in ("top_k", "topk_group"):
        if getattr(args, name) is not None:
            model = dataclasses.replace(model, **{name: getattr(args, name)})
    if args.gpus_per_node is not None:
        cluster = dataclasses.replace(cluster, gpus_per_node=args.gpus_per_node)
    if args.gpus is not None:
        if args.gpus % cluster.gpus_per_node:
            raise SystemExit(f"--gpus {args.gpus} is not a multiple of {cluster.gpus_per_node}")
        cluster = dataclasses.replace(cluster, num_nodes=args.gpus // cluster.gpus_per_node)
    if args.nodes is not None:
        cluster = dataclasses.replace(cluster, num_nodes=args.nodes)
    if args.gpu_memory_gb is not None:
        cluster = dataclasses.replace(cluster, gpu_memory_bytes=args.gpu_memory_gb * 1e9)
    loads = None
    if args.loads:
        with open(args.loads) as f:
            loads = json.load(f)
    elif args.zipf is not None:
        loads = zipf_loads(len(model.moe_layers), model.experts_per_layer, args.zipf)
    coactivation = None
    if args.coactivation:
        with open(args.coactivation) as f:
            coactivation = json.load(f)
    previous = Placement.load(args.previous).moe_layers if args.previous else None
    try:
        placement = plan(
            model,
            cluster,
            loads=loads,
            coactivation=coactivation,
            policy=args.policy or preset.policy,
            redundant_experts=args.redundant,
            memory_reserve_bytes=args.reserve_gb * 1e9,
            topology_aware=not args.no_topology,
            previous=previous,
            max_moves=args.max_moves,
            fault_domain=args.fault_domain,
        )
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    print(placement.summary())
    if previous is not None:
        moves = sum(layer.moves for layer in placement.moe_layers)
        print(f"re-planned from {args.previous}: {moves} expert copies to migrate")
    placement.save(args.out)
    print(f"wrote {args.out}")
    return placement


if __name__ == "__main__":
    main()

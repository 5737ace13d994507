"""DeepSeek EPLB's ``rebalance_experts``, re-implemented for the tests and the benchmark from
its published description (github.com/deepseek-ai/EPLB, README "The Algorithm"): the bar that
moe_ep's planner must never fall under. Plain Python on float64 loads; ties are broken the
way EPLB's code breaks them (the first maximum or minimum, heaviest-first order stable).

Hierarchical policy (the nodes divide the groups):
  1. pack the groups to nodes, the same number per node, balancing the nodes' loads;
  2. on every node, replicate its experts over the node's slots, each extra replica to the
     expert with the highest load per replica;
  3. on every node, pack its replicas to its GPUs, the same number per GPU, balancing loads.
Global policy (otherwise): the same with one group and one node.
A pack step: items heaviest first, each to the lightest pack that still has room; with one
item per pack, item i goes to pack i.
"""

from __future__ import annotations

import heapq

import torch


def _pack(weights: list[float], num_packs: int) -> list[tuple[int, int]]:
    """(pack, position in the pack) of every item; len(weights) / num_packs items per pack."""
    per_pack = len(weights) // num_packs
    if per_pack == 1:
        return [(i, 0) for i in range(len(weights))]
    open_packs = [(0.0, p) for p in range(num_packs)]  # (load, pack): lightest, lowest first
    pack_size = [0] * num_packs
    result = [(-1, -1)] * len(weights)
    for item in sorted(range(len(weights)), key=lambda i: -weights[i]):
        load, pack = heapq.heappop(open_packs)
        result[item] = (pack, pack_size[pack])
        pack_size[pack] += 1
        if pack_size[pack] < per_pack:
            heapq.heappush(open_packs, (load + weights[item], pack))
    return result


def _replicate(loads: list[float], slots: int) -> tuple[list[int], list[int], list[int]]:
    """(expert of every replica, replica rank of every replica, replicas per expert): the
    first len(loads) replicas are the experts themselves, the extras follow as created."""
    count = [1] * len(loads)
    expert = list(range(len(loads)))
    rank = [0] * len(loads)
    hottest = [(-load, e) for e, load in enumerate(loads)]  # highest load per replica first
    heapq.heapify(hottest)
    for _ in range(slots - len(loads)):
        _, best = heapq.heappop(hottest)
        expert.append(best)
        rank.append(count[best])
        count[best] += 1
        heapq.heappush(hottest, (-loads[best] / count[best], best))
    return expert, rank, count


def _layer(
    loads: list[float], num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[list[int], list[int]]:
    """(logical expert, replica rank) of every physical expert of one layer."""
    experts = len(loads)
    group_size = experts // num_groups
    groups = [list(range(g * group_size, (g + 1) * group_size)) for g in range(num_groups)]
    group_place = _pack([sum(loads[e] for e in members) for members in groups], num_nodes)
    groups_per_node = num_groups // num_nodes
    # The experts of a node: its groups in the order they came, experts by id within one.
    node_experts = [[0] * (groups_per_node * group_size) for _ in range(num_nodes)]
    for g, (node, position) in enumerate(group_place):
        for i, e in enumerate(groups[g]):
            node_experts[node][position * group_size + i] = e
    slots_per_node = num_replicas // num_nodes
    gpus_per_node = num_gpus // num_nodes
    per_gpu = num_replicas // num_gpus
    phy_expert = [-1] * num_replicas
    phy_rank = [-1] * num_replicas
    for node, members in enumerate(node_experts):
        local_loads = [loads[e] for e in members]
        expert, rank, count = _replicate(local_loads, slots_per_node)
        weights = [local_loads[e] / count[e] for e in expert]
        for replica, (gpu, position) in enumerate(_pack(weights, gpus_per_node)):
            phy = node * slots_per_node + gpu * per_gpu + position
            phy_expert[phy] = members[expert[replica]]
            phy_rank[phy] = rank[replica]
    return phy_expert, phy_rank


def rebalance_experts(
    weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(phy2log [layers, replicas], log2phy [layers, experts, X] padded with -1,
    logcnt [layers, experts]), int64, as EPLB returns them."""
    weight = torch.as_tensor(weight).double()
    layers, experts = weight.shape
    if num_groups % num_nodes != 0:
        num_groups, num_nodes = 1, 1
    planned = [
        _layer(row, num_replicas, num_groups, num_nodes, num_gpus) for row in weight.tolist()
    ]
    counts = [[0] * experts for _ in range(layers)]
    for layer, (expert, _) in enumerate(planned):
        for e in expert:
            counts[layer][e] += 1
    width = max(max(row) for row in counts)
    slots = [[[-1] * width for _ in range(experts)] for _ in range(layers)]
    for layer, (expert, rank) in enumerate(planned):
        for phy, (e, r) in enumerate(zip(expert, rank, strict=True)):
            slots[layer][e][r] = phy
    phy2log = torch.tensor([expert for expert, _ in planned], dtype=torch.int64)
    return phy2log, torch.tensor(slots, dtype=torch.int64), torch.tensor(counts, dtype=torch.int64)


def gpu_loads(phy2log: torch.Tensor, weight: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """float64 [layers, num_gpus]: every GPU's load, an expert's load split evenly over its
    replicas; GPU g holds physical experts g * per_gpu .. (g + 1) * per_gpu - 1."""
    weight = torch.as_tensor(weight).double()
    count = torch.zeros_like(weight).scatter_add_(1, phy2log, torch.ones_like(phy2log).double())
    per_replica = (weight / count).gather(1, phy2log)
    return per_replica.view(phy2log.shape[0], num_gpus, -1).sum(-1)

"""Bad input, everywhere: every row of the README's table "Bad input" (op, argument, what is
wrong, what the error says) is a case here, and every case is a row there. Each case calls the
op (every op its row names) with that one argument wrong and checks the RuntimeError's message.
The expert-parallel ops run in a one-rank Gloo group of this process (conftest's group_name); the rows about ranks that
disagree need two ranks and are checked in tests/ep_worker.py (run_misuse), named here so that
the table and the tests cannot drift apart."""
# ruff: noqa: E501  (the table of cases reads best one case per line)

from __future__ import annotations

import os
import re

import pytest
import torch
from conftest import CUDA_SKIP

from moe_ep import dispatcher
from moe_ep.placement import ExpertPlacement

ops = torch.ops.moe_ep
README = os.path.join(os.path.dirname(__file__), "..", "README.md")
EP_WORKER = os.path.join(os.path.dirname(__file__), "ep_worker.py")

T, H, F, E, K = 6, 8, 4, 4, 2
DISPATCHES = "dispatch, dispatch_start, dispatch_capacity(_start), moe_forward"


def good():
    """Valid arguments of every op (one rank, E experts on it), fresh each call."""
    placement = ExpertPlacement.contiguous(E, 1)
    return dict(
        logits=torch.randn(T, E),
        x=torch.randn(T, H),
        ids=torch.stack([torch.randperm(E)[:K] for _ in range(T)]).int(),
        weights=torch.rand(T, K),
        rank=placement.expert_rank.clone(),
        local=placement.expert_local.clone(),
        w13=torch.randn(E, 2 * F, H),
        w2=torch.randn(E, H, F),
        offsets=torch.tensor([0, 2, 3, 3, T]),
    )


def route(**change):
    a = dict(logits=good()["logits"], top_k=K, score_func="softmax", bias=None, n_group=1)
    a.update(topk_group=1, renormalize=True, scaling=1.0)
    a.update(change)
    return [lambda: ops.route(*a.values())]


def permute(**change):
    g = good()
    a = dict(hidden=g["x"], topk_ids=g["ids"], num_experts=E, check_ids=True)
    a.update(change)
    return [lambda: ops.permute(*a.values())]


def unpermute(**change):
    a = dict(expert_out=torch.randn(T * K, H), row_of=torch.arange(T * K).int().view(T, K))
    a.update(topk_weights=torch.rand(T, K), check_rows=True)
    a.update(change)
    return [lambda: ops.unpermute(*a.values())]


def expert_ffn(**change):
    g = good()
    a = dict(x=g["x"], expert_offsets=g["offsets"], w13=g["w13"], w2=g["w2"])
    a.update(activation="silu", check_offsets=True)
    a.update(change)
    return [lambda: ops.expert_ffn(*a.values())]


def dispatch_layout(**change):
    g = good()
    a = dict(topk_ids=g["ids"], expert_rank=g["rank"], expert_local=g["local"], world_size=1)
    a.update(num_local_experts=E)
    a.update(change)
    return [lambda: ops.dispatch_layout(*a.values())]


def dispatches(group, **change):
    """The same bad argument given to each op of DISPATCHES (one call each); a fixed-capacity
    dispatch is finished and its status checked, where misuse in the data is reported."""
    g = good()
    a = dict(x=g["x"], topk_ids=g["ids"], topk_weights=g["weights"], expert_rank=g["rank"])
    a.update(expert_local=g["local"], num_local_experts=E)
    a.update({k: v for k, v in change.items() if k in a})
    local = max(1, a["num_local_experts"])  # moe_forward's weights: one per local expert
    extra = dict(num_chunks=1, capacity=T, w13=g["w13"][:local], w2=g["w2"][:local])
    extra.update(group_name=group)
    extra.update({k: v for k, v in change.items() if k in extra})
    chunks, capacity, name = extra["num_chunks"], extra["capacity"], extra["group_name"]

    def fixed_capacity():
        status = ops.dispatch_capacity(*a.values(), capacity, name)[5]
        dispatcher.check_status([status], capacity)

    def fixed_capacity_halves():
        x_recv, meta_recv, _ = ops.dispatch_capacity_start(*a.values(), capacity, name)
        local = a["num_local_experts"]
        status = ops.dispatch_capacity_finish(x_recv, meta_recv, local, capacity)[4]
        dispatcher.check_status([status], capacity)

    calls = [
        lambda: ops.dispatch(*a.values(), name),
        lambda: ops.dispatch_start(*a.values(), chunks, name),
        fixed_capacity,
        fixed_capacity_halves,
        lambda: ops.moe_forward(*a.values(), extra["w13"], extra["w2"], "silu", chunks, name),
    ]
    if "num_chunks" in change:  # only the chunked ops take it
        return [calls[1], calls[4]]
    if "capacity" in change:
        return calls[2:4]
    if "w13" in change or "w2" in change:
        return [calls[4]]
    return calls


def waited(*tensors):
    """Tensors of a started collective, waited for here: a case that replaces one of them
    must not leave its transfer unwaited."""
    return [torch.ops._c10d_functional.wait_tensor(t) for t in tensors]


def exact_started(group_name):
    g = good()
    flat = ops.dispatch_start(
        g["x"], g["ids"], g["weights"], g["rank"], g["local"], E, 1, group_name
    )
    flat[:2] = waited(*flat[:2])
    return dict(
        zip(
            ("x_recv", "meta_recv", "recv_counts", "send_counts", "token_slot", "entries"),
            flat,
            strict=True,
        )
    )


def dispatch_finish(group_name, **change):
    s = exact_started(group_name)
    a = dict(x_recv=s["x_recv"], meta_recv=s["meta_recv"], recv_entries=s["entries"])
    a.update(num_local_experts=E)
    a.update(change)
    return [lambda: ops.dispatch_finish(*a.values())]


def dispatch_capacity_finish(group_name, **change):
    g = good()
    x_recv, meta_recv = waited(
        *ops.dispatch_capacity_start(
            g["x"], g["ids"], g["weights"], g["rank"], g["local"], E, T, group_name
        )[:2]
    )
    a = dict(x_recv=x_recv, meta_recv=meta_recv, num_local_experts=E, capacity=T)
    a.update(change)
    return [lambda: ops.dispatch_capacity_finish(*a.values())]


def combines(group, **change):
    """combine and combine_start, the same bad argument to each."""
    g = good()
    d = ops.dispatch(g["x"], g["ids"], g["weights"], g["rank"], g["local"], E, group)
    a = dict(y=d[0], recv_row_of=d[2], recv_weights=d[3], recv_counts=d[4], send_counts=d[5])
    a.update({k: v for k, v in change.items() if k in a})
    name = change.get("group_name", group)
    return [
        lambda: ops.combine(*a.values(), d[6], name),
        lambda: ops.combine_start(*a.values(), name),
    ]


def combine_finish(group_name, **change):
    g = good()
    d = ops.dispatch(g["x"], g["ids"], g["weights"], g["rank"], g["local"], E, group_name)
    (returned,) = waited(ops.combine_start(d[0], d[2], d[3], d[4], d[5], group_name))
    a = dict(returned=returned, token_slot=d[6])
    a.update(change)
    return [lambda: ops.combine_finish(*a.values())]


def cuda(t):
    return t.cuda()


# (op(s), argument, what is wrong, what the error says, the calls); a call builder that takes
# an argument gets the group's name.
# fmt: off
CASES = [
    ("route", "logits", "not 2-D", "argument 'logits' must be 2-D", lambda: route(logits=torch.randn(E))),
    ("route", "logits", "not float32/16, bfloat16", "argument 'logits' must be float32, float16 or bfloat16", lambda: route(logits=torch.zeros(T, E, dtype=torch.long))),
    ("route", "logits", "no expert column", "argument 'logits' must have at least one expert column", lambda: route(logits=torch.randn(T, 0))),
    ("route", "top_k", "outside [1, 16]", "argument 'top_k' must be in [1, 16]", lambda: route(top_k=17)),
    ("route", "top_k", "above the experts", "argument 'top_k' (5) exceeds the number of experts (4)", lambda: route(top_k=5)),
    ("route", "score_func", "not softmax or sigmoid", "argument 'score_func' must be \"softmax\" or \"sigmoid\"", lambda: route(score_func="relu")),
    ("route", "bias", "not 1-D", "argument 'bias' must be 1-D", lambda: route(bias=torch.zeros(1, E))),
    ("route", "bias", "not float32", "argument 'bias' must be Float", lambda: route(bias=torch.zeros(E, dtype=torch.float64))),
    ("route", "bias", "not one per expert", "argument 'bias' must have size 4 in dimension 0", lambda: route(bias=torch.zeros(E + 1))),
    ("route", "bias", "on another device than logits", "argument 'bias' is on", lambda: route(logits=cuda(good()["logits"]), bias=torch.zeros(E))),
    ("route", "n_group", "outside [1, 64]", "argument 'n_group' must be in [1, 64]", lambda: route(n_group=65)),
    ("route", "n_group", "does not divide the experts", "argument 'n_group' (3) must divide the number of experts (4)", lambda: route(n_group=3)),
    ("route", "topk_group", "outside [1, n_group]", "argument 'topk_group' must be in [1, n_group=2]", lambda: route(n_group=2, topk_group=3)),
    ("route", "top_k", "above the chosen groups' experts", "argument 'top_k' (2) exceeds the experts of the topk_group=1 chosen groups (1)", lambda: route(logits=torch.randn(T, 8), n_group=8, topk_group=1)),
    ("permute", "hidden", "not 2-D", "argument 'hidden' must be 2-D", lambda: permute(hidden=torch.randn(T * H))),
    ("permute", "hidden", "not float32/16, bfloat16", "argument 'hidden' must be float32, float16 or bfloat16", lambda: permute(hidden=torch.zeros(T, H, dtype=torch.int32))),
    ("permute", "topk_ids", "not 2-D", "argument 'topk_ids' must be 2-D", lambda: permute(topk_ids=good()["ids"].flatten())),
    ("permute", "topk_ids", "not int32/int64", "argument 'topk_ids' must be int32 or int64", lambda: permute(topk_ids=good()["ids"].float())),
    ("permute", "topk_ids", "not one row per token", "argument 'topk_ids' must have size 6 in dimension 0", lambda: permute(topk_ids=good()["ids"][:3])),
    ("permute", "topk_ids", "on another device than hidden", "argument 'topk_ids' is on", lambda: permute(hidden=cuda(good()["x"]))),
    ("permute", "num_experts", "below 1", "argument 'num_experts' must be >= 1", lambda: permute(num_experts=0)),
    ("permute", "topk_ids", "an id outside [0, num_experts) (check_ids)", "argument 'topk_ids' holds 1 expert id(s) outside [0, num_experts=4)", lambda: permute(topk_ids=torch.tensor([[0, 1]] * (T - 1) + [[0, 4]]).int())),
    ("unpermute", "expert_out", "not 2-D", "argument 'expert_out' must be 2-D", lambda: unpermute(expert_out=torch.randn(T * K))),
    ("unpermute", "expert_out", "not float32/16, bfloat16", "argument 'expert_out' must be float32, float16 or bfloat16", lambda: unpermute(expert_out=torch.zeros(T * K, H, dtype=torch.long))),
    ("unpermute", "row_of", "not 2-D", "argument 'row_of' must be 2-D", lambda: unpermute(row_of=torch.arange(T * K).int())),
    ("unpermute", "row_of", "not int32", "argument 'row_of' must be Int", lambda: unpermute(row_of=torch.arange(T * K).view(T, K))),
    ("unpermute", "topk_weights", "not 2-D", "argument 'topk_weights' must be 2-D", lambda: unpermute(topk_weights=torch.rand(T * K))),
    ("unpermute", "topk_weights", "not float32/16, bfloat16", "argument 'topk_weights' must be float32, float16 or bfloat16", lambda: unpermute(topk_weights=torch.ones(T, K, dtype=torch.long))),
    ("unpermute", "topk_weights", "not the shape of row_of", "argument 'topk_weights' must have the shape of 'row_of'", lambda: unpermute(topk_weights=torch.rand(T, K + 1))),
    ("unpermute", "row_of", "on another device than expert_out", "argument 'row_of' is on", lambda: unpermute(expert_out=cuda(torch.randn(T * K, H)))),
    ("unpermute", "row_of", "a row outside [-1, rows) (check_rows)", "argument 'row_of' must hold rows in [0, 12) or -1", lambda: unpermute(row_of=torch.full((T, K), T * K).int())),
    ("expert_ffn", "x", "not 2-D", "argument 'x' must be 2-D", lambda: expert_ffn(x=torch.randn(T * H))),
    ("expert_ffn", "x", "not float32/16, bfloat16", "argument 'x' must be float32, float16 or bfloat16", lambda: expert_ffn(x=torch.zeros(T, H, dtype=torch.long))),
    ("expert_ffn", "w13", "not 3-D", "argument 'w13' must be 3-D", lambda: expert_ffn(w13=torch.randn(2 * F, H))),
    ("expert_ffn", "w2", "not 3-D", "argument 'w2' must be 3-D", lambda: expert_ffn(w2=torch.randn(H, F))),
    ("expert_ffn", "x", "not w13's dtype", "argument 'x' has dtype Float but the expert weights ('w13') are BFloat16", lambda: expert_ffn(w13=good()["w13"].bfloat16())),
    ("expert_ffn", "w2", "not x's dtype", "argument 'w2' must be Float, got BFloat16", lambda: expert_ffn(w2=good()["w2"].bfloat16())),
    ("expert_ffn", "w13", "on another device than x", "argument 'w13' is on", lambda: expert_ffn(w13=cuda(good()["w13"]))),
    ("expert_ffn", "w13", "an odd dimension 1 (not [E, 2F, H])", "argument 'w13' must stack gate and up projections", lambda: expert_ffn(w13=torch.randn(E, 2 * F + 1, H))),
    ("expert_ffn", "x", "hidden size not w13's dimension 2", "argument 'x' has hidden size 8 but the expert weights ('w13', [E, 2F, H]) take 9", lambda: expert_ffn(w13=torch.randn(E, 2 * F, H + 1))),
    ("expert_ffn", "w2", "not one per expert of w13", "argument 'w2' must have size 4 in dimension 0", lambda: expert_ffn(w2=torch.randn(E + 1, H, F))),
    ("expert_ffn", "w2", "dimension 1 not the hidden size", "argument 'w2' must have size 8 in dimension 1", lambda: expert_ffn(w2=torch.randn(E, H + 1, F))),
    ("expert_ffn", "w2", "dimension 2 not the FFN size", "argument 'w2' must have size 4 in dimension 2", lambda: expert_ffn(w2=torch.randn(E, H, F + 1))),
    ("expert_ffn", "expert_offsets", "not 1-D", "argument 'expert_offsets' must be 1-D", lambda: expert_ffn(expert_offsets=good()["offsets"].view(1, -1))),
    ("expert_ffn", "expert_offsets", "not int64", "argument 'expert_offsets' must be Long", lambda: expert_ffn(expert_offsets=good()["offsets"].int())),
    ("expert_ffn", "expert_offsets", "not E + 1 values", "argument 'expert_offsets' must have size 5 in dimension 0", lambda: expert_ffn(expert_offsets=torch.tensor([0, T]))),
    ("expert_ffn", "activation", "not silu or gelu", "argument 'activation' must be \"silu\" or \"gelu\"", lambda: expert_ffn(activation="relu")),
    ("expert_ffn", "expert_offsets", "not starting at 0", "argument 'expert_offsets' must start at 0", lambda: expert_ffn(expert_offsets=torch.tensor([1, 2, 3, 3, T]))),
    ("expert_ffn", "expert_offsets", "ending past x's rows", "argument 'expert_offsets' must end at most at the number of rows of 'x' (6)", lambda: expert_ffn(expert_offsets=torch.tensor([0, 2, 3, 3, T + 1]))),
    ("expert_ffn", "expert_offsets", "decreasing", "argument 'expert_offsets' must be non-decreasing", lambda: expert_ffn(expert_offsets=torch.tensor([0, 3, 2, 3, T]))),
    ("dispatch_layout", "topk_ids", "not 2-D", "argument 'topk_ids' must be 2-D", lambda: dispatch_layout(topk_ids=good()["ids"].flatten())),
    ("dispatch_layout", "topk_ids", "not int32/int64", "argument 'topk_ids' must be int32 or int64", lambda: dispatch_layout(topk_ids=good()["ids"].float())),
    ("dispatch_layout", "world_size", "below 1", "argument 'world_size' must be >= 1", lambda: dispatch_layout(world_size=0)),
    ("dispatch_layout", "expert_rank", "a rank outside [0, world_size)", "argument 'expert_rank' (the expert map) holds a rank outside the group", lambda: dispatch_layout(expert_rank=good()["rank"] + 1)),
    ("dispatch_layout", "expert_local", "a local id outside [0, num_local_experts)", "argument 'expert_local' (the expert map) holds a local expert id outside", lambda: dispatch_layout(expert_local=good()["local"] + E)),
    ("dispatch_layout", "topk_ids", "an id outside the map", "argument 'topk_ids' holds an expert id outside [0, 4)", lambda: dispatch_layout(topk_ids=good()["ids"] + E)),
    (DISPATCHES, "x", "not 2-D", "argument 'x' must be 2-D", lambda g: dispatches(g, x=torch.randn(T * H))),
    (DISPATCHES, "x", "not float32/16, bfloat16", "argument 'x' must be float32, float16 or bfloat16", lambda g: dispatches(g, x=torch.zeros(T, H, dtype=torch.long))),
    (DISPATCHES, "topk_ids", "not 2-D", "argument 'topk_ids' must be 2-D", lambda g: dispatches(g, topk_ids=good()["ids"].flatten())),
    (DISPATCHES, "topk_ids", "not int32/int64", "argument 'topk_ids' must be int32 or int64", lambda g: dispatches(g, topk_ids=good()["ids"].float())),
    (DISPATCHES, "topk_ids", "not one row per token", "argument 'topk_ids' must have size 6 in dimension 0", lambda g: dispatches(g, topk_ids=good()["ids"][:3])),
    (DISPATCHES, "topk_ids", "more than 16 choices", "argument 'topk_ids' must have 1 to 16 choices per token", lambda g: dispatches(g, topk_ids=torch.zeros(T, 17, dtype=torch.int32), topk_weights=torch.ones(T, 17))),
    (DISPATCHES, "topk_weights", "not 2-D", "argument 'topk_weights' must be 2-D", lambda g: dispatches(g, topk_weights=torch.rand(T * K))),
    (DISPATCHES, "topk_weights", "not float32/16, bfloat16", "argument 'topk_weights' must be float32, float16 or bfloat16", lambda g: dispatches(g, topk_weights=torch.ones(T, K, dtype=torch.long))),
    (DISPATCHES, "topk_weights", "not the shape of topk_ids", "argument 'topk_weights' must have the shape of 'topk_ids'", lambda g: dispatches(g, topk_weights=torch.rand(T, K + 1))),
    (DISPATCHES, "expert_rank", "not 1-D", "argument 'expert_rank' must be 1-D", lambda g: dispatches(g, expert_rank=good()["rank"].view(1, -1))),
    (DISPATCHES, "expert_rank", "not int32", "argument 'expert_rank' must be Int", lambda g: dispatches(g, expert_rank=good()["rank"].long())),
    (DISPATCHES, "expert_rank", "empty", "argument 'expert_rank' must map at least one expert", lambda g: dispatches(g, expert_rank=torch.zeros(0, dtype=torch.int32), expert_local=torch.zeros(0, dtype=torch.int32))),
    (DISPATCHES, "expert_local", "not 1-D", "argument 'expert_local' must be 1-D", lambda g: dispatches(g, expert_local=good()["local"].view(1, -1))),
    (DISPATCHES, "expert_local", "not int32", "argument 'expert_local' must be Int", lambda g: dispatches(g, expert_local=good()["local"].long())),
    (DISPATCHES, "expert_local", "not one per slot of expert_rank", "argument 'expert_local' must have size 4 in dimension 0", lambda g: dispatches(g, expert_local=good()["local"][:2])),
    (DISPATCHES, "num_local_experts", "below 1", "argument 'num_local_experts' must be >= 1", lambda g: dispatches(g, num_local_experts=0)),
    (DISPATCHES, "group_name", "no process group of that name", "argument 'group_name': no process group is registered as \"nope\"", lambda g: dispatches(g, group_name="nope")),
    (DISPATCHES, "expert_rank", "a rank outside the group", "argument 'expert_rank' (the expert map) holds a rank outside the group", lambda g: dispatches(g, expert_rank=good()["rank"] + 1)),
    (DISPATCHES, "expert_local", "a local id outside [0, num_local_experts)", "argument 'expert_local' (the expert map) holds a local expert id outside", lambda g: dispatches(g, expert_local=good()["local"] + E)),
    (DISPATCHES, "topk_ids", "an id outside the map", "argument 'topk_ids' holds an expert id outside", lambda g: dispatches(g, topk_ids=good()["ids"] + E)),
    (DISPATCHES, "topk_ids", "more choices on one rank than num_local_experts", "argument 'topk_ids' gives a token more choices on one rank than 'num_local_experts' allows", lambda g: dispatches(g, topk_ids=torch.tensor([[0, 1]] * T, dtype=torch.int32), num_local_experts=1, expert_local=torch.zeros(E, dtype=torch.int32))),
    ("dispatch_start, moe_forward", "num_chunks", "outside [1, 16]", "argument 'num_chunks' must be in [1, 16]", lambda g: dispatches(g, num_chunks=17)),
    ("dispatch_capacity(_start)", "capacity", "below 1", "argument 'capacity' must be >= 1", lambda g: dispatches(g, capacity=0)),
    ("moe_forward", "w13", "not 3-D", "argument 'w13' must be 3-D", lambda g: dispatches(g, w13=torch.randn(2 * F, H))),
    ("moe_forward", "w13", "more experts than num_local_experts", "argument 'w13' holds 5 experts, more than num_local_experts=4", lambda g: dispatches(g, w13=torch.randn(E + 1, 2 * F, H))),
    ("moe_forward", "w2", "not matching w13 (expert_ffn's checks)", "argument 'w2' must have size 4 in dimension 2", lambda g: dispatches(g, w2=torch.randn(E, H, F + 1))),
    ("dispatch_finish", "x_recv", "not 2-D", "argument 'x_recv' must be 2-D", lambda g: dispatch_finish(g, x_recv=torch.randn(T))),
    ("dispatch_finish", "meta_recv", "not int32", "argument 'meta_recv' must be Int", lambda g: dispatch_finish(g, meta_recv=exact_started(g)["meta_recv"].long())),
    ("dispatch_finish", "meta_recv", "not one row per row of x_recv", "argument 'meta_recv' must have size", lambda g: dispatch_finish(g, meta_recv=torch.zeros(T + 1, 2 * K, dtype=torch.int32))),
    ("dispatch_finish", "meta_recv", "an odd column count", "argument 'meta_recv' must have 2W columns", lambda g: dispatch_finish(g, meta_recv=exact_started(g)["meta_recv"][:, :3])),
    ("dispatch_finish", "recv_entries", "not the CPU int64 [1] count dispatch_start returned", "argument 'recv_entries' must be the CPU int64 [1] tensor", lambda g: dispatch_finish(g, recv_entries=torch.tensor([1, 2]))),
    ("dispatch_finish", "recv_entries", "below the entries that arrived (CPU)", "argument 'recv_entries' (1) is below the entries that arrived", lambda g: dispatch_finish(g, recv_entries=torch.tensor([1]))),
    ("dispatch_finish", "num_local_experts", "below 1", "argument 'num_local_experts' must be >= 1", lambda g: dispatch_finish(g, num_local_experts=0)),
    ("dispatch_capacity_finish", "meta_recv", "not 2W + 4 columns", "argument 'meta_recv' must have 2W + 4 columns", lambda g: dispatch_capacity_finish(g, meta_recv=torch.zeros(T, 5, dtype=torch.int32))),
    ("dispatch_capacity_finish", "capacity", "not the dispatch's capacity", "argument 'capacity' must be the capacity of the dispatch", lambda g: dispatch_capacity_finish(g, capacity=T + 1)),
    ("combine, combine_start", "y", "not 2-D", "argument 'y' must be 2-D", lambda g: combines(g, y=torch.randn(T))),
    ("combine, combine_start", "y", "not float32/16, bfloat16", "argument 'y' must be float32, float16 or bfloat16", lambda g: combines(g, y=torch.zeros(T, H, dtype=torch.long))),
    ("combine, combine_start", "recv_row_of", "not int32", "argument 'recv_row_of' must be Int", lambda g: combines(g, recv_row_of=torch.zeros(T, 1, dtype=torch.long))),
    ("combine, combine_start", "recv_weights", "not the shape of recv_row_of", "argument 'recv_weights' must have the shape of 'recv_row_of'", lambda g: combines(g, recv_weights=torch.rand(T + 1, 9))),
    ("combine, combine_start", "recv_counts", "not one CPU int64 count per rank", "argument 'recv_counts' must be a CPU tensor with one count per rank (1)", lambda g: combines(g, recv_counts=torch.tensor([T, 0]))),
    ("combine, combine_start", "recv_counts", "not summing to the received rows", "argument 'recv_counts' must sum to the received rows", lambda g: combines(g, recv_counts=torch.tensor([T + 1]))),
    ("combine, combine_start", "send_counts", "not int64", "argument 'send_counts' must be Long", lambda g: combines(g, send_counts=torch.tensor([T], dtype=torch.int32))),
    ("combine, combine_start", "group_name", "no process group of that name", "argument 'group_name': no process group is registered as \"nope\"", lambda g: combines(g, group_name="nope")),
    ("combine_finish", "returned", "not 2-D", "argument 'returned' must be 2-D", lambda g: combine_finish(g, returned=torch.randn(T))),
    ("combine_finish", "token_slot", "not int32", "argument 'token_slot' must be Int", lambda g: combine_finish(g, token_slot=torch.zeros(T, K, dtype=torch.long))),
]
# fmt: on

# Rows about ranks that disagree: two ranks at least, checked by expect_error(needle, ...) in
# tests/ep_worker.py run_misuse with these needles.
MULTI_RANK = [
    (DISPATCHES, "x", "another hidden size on one rank", "hidden size"),
    (DISPATCHES, "x", "another dtype on one rank", "dtype"),
    (DISPATCHES, "topk_ids", "another top-k on one rank", "choices per token"),
    (DISPATCHES, "expert_rank, expert_local", "another expert map on one rank", "expert map"),
]


def readme_rows() -> list[tuple[str, str, str, str]]:
    """(op, argument, what is wrong, what the error says) of the README's table."""
    text = open(README).read()
    section = text.split("## Bad input", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[3].startswith("`"):
            rows.append((*(c.strip("`") for c in cells[:3]), cells[3].strip("`")))
    return rows


def test_the_readme_table_lists_every_case_and_nothing_else():
    listed = set(readme_rows())
    cases = {row[:4] for row in CASES} | set(MULTI_RANK)
    assert listed - cases == set(), "README rows without a test"
    assert cases - listed == set(), "tested checks missing from the README"


def test_multi_rank_rows_are_checked_by_ep_worker():
    source = open(EP_WORKER).read()
    for _ops, _argument, _what, needle in MULTI_RANK:
        assert re.search(rf'expect_error\(\s*"{re.escape(needle)}"', source), needle


def needs_cuda(what: str) -> bool:
    return "another device" in what


@pytest.mark.parametrize(
    "op,argument,what,needle,calls",
    [
        pytest.param(
            *case, marks=[CUDA_SKIP] if needs_cuda(case[2]) else [], id=f"{case[0]}:{case[2]}"
        )
        for case in CASES
    ],
)
def test_bad_argument_raises_naming_it(group_name, op, argument, what, needle, calls):
    thunks = calls(group_name) if calls.__code__.co_argcount else calls()
    assert len(thunks) >= 1
    for number, thunk in enumerate(thunks):
        with pytest.raises(RuntimeError) as error:
            thunk()
        assert needle in str(error.value), (op, number, str(error.value))

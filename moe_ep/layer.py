"""MoELayer: route -> permute -> grouped expert FFN -> unpermute, over torch.ops.moe_ep."""

from __future__ import annotations

import itertools
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moe_ep import deadline as deadlines
from moe_ep import dispatcher, ops, pipeline
from moe_ep.pipeline import OverlapFn
from moe_ep.placement import ExpertPlacement, map_to_slots


class MoELayer(nn.Module):
    """A routed Mixture-of-Experts FFN, on one rank or expert-parallel over a process group.

    Args:
        hidden: H, the token dimension.
        ffn_hidden: F, each expert's FFN hidden size (the gated FFN has 3 matrices).
        num_experts: E routed experts.
        top_k: experts per token.
        score_func, n_group, topk_group, group_score, renormalize, scaling: see
            moe_ep.ops.route. DeepSeek-V3 routes with score_func="sigmoid",
            group_score="top2_sum" (a group scores its two best experts, bias or not).
        expert_bias: keep a float32 [E] selection bias buffer (DeepSeek-V3's
            e_score_correction_bias); it changes which experts are chosen, not the weights.
        router_dtype: dtype of the router weight and of the logits' matmul (the scores are
            float32 whatever it is). float32 by default, as DeepSeek-V3 computes it; Mixtral
            and Qwen-MoE compute their logits in the model's dtype (bfloat16, say): pass that
            dtype to choose the same experts as they do.
        activation: "silu" or "gelu" (gated).
        dtype, device: of the expert weights.
        group: the expert-parallel process group; None keeps every expert on this rank.
        placement: which rank hosts which expert slot (default: contiguous blocks, one slot
            per expert); identical on every rank. An expert may have several slots (replicas,
            see ExpertPlacement.from_plan): each token goes to one of them (map_to_slots).
            This rank holds only its local slots' weights (w13, w2); the router weight and
            bias are replicated. Load them with load_full_weights; moe_ep.LoadBalancer
            changes the placement at run time (set_placement).
        dispatch_mode: "exact" (the counts travel in a header first, exact-size all-to-all,
            one host read per layer whatever the chunk count: throughput, prefill) or
            "capacity" (fixed buffers of `capacity` rows per rank, nothing read on the host:
            latency, decode, CUDA graphs; the experts compute only the rows that arrived).
        capacity: rows each rank sends to each rank in "capacity" mode; the largest token
            count of any rank guarantees no overflow. With num_chunks chunks each chunk gets
            ceil(capacity / num_chunks) rows, so chunking does not multiply the buffers.
        on_overflow: in "capacity" mode, what to do with the step's status (pairs over
            capacity, misuse, ranks that disagree), the same on every rank:
            "report" (default) reads nothing during the step: the statuses stay in
            dispatch_status, for check_dispatch_status() (or moe_ep.layer.check_dispatch_status
            for a whole model, one read) after the step or a CUDA graph replay; a status left
            unchecked is checked at the start of the layer's next forward, so an error is
            never lost. "raise" checks at the end of the forward (one host read) and raises
            DispatchOverflow on every rank; "fallback" checks there too and reruns the step
            with the exact-size dispatch on overflow.
        num_chunks: micro-batches of the expert-parallel pipeline (1 = no overlap): the
            dispatch of one chunk and the combine of another travel while a third computes.
            Every rank must use the same value. Default: 1 for CPU tensors (measured with
            bench_overlap.py on Gloo: chunking only added per-chunk costs, see
            benchmarks/RESULTS.md), 2 for CUDA tensors (NCCL's own stream can carry one chunk
            while another computes; not yet measured).
        dispatch_dtype: the dtype the tokens travel in to the experts' ranks: the layer's
            dtype (default), or torch.float8_e4m3fn: FP8 with one float32 scale per 128
            channels of a token (about half the bytes; the experts get the tokens back in the
            layer's dtype, and combine stays in it; accuracy cost in docs/dispatch.md, "FP8
            dispatch"). Every rank must use the same. Without a group there is no dispatch
            and it changes nothing.
        deadline: seconds within which each collective of this layer completes or raises
            (None: moe_ep.deadline.default(), 60 s). A failure raises
            moe_ep.deadline.CollectiveFailure on every surviving rank, naming the operation,
            this layer and the ranks that did not answer; moe_ep.elastic recovers from it.
        name: the layer's name in errors (default "moe_layer_<n>", n counting the layers
            made in this process).

    Input [..., H] in the experts' dtype (anything else raises, naming `x`); output of the
    same shape and dtype. Under expert
    parallelism every rank of the group must call forward together (T may differ, even be 0).
    """

    def __init__(
        self,
        hidden: int,
        ffn_hidden: int,
        num_experts: int,
        top_k: int,
        *,
        score_func: str = "softmax",
        n_group: int = 1,
        topk_group: int = 1,
        group_score: str = "max",
        renormalize: bool = True,
        scaling: float = 1.0,
        expert_bias: bool = False,
        router_dtype: torch.dtype = torch.float32,
        activation: str = "silu",
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        group: dist.ProcessGroup | None = None,
        placement: ExpertPlacement | None = None,
        dispatch_mode: str = "exact",
        capacity: int | None = None,
        on_overflow: str = "report",
        num_chunks: int | None = None,
        dispatch_dtype: torch.dtype | None = None,
        deadline: float | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        if dispatch_dtype not in (None, dtype, torch.float8_e4m3fn):
            raise ValueError(
                f"dispatch_dtype must be the layer's dtype ({dtype}) or torch.float8_e4m3fn, "
                f"got {dispatch_dtype}"
            )
        if deadline is not None and not deadline > 0:
            raise ValueError(f"deadline must be > 0 seconds, got {deadline}")
        self.deadline = deadline
        self.name = name or f"moe_layer_{next(_layer_numbers)}"
        if dispatch_mode not in ("exact", "capacity"):
            raise ValueError(f"dispatch_mode must be 'exact' or 'capacity', got {dispatch_mode!r}")
        if dispatch_mode == "capacity" and (capacity is None or capacity < 1):
            raise ValueError(f"dispatch_mode='capacity' needs a capacity >= 1, got {capacity}")
        if on_overflow not in ("fallback", "raise", "report"):
            raise ValueError(
                f"on_overflow must be 'fallback', 'raise' or 'report', got {on_overflow!r}"
            )
        if num_chunks is None:
            num_chunks = 2 if torch.device(device or "cpu").type == "cuda" else 1
        if num_chunks < 1:
            raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
        self.dispatch_mode, self.capacity, self.on_overflow = dispatch_mode, capacity, on_overflow
        self.dispatch_status: list[torch.Tensor] = []  # capacity mode: statuses not yet checked
        self.num_chunks = num_chunks
        self.dispatch_dtype = dispatch_dtype or dtype
        self.group = group
        if group is not None:
            placement = placement or ExpertPlacement.contiguous(num_experts, group.size())
            if placement.world_size != group.size() or placement.num_experts != num_experts:
                raise ValueError(
                    f"placement covers {placement.num_experts} experts on {placement.world_size} "
                    f"ranks, the layer has {num_experts} experts on {group.size()} ranks"
                )
            self.placement = placement.to(device or "cpu")
            # Logical ids of this rank's slots: a replicated expert may appear on many ranks.
            self.local_expert_ids = placement.local_experts(group.rank())
        else:
            self.placement = None
            self.local_expert_ids = list(range(num_experts))
        local = len(self.local_expert_ids)
        self.hidden, self.ffn_hidden = hidden, ffn_hidden
        self.num_experts, self.top_k = num_experts, top_k
        self.score_func, self.n_group, self.topk_group = score_func, n_group, topk_group
        self.group_score = group_score
        self.renormalize, self.scaling, self.activation = renormalize, scaling, activation
        # Inference weights: the ops have no backward.
        self.gate_weight = nn.Parameter(
            torch.empty(num_experts, hidden, dtype=router_dtype, device=device),
            requires_grad=False,
        )
        self.w13 = nn.Parameter(
            torch.empty(local, 2 * ffn_hidden, hidden, dtype=dtype, device=device),
            requires_grad=False,
        )
        self.w2 = nn.Parameter(
            torch.empty(local, hidden, ffn_hidden, dtype=dtype, device=device),
            requires_grad=False,
        )
        if expert_bias:
            self.register_buffer(
                "expert_bias", torch.zeros(num_experts, dtype=torch.float32, device=device)
            )
        else:
            self.expert_bias = None
        # int64 [local slots] on the weights' device, or None: (token, choice) entries each
        # local slot received, accumulated by every expert-parallel step from the offsets the
        # dispatch computes anyway (moe_ep.LoadBalancer sets it and reads it between steps).
        self.slot_counts: torch.Tensor | None = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # Unit-variance activations through each matrix keep bf16 outputs well scaled.
        nn.init.normal_(self.gate_weight, std=1.0 / math.sqrt(self.hidden))
        nn.init.normal_(self.w13, std=1.0 / math.sqrt(self.hidden))
        nn.init.normal_(self.w2, std=1.0 / math.sqrt(self.ffn_hidden))

    @torch.no_grad()
    def load_full_weights(
        self,
        gate_weight: torch.Tensor,
        w13: torch.Tensor,
        w2: torch.Tensor,
        expert_bias: torch.Tensor | None = None,
        *,
        transposed: bool | None = None,
    ) -> None:
        """Loads this rank's shard from all-expert weights: gate_weight [E, H], w13
        [E, 2F, H] (gate rows, then up rows), w2 [E, H, F], expert_bias [E] (a layer built
        with expert_bias=True).

        transposed=True takes w13 [E, H, 2F] and w2 [E, F, H] (input dimension first, as
        some checkpoints store them). The default (None) reads the layout from the shapes
        and raises where they cannot tell it (H == 2F for w13, H == F for w2): say which."""
        w13, w2 = self._expert_weights(w13, w2, self.num_experts, transposed)
        local = torch.tensor(self.local_expert_ids, dtype=torch.long, device=w13.device)
        self._load(gate_weight, w13.index_select(0, local), w2.index_select(0, local), expert_bias)

    @torch.no_grad()
    def load_local_weights(
        self,
        gate_weight: torch.Tensor,
        w13: torch.Tensor,
        w2: torch.Tensor,
        expert_bias: torch.Tensor | None = None,
        *,
        transposed: bool | None = None,
    ) -> None:
        """Loads this rank's experts only: w13 [L, 2F, H] and w2 [L, H, F] hold the experts
        of local_expert_ids, in that order (a sharded checkpoint loader reads just those, see
        moe_ep.integrations.transformers.load_pretrained); gate_weight, expert_bias and
        transposed as in load_full_weights."""
        w13, w2 = self._expert_weights(w13, w2, len(self.local_expert_ids), transposed)
        self._load(gate_weight, w13, w2, expert_bias)

    def _expert_weights(
        self, w13: torch.Tensor, w2: torch.Tensor, experts: int, transposed: bool | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """w13 and w2 as [n, 2F, H] and [n, H, F] views; a shape that does not fit, or one
        whose layout is ambiguous with transposed=None, raises naming the argument."""
        hidden, ffn = self.hidden, self.ffn_hidden
        return (
            _weight_layout("w13", w13, (experts, 2 * ffn, hidden), transposed),
            _weight_layout("w2", w2, (experts, hidden, ffn), transposed),
        )

    def _load(
        self,
        gate_weight: torch.Tensor,
        w13: torch.Tensor,
        w2: torch.Tensor,
        expert_bias: torch.Tensor | None,
    ) -> None:
        _check_shape("gate_weight", gate_weight, tuple(self.gate_weight.shape))
        if expert_bias is not None:
            if self.expert_bias is None:
                raise ValueError(
                    "expert_bias: the layer was built without a selection bias; build it with "
                    "MoELayer(..., expert_bias=True) to load one"
                )
            _check_shape("expert_bias", expert_bias, (self.num_experts,))
        self.gate_weight.copy_(gate_weight)
        self.w13.copy_(w13)
        self.w2.copy_(w2)
        if expert_bias is not None:
            self.expert_bias.copy_(expert_bias)

    @torch.no_grad()
    def set_placement(
        self, placement: ExpertPlacement, w13: torch.Tensor, w2: torch.Tensor
    ) -> None:
        """Swaps in a new placement with this rank's weights for it ([L', 2F, H], [L', H, F],
        L' = its local slots); every rank of the group must swap together, between steps."""
        local = placement.local_experts(self.group.rank())
        if placement.world_size != self.group.size() or placement.num_experts != self.num_experts:
            raise ValueError(
                f"placement: covers {placement.num_experts} experts on {placement.world_size} "
                f"ranks, the layer has {self.num_experts} experts on {self.group.size()} ranks"
            )
        if w13.shape[0] != len(local) or w2.shape[0] != len(local):
            raise ValueError(
                f"w13, w2: expected {len(local)} local slots, got {w13.shape[0]}, {w2.shape[0]}"
            )
        self.placement = placement.to(self.w13.device)
        self.local_expert_ids = local
        self.w13 = nn.Parameter(w13.to(self.w13), requires_grad=False)
        self.w2 = nn.Parameter(w2.to(self.w2), requires_grad=False)
        if self.slot_counts is not None:  # the counts restart with the new slots
            self.slot_counts = self.slot_counts.new_zeros(len(local))

    @property
    def _wire_dtype(self) -> torch.dtype | None:
        """What the dispatch ops take: float8_e4m3fn, or None to send the tokens as they are."""
        return self.dispatch_dtype if self.dispatch_dtype == torch.float8_e4m3fn else None

    def slot_ids(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """The physical slots that this rank's (token, choice) pairs go to."""
        return map_to_slots(topk_ids, self.placement, self.group.rank())

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """[T, E] logits of the flattened tokens, in router_dtype."""
        return F.linear(x.to(self.gate_weight.dtype), self.gate_weight)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.route(
            self.router_logits(x),
            self.top_k,
            score_func=self.score_func,
            bias=self.expert_bias,
            n_group=self.n_group,
            topk_group=self.topk_group,
            renormalize=self.renormalize,
            scaling=self.scaling,
            group_score=self.group_score,
        )

    def experts(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        """The routed experts for given routing, without chunking: on one rank permute,
        grouped FFN and weighted combine (nothing read on the host); over a group dispatch,
        local FFN and combine."""
        if self.group is None:
            permuted, offsets, row_of = ops.permute(x, topk_ids, self.num_experts, check_ids=False)
            y = ops.expert_ffn(
                permuted, offsets, self.w13, self.w2, self.activation, check_offsets=False
            )
            return ops.unpermute(y, row_of, topk_weights, check_rows=False)
        return self._expert_parallel(x, self.slot_ids(topk_ids), topk_weights, 1, None)

    # The expert-parallel step in phases (moe_ep.pipeline.ExpertParallelPhases), so that the
    # pipeline can interleave chunks and layers.

    def route_slots(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        topk_ids, topk_weights = self.route(x)
        return self.slot_ids(topk_ids), topk_weights

    def start_dispatches(
        self,
        x: torch.Tensor,
        slots: torch.Tensor,
        topk_weights: torch.Tensor,
        num_chunks: int,
        mode: str | None = None,
    ) -> list[dispatcher.PendingDispatch]:
        """Every chunk's dispatch, in flight: exact mode with one header for all chunks,
        capacity mode with ceil(capacity / num_chunks) rows per chunk and rank."""
        if (mode or self.dispatch_mode) == "exact":
            return dispatcher.dispatch_chunks(
                x, slots, topk_weights, self.placement, num_chunks, self.group, self._wire_dtype
            )
        capacity = -(-self.capacity // num_chunks)
        return [
            dispatcher.dispatch_capacity(
                xc,
                sc,
                wc,
                self.placement,
                capacity,
                self.group,
                async_op=True,
                dispatch_dtype=self._wire_dtype,
            )
            for xc, sc, wc in zip(
                x.tensor_split(num_chunks),
                slots.tensor_split(num_chunks),
                topk_weights.tensor_split(num_chunks),
                strict=True,
            )
        ]

    def finish_dispatch(
        self, pending: dispatcher.PendingDispatch
    ) -> dispatcher.Dispatched | dispatcher.CapacityDispatched:
        """Waits for the rows; keeps a fixed-capacity status for the check."""
        received = pending.wait()
        if isinstance(received, dispatcher.CapacityDispatched):
            self.dispatch_status.append(received.status)
        return received

    def local_experts(
        self, received: dispatcher.Dispatched | dispatcher.CapacityDispatched
    ) -> torch.Tensor:
        """This rank's experts on the rows it received, in the order dispatch produced; only
        the rows that arrived are computed (a rank with fewer experts than the widest one
        ignores the empty trailing groups)."""
        offsets = received.expert_offsets[: self.w13.shape[0] + 1]
        if self.slot_counts is not None:
            self.slot_counts += offsets.diff()
        return ops.expert_ffn(
            received.x_sorted, offsets, self.w13, self.w2, self.activation, check_offsets=False
        )

    def start_combine(
        self, y: torch.Tensor, received: dispatcher.Dispatched | dispatcher.CapacityDispatched
    ) -> dispatcher.PendingCombine:
        return dispatcher.combine(y, received, self.group, async_op=True)

    def check_dispatch_status(self) -> None:
        """Checks the fixed-capacity statuses not yet checked (one host read): raises
        DispatchOverflow, or the misuse or disagreement, the same on every rank."""
        statuses, self.dispatch_status = self.dispatch_status, []
        dispatcher.check_status(statuses, self.capacity)

    def _expert_parallel(
        self,
        x: torch.Tensor,
        slots: torch.Tensor,
        topk_weights: torch.Tensor,
        num_chunks: int,
        overlap_fn: OverlapFn | None,
    ) -> torch.Tensor:
        if self.dispatch_mode == "capacity" and self.dispatch_status:
            if not _capturing(x):  # a status left unchecked by the caller: never lost
                self.check_dispatch_status()
        if self.dispatch_mode == "exact" and overlap_fn is None:
            return dispatcher.moe_forward(
                x,
                slots,
                topk_weights,
                self.placement,
                self.w13,
                self.w2,
                self.activation,
                num_chunks,
                self.group,
                self.slot_counts,
                self._wire_dtype,
            )
        routed, extra = pipeline.run_layer(self, x, slots, topk_weights, num_chunks, overlap_fn)
        if self.dispatch_mode == "capacity" and self.on_overflow != "report":
            try:
                self.check_dispatch_status()
            except dispatcher.DispatchOverflow:
                if self.on_overflow == "raise":
                    raise
                routed, _ = pipeline.run_layer(self, x, slots, topk_weights, 1, None, "exact")
        return routed if extra is None else routed + extra

    def forward(self, x: torch.Tensor, overlap_fn: OverlapFn | None = None) -> torch.Tensor:
        """[..., H] -> [..., H]. Under expert parallelism the tokens go through num_chunks
        overlapped chunks: the moe_forward op (exact-size dispatch), or the Python pipeline
        (moe_ep.pipeline.run_layer) for fixed-capacity dispatch or an overlap_fn.
        overlap_fn(chunk, x) runs while that chunk's results travel back, and what it returns
        is added to the chunk's output (a shared expert, say)."""
        self.check_input(x)
        tokens = x.reshape(-1, self.hidden)
        topk_ids, topk_weights = self.route(tokens)
        if self.group is None:
            out = self.experts(tokens, topk_ids, topk_weights)
            if overlap_fn is not None:
                extra = overlap_fn(0, tokens)
                out = out if extra is None else out + extra
            return out.view(x.shape)
        with deadlines.guard(self.group, self.name, self.deadline):
            out = self._expert_parallel(
                tokens, self.slot_ids(topk_ids), topk_weights, self.num_chunks, overlap_fn
            )
        return out.view(x.shape)

    def check_input(self, x: torch.Tensor) -> None:
        """Raises naming `x` when it does not fit the layer: a hidden size that the router
        cannot take (it runs before any exchange), or on one rank a dtype other than the
        experts'. Under expert parallelism the ops check the dtype inside the step's
        exchange, so that a rank's wrong input raises on every rank, not there alone while
        the others wait."""
        if x.shape[-1:] != (self.hidden,):
            raise ValueError(f"x: expected [..., {self.hidden}], got {list(x.shape)}")
        if self.group is None and x.dtype != self.w13.dtype:
            raise ValueError(
                f"x: dtype {x.dtype} differs from the layer's dtype {self.w13.dtype} (its expert "
                f"weights); cast the input, e.g. x.to({self.w13.dtype})"
            )

    def extra_repr(self) -> str:
        return (
            f"hidden={self.hidden}, ffn_hidden={self.ffn_hidden}, num_experts={self.num_experts}, "
            f"top_k={self.top_k}, score_func={self.score_func}, activation={self.activation}"
        )


_layer_numbers = itertools.count()


def _check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != expected:
        raise ValueError(f"{name}: expected shape {list(expected)}, got {list(tensor.shape)}")


def _weight_layout(
    name: str, weight: torch.Tensor, expected: tuple[int, int, int], transposed: bool | None
) -> torch.Tensor:
    """weight as `expected` [n, out, in]; transposed=True takes [n, in, out]. With None the
    shape decides, and a square [n, d, d] raises: both layouts fit it, and a wrong guess
    would compute garbage without an error."""
    n, out_dim, in_dim = expected
    flipped = (n, in_dim, out_dim)
    if transposed is None and out_dim == in_dim and tuple(weight.shape) == expected:
        raise ValueError(
            f"{name}: shape {list(weight.shape)} fits both [n, out, in] and its transpose "
            f"(out == in == {in_dim}); pass transposed=False for [n, out, in] (torch.nn.Linear's "
            "and transformers' layout) or transposed=True for [n, in, out]"
        )
    if transposed:
        _check_shape(name, weight, flipped)
        return weight.transpose(1, 2)
    if transposed is None and tuple(weight.shape) == flipped:
        raise ValueError(
            f"{name}: expected shape {list(expected)} ([n, out, in]), got {list(weight.shape)}, "
            "its transpose; pass transposed=True if it is stored input dimension first"
        )
    _check_shape(name, weight, expected)
    return weight


def _capturing(x: torch.Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def check_dispatch_status(module: nn.Module) -> None:
    """Checks every MoELayer of a model for fixed-capacity statuses not yet checked, with one
    host read for all of them (after a step, or a CUDA graph replay); raises the same error on
    every rank."""
    layers = [m for m in module.modules() if isinstance(m, MoELayer) and m.dispatch_status]
    statuses = [status for layer in layers for status in layer.dispatch_status]
    for layer in layers:
        layer.dispatch_status = []
    if layers:
        dispatcher.check_status(statuses, layers[0].capacity)

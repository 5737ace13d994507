"""ep_implementation="moe_ep": transformers' expert parallelism with moe_ep's dispatch ->
local experts -> combine.

    import moe_ep.integrations.transformers  # registers "moe_ep"
    config = DistributedConfig(ep_size=N, tp_size=N, ep_implementation="moe_ep")
    model = AutoModelForCausalLM.from_pretrained(path, distributed_config=config)

transformers routes (its own router, in its own dtype) and hands each experts module's
forward (hidden_states, top_k_index, top_k_weights); this rank holds experts
[rank * E/N, (rank + 1) * E/N) of each layer (its grouped_gemm plan). moe_ep sends each token
once per destination rank (not once per chosen expert), reads one header per layer on the
host, and overlaps chunks where the device allows.

Batch sharing: the ranks of a tensor-parallel group hold the same batch; each sends only its
own slice of it (the same slicing as transformers' all_to_all) and the slices' outputs are
gathered back over that group, so no token is computed twice. Ranks of different TP groups
(fsdp_size > 1) hold different batches.

Inference only: the ops have no backward. A forward whose inputs require gradients raises
(use ep_implementation="all_to_all" to train).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from transformers.distributed.expert_parallel import EPImplementation

from moe_ep import dispatcher
from moe_ep.integrations.transformers.families import expert_activation
from moe_ep.placement import ExpertPlacement

__all__ = ["MoeEpImplementation"]


class MoeEpImplementation(EPImplementation):
    """One per experts module (transformers builds it when the EP plan is applied): holds the
    module's placement, groups and activation across forwards."""

    def __init__(self, experts, ep_mesh, tp_mesh):
        super().__init__(experts, ep_mesh, tp_mesh)
        if experts.is_transposed or not experts.is_concatenated or not experts.has_gate:
            raise ValueError(
                "ep_implementation='moe_ep': the experts must store fused [E, 2F, H] gate-then-up "
                f"weights (is_transposed={experts.is_transposed}, "
                f"is_concatenated={experts.is_concatenated}, has_gate={experts.has_gate})"
            )
        if getattr(experts, "has_bias", False):
            raise ValueError("ep_implementation='moe_ep': moe_ep's experts have no bias terms")
        self.experts = experts
        self.activation = expert_activation(experts.config)
        self.group = ep_mesh.get_group()
        # The parameter is a DTensor here: its shape is the global one.
        num_experts = experts.gate_up_proj.shape[0]
        self.placement = ExpertPlacement.contiguous(num_experts, ep_mesh.size())
        # The ranks of a TP group hold the same batch (all of the EP group when ep == tp).
        self.batch_group = tp_mesh.get_group() if tp_mesh.size() > 1 else None

    def __call__(self, hidden_states, top_k_index, top_k_weights):
        if torch.is_grad_enabled() and (hidden_states.requires_grad or top_k_weights.requires_grad):
            raise RuntimeError(
                "ep_implementation='moe_ep' runs inference only (its ops have no backward): call "
                "the model under torch.no_grad() or torch.inference_mode(), or train with "
                "ep_implementation='all_to_all'"
            )
        num_tokens = hidden_states.shape[0]
        if self.batch_group is None:
            return self._experts(hidden_states, top_k_index, top_k_weights)
        # Equal slices of the shared batch (the last ones padded with nothing to send) so
        # that the outputs gather into one tensor without exchanging sizes.
        size, rank = self.batch_group.size(), self.batch_group.rank()
        per_rank = -(-num_tokens // size)
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        mine = self._experts(hidden_states[rows], top_k_index[rows], top_k_weights[rows])
        padded = mine.new_zeros(per_rank, mine.shape[1])
        padded[: mine.shape[0]] = mine
        gathered = padded.new_empty(per_rank * size, mine.shape[1])
        dist.all_gather_into_tensor(gathered, padded, group=self.batch_group)
        return gathered[:num_tokens]

    def _experts(self, x, top_k_index, top_k_weights):
        if self.placement.expert_rank.device != x.device:
            self.placement = self.placement.to(x.device)
        # Inside transformers' forward context the parameters are this rank's local tensors;
        # two chunks on CUDA, one on the CPU, as MoELayer chooses (benchmarks/RESULTS.md).
        return dispatcher.moe_forward(
            x.contiguous(),
            top_k_index,
            top_k_weights.float(),
            self.placement,
            self.experts.gate_up_proj,
            self.experts.down_proj,
            self.activation,
            2 if x.is_cuda else 1,
            self.group,
        )

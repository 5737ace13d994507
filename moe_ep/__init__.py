"""moe_ep: large-scale cross-node expert parallelism for Mixture-of-Experts inference."""

import torch  # noqa: F401  (loads libtorch before the extension)

from moe_ep import _C, debug, ops  # noqa: F401  (_C registers torch.ops.moe_ep)
from moe_ep.balance import LoadBalancer
from moe_ep.layer import MoELayer
from moe_ep.placement import ExpertPlacement

__all__ = ["ExpertPlacement", "LoadBalancer", "MoELayer", "debug", "ops"]

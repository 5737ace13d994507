"""moe_ep: large-scale cross-node expert parallelism for Mixture-of-Experts inference."""

from moe_ep import _C, ops  # noqa: F401  (_C registers torch.ops.moe_ep)
from moe_ep.layer import MoELayer

__all__ = ["MoELayer", "ops"]

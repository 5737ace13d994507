"""moe_ep: large-scale cross-node expert parallelism for Mixture-of-Experts inference."""

from moe_ep import _C  # noqa: F401  (loads the library that registers torch.ops.moe_ep)

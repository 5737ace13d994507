"""moe_ep: large-scale cross-node expert parallelism for Mixture-of-Experts inference."""

import torch  # noqa: F401  (loads libtorch before the extension)

from moe_ep import _C  # noqa: F401  (loads the library that registers torch.ops.moe_ep)

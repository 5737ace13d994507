"""moe_ep: large-scale cross-node expert parallelism for Mixture-of-Experts inference."""

import torch  # noqa: F401, I001  (first: _C links against libc10/libtorch)
from moe_ep import _C  # noqa: F401  (loads the library that registers torch.ops.moe_ep)

"""moe_ep: large-scale cross-node expert parallelism for Mixture-of-Experts inference."""

import torch  # noqa: F401  (loads libtorch before the extension)

from moe_ep import _C, debug, ops  # noqa: F401  (_C registers torch.ops.moe_ep)
from moe_ep.balance import LoadBalancer
from moe_ep.cuda_arch import check_gpus
from moe_ep.layer import MoELayer
from moe_ep.placement import ExpertPlacement

__version__ = "0.1.0"  # the package's version (pyproject.toml reads it from here)
__all__ = ["ExpertPlacement", "LoadBalancer", "MoELayer", "debug", "ops"]

check_gpus()  # fail here, naming the rebuild, rather than at the first kernel

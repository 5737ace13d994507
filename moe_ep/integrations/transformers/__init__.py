"""moe_ep inside Hugging Face transformers models (pip install moe_ep[transformers]).

Importing this module registers ep_implementation="moe_ep" with transformers'
EPImplementationInterface:

    import moe_ep.integrations.transformers
    config = DistributedConfig(ep_size=N, tp_size=N, ep_implementation="moe_ep")
    model = AutoModelForCausalLM.from_pretrained(path, distributed_config=config)

For stacks that do their own parallelism (data-parallel attention, expert-parallel MoE):

    model = moe_ep.integrations.transformers.from_pretrained(path, group=dist.group.WORLD)
    # or convert(model, group=...) on a model already loaded, load_pretrained(model, path)

Supported families: Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3 (see .families).
"""

from transformers.distributed.expert_parallel import EPImplementationInterface

from moe_ep.integrations.transformers.convert import MoEBlock, convert, moe_blocks
from moe_ep.integrations.transformers.ep_implementation import MoeEpImplementation
from moe_ep.integrations.transformers.loading import (
    LoadReport,
    empty_model,
    from_pretrained,
    load_pretrained,
)

EPImplementationInterface.register("moe_ep", MoeEpImplementation)

__all__ = [
    "LoadReport",
    "MoEBlock",
    "MoeEpImplementation",
    "convert",
    "empty_model",
    "from_pretrained",
    "load_pretrained",
    "moe_blocks",
]

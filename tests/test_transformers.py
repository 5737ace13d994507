"""moe_ep inside Hugging Face transformers models: converted MoE blocks against the
families' own blocks (one process), sharded loading, and generation over Gloo groups of 1, 2
and 4 spawned processes against the same models without expert parallelism."""

import copy
import os

import pytest
import torch
import torch.multiprocessing as mp
from safetensors import safe_open
from transformers import AutoModelForCausalLM
from transformers_worker import worker

import moe_ep.integrations.transformers as integration
from moe_ep.examples import generate, models
from moe_ep.integrations.transformers import loading
from moe_ep.integrations.transformers.families import family_of


def small_model(family, dtype=torch.float32):
    return models.random_model(generate.family_config(family), dtype)


def save_small_model(family, path):
    models.random_model(generate.family_config(family)).save_pretrained(path)


def family_blocks(model):
    return [m for m in model.modules() if family_of(m)]


@pytest.mark.parametrize("family", models.FAMILIES)
def test_converted_blocks_route_and_compute_as_the_family_does(family):
    model = small_model(family)
    converted = integration.convert(copy.deepcopy(model))
    blocks = integration.moe_blocks(converted)
    assert len(blocks) == len(family_blocks(model)) > 0
    for original, block in zip(family_blocks(model), blocks, strict=True):
        x = torch.randn(3, 7, model.config.hidden_size)
        tokens = x.reshape(-1, x.shape[-1])
        _, expected_weights, expected_ids = original.gate(tokens)
        ids, weights = block.moe.route(tokens)
        order, expected_order = ids.long().sort(-1), expected_ids.sort(-1)
        torch.testing.assert_close(order.values, expected_order.values, rtol=0, atol=0)
        torch.testing.assert_close(
            weights.gather(1, order.indices),
            expected_weights.float().gather(1, expected_order.indices),
            rtol=1e-6,
            atol=1e-7,
        )
        with torch.no_grad():
            expected = original(x)
            actual = block(x)
        error = (actual - expected).abs().max() / expected.abs().max()
        assert error <= 1e-5, f"{family}: relative error {error:.2e}"


def test_deepseek_group_score_rule_is_read_from_the_family():
    """DeepSeek-V3 scores a group by its two best experts; the same layer scoring groups by
    their best expert chooses differently: the rule is what makes the match."""
    model = small_model("deepseek_v3")
    block = integration.moe_blocks(integration.convert(copy.deepcopy(model)))[0]
    assert block.moe.group_score == "top2_sum" and block.moe.expert_bias is not None
    tokens = torch.randn(64, model.config.hidden_size)
    _, _, expected = family_blocks(model)[0].gate(tokens)
    block.moe.group_score = "max"
    ids, _ = block.moe.route(tokens)
    assert not torch.equal(ids.long().sort(-1).values, expected.sort(-1).values)


def test_bfloat16_routers_compute_logits_as_the_family_does():
    """Mixtral computes its logits in the model's dtype, DeepSeek-V3 in float32."""
    for family, logits_dtype in (("mixtral", torch.bfloat16), ("deepseek_v3", torch.float32)):
        model = small_model(family, torch.bfloat16)
        block = integration.moe_blocks(integration.convert(copy.deepcopy(model)))[0]
        tokens = torch.randn(9, model.config.hidden_size).to(torch.bfloat16)
        expected, _, _ = family_blocks(model)[0].gate(tokens)
        logits = block.moe.router_logits(tokens)
        assert logits.dtype == logits_dtype
        torch.testing.assert_close(logits, expected.to(logits_dtype), rtol=0, atol=0)


def test_sharded_loading_reads_only_this_ranks_experts(tmp_path, monkeypatch):
    """A layer whose placement gives this rank experts 4..7 of 8 reads those tensors and no
    other expert's, and computes as the full model does on them."""
    path = str(tmp_path / "model")
    save_small_model("mixtral", path)
    full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    class Half:  # the second half of a group of two, without a process group
        def size(self):
            return 2

        def rank(self):
            return 1

    read_keys = []

    class RecordingFile:  # what the loader asks the checkpoint for, tensor by tensor
        def __init__(self, *args, **kwargs):
            self.file = safe_open(*args, **kwargs)

        def __enter__(self):
            self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def keys(self):
            return self.file.keys()

        def get_tensor(self, key):
            read_keys.append(key)
            return self.file.get_tensor(key)

    monkeypatch.setattr(loading, "safe_open", RecordingFile)
    model = integration.empty_model(full.config, torch.float32)
    integration.convert(model, group=Half())
    report = integration.load_pretrained(model, path)
    experts_read = {
        int(k.split(".experts.")[1].split(".")[0]) for k in read_keys if ".experts." in k
    }
    assert experts_read == {4, 5, 6, 7}
    for name, experts in report.experts_read.items():
        assert experts == {4, 5, 6, 7}, name
    per_expert = 3 * full.config.hidden_size * full.config.intermediate_size * 4
    assert report.expert_bytes_read == len(report.experts_read) * 4 * per_expert
    for original, block in zip(family_blocks(full), integration.moe_blocks(model), strict=True):
        torch.testing.assert_close(block.moe.w13, original.experts.gate_up_proj[4:])
        torch.testing.assert_close(block.moe.w2, original.experts.down_proj[4:])
        torch.testing.assert_close(block.moe.gate_weight, original.gate.weight)
    dense = dict(full.named_parameters())
    for name, param in model.named_parameters():
        if name in dense:
            torch.testing.assert_close(param, dense[name], rtol=0, atol=0)


def test_loading_names_what_the_checkpoint_lacks(tmp_path):
    path = str(tmp_path / "model")
    save_small_model("qwen3_moe", path)
    other = generate.family_config("qwen3_moe")
    other.num_hidden_layers = 3  # one layer more than the checkpoint holds
    model = integration.empty_model(other, torch.float32)
    integration.convert(model)
    with pytest.raises(ValueError, match=r"path: .*layers\.2\."):
        integration.load_pretrained(model, path)


def test_converted_blocks_refuse_gradients():
    model = small_model("qwen2_moe")
    block = integration.moe_blocks(integration.convert(copy.deepcopy(model)))[0]
    x = torch.randn(2, 3, model.config.hidden_size, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference only"):
        block(x)
    with torch.no_grad():
        block(x)


def test_convert_rejects_a_model_without_supported_blocks():
    with pytest.raises(ValueError, match="model: no MoE block"):
        integration.convert(torch.nn.Linear(4, 4))


@pytest.mark.parametrize("world", [1, 2, 4])
def test_generation_equals_the_model_without_expert_parallelism(world, tmp_path):
    init_file = os.path.join(tmp_path, "init")
    mp.spawn(worker, args=(world, init_file, list(models.FAMILIES)), nprocs=world, join=True)

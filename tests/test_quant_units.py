"""Unit tests of the ModelOpt glue on a tiny random Llama: the quantization plan, calibration save/restore, and
dequantizing every registered format's export by hand."""

import pytest
import torch
from safetensors.torch import save_file

from pipeline import formats
from pipeline.errors import BadInput
from pipeline.quant import (
    export_unified,
    library_prints,
    modelopt,
    plan_quantization,
    restore_calibration,
    save_calibration,
    weight_digests,
)
from pipeline.recipe import QuantizationSpec
from pipeline.verify.dequant import effective_weights


def tiny_llama(hidden: int = 128, intermediate: int = 256, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                         architectures=["LlamaForCausalLM"])
    return LlamaForCausalLM(config).eval()


IDS = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))


def calibrated(fmt: str, model=None, **spec):
    model = model or tiny_llama()
    mtq, _ = modelopt()
    with library_prints(), torch.no_grad():
        mtq.quantize(model, plan_quantization(QuantizationSpec(format=fmt, **spec), model).config,
                     lambda m: [m(batch) for batch in IDS.split(2)])
    return model


# The plan -------------------------------------------------------------------------------------------------------

def test_plan_excludes_lm_head_and_the_recipes_patterns():
    plan = plan_quantization(QuantizationSpec(format="fp8", exclude=("*lm_head*", "mlp")), tiny_llama())
    assert "lm_head" not in plan.quantized_layers
    assert plan.quantized_layers and not any("mlp" in name for name in plan.quantized_layers)
    assert {"quantizer_name": "*mlp*", "enable": False} in plan.config["quant_cfg"]


def test_plan_falls_back_to_a_block_size_every_layer_takes():
    # 192-wide inputs: 128 does not divide them, 64 does (TensorRT-LLM's INT4 kernels take both).
    plan = plan_quantization(QuantizationSpec(format="int4_awq"), tiny_llama(hidden=192))
    assert plan.block_size == 64 and not plan.excluded_layers
    assert "every layer uses block size 64 instead" in plan.decisions[0]
    sizes = {e["cfg"]["block_sizes"][-1] for e in plan.config["quant_cfg"]
             if "weight_quantizer" in e["quantizer_name"] and isinstance(e.get("cfg"), dict) and e["cfg"].get(
                 "block_sizes")}
    assert sizes == {64}


def test_plan_exclude_policy_leaves_the_misfits_unquantized():
    plan = plan_quantization(QuantizationSpec(format="int4_awq", block_size_policy="exclude"), tiny_llama(hidden=192))
    assert plan.block_size == 128
    assert plan.excluded_layers and all(not n.endswith("down_proj") for n in plan.excluded_layers)
    assert "model.layers.0.mlp.down_proj" in plan.quantized_layers  # 256 wide: 128 divides it
    assert not set(plan.excluded_layers) & set(plan.quantized_layers)


def test_plan_error_policy_names_the_fallback():
    with pytest.raises(BadInput, match="set quantization.block_size: 64"):
        plan_quantization(QuantizationSpec(format="int4_awq", block_size_policy="error"), tiny_llama(hidden=192))


def test_plan_refuses_a_block_size_that_divides_no_layer():
    with pytest.raises(BadInput, match="divides no layer's input width \\(96\\); use 32 or 16"):
        plan_quantization(QuantizationSpec(format="int4_awq", block_size=64), tiny_llama(hidden=96, intermediate=96))


# Calibration save / restore -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["fp8", "int8_sq", "nvfp4"])
def test_calibration_restores_to_the_same_outputs(tmp_path, fmt):
    """SmoothQuant rescales weights in place: the state stores its scales and replays them."""
    model = tiny_llama()
    weights = tmp_path / "model"  # the model directory calibration started from (one file here; shards work too)
    weights.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},
              weights / "model.safetensors")
    before = weight_digests(model)
    calibrated(fmt, model)
    (tmp_path / "state").mkdir()
    saved = save_calibration(model, weights, tmp_path / "state", before)
    restored = tiny_llama()  # the same seed: the weights calibration started from
    restore_calibration(restored, tmp_path / "state")
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, restored(IDS).logits)
    if fmt == "int8_sq":
        assert saved["rescaled_weights"] > 0 and saved["tensors"] < len(model.state_dict())


# Dequantizing every format ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", [f for f in formats.FORMATS if f != "auto"])
def test_every_format_dequantizes_to_what_modelopt_computes(tmp_path, fmt):
    """Each format's export, dequantized by its codec, equals ModelOpt's fake-quantized weight up to the exporter's
    fp16 rounding and the scales fused layers share. Max calibration: the codec, not AWQ's search, is under test.
    (Format auto is a map of these formats, dequantized per layer: tests/test_autoquant.py.)"""
    model = calibrated(fmt, algorithm="max")
    shapes = {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    with torch.no_grad():
        expected = {}
        for name, module in model.named_modules():
            quantizer = getattr(module, "weight_quantizer", None)
            if quantizer is not None and quantizer.is_enabled:
                expected[name] = quantizer(module.weight).float()
    export_unified(model, torch.float16, tmp_path, max_shard_size="10GB")
    weights, problems = effective_weights(tmp_path, shapes)
    assert problems == []
    tolerance = formats.get(fmt).layer_tolerance
    for name, want in expected.items():
        got = weights[f"{name}.weight"]
        error = float((got - want).norm() / want.norm())
        # o_proj and down_proj share no scale with a sibling: only the export's rounding separates them.
        assert error < (0.05 if name.endswith(("o_proj", "down_proj")) else tolerance), (name, error)

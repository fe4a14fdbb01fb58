"""Every format end to end on the real SmolLM2 through ModelOpt on CPU: tensor inventories of both exports."""

import json

import pytest
import torch
from safetensors import safe_open

from pipeline.recipe import load_recipe
from tests.conftest import TINY

# Layer 0's query projection (HF name; TensorRT-LLM fuses q, k and v: 576 + 2 * 192 = 960 rows).
HF_Q = "model.layers.0.self_attn.q_proj"
TRT_QKV = "transformer.layers.0.attention.qkv"

# format -> (quant_algo, group size, HF q_proj tensors {suffix: (dtype, shape)}, TensorRT-LLM qkv tensors)
EXPECTED = {
    "fp8": ("FP8", None,
            {"weight": ("F8_E4M3", [576, 576]), "weight_scale": ("F32", []), "input_scale": ("F32", [])},
            {"weight": ("F8_E4M3", [960, 576]), "weights_scaling_factor": ("F32", [1]),
             "activation_scaling_factor": ("F32", [1])}),
    "int8_sq": ("W8A8_SQ_PER_CHANNEL", None,
                {"weight": ("I8", [576, 576]), "weight_scale": ("F32", [576]), "input_scale": ("F32", []),
                 "pre_quant_scale": ("F16", [576])},
                {"weight": ("I8", [960, 576]), "weights_scaling_factor": ("F32", [960]),
                 "prequant_scaling_factor": ("F16", [576])}),
    "int4_awq": ("W4A16_AWQ", 64,
                 {"weight": ("U8", [288, 576]), "weight_scale": ("F32", [576, 9])},
                 {"weight": ("I8", [480, 576]), "weights_scaling_factor": ("F32", [960, 9]),
                  "prequant_scaling_factor": ("F16", [576])}),
    "w4a8_awq": ("W4A8_AWQ", 64,
                 {"weight": ("U8", [288, 576]), "weight_scale": ("F32", [576, 9]), "weight_scale_2": ("F32", []),
                  "input_scale": ("F32", [])},
                 {"weight": ("I8", [480, 576]), "weights_scaling_factor": ("F32", [960, 9]),
                  "weights_scaling_factor_2": ("F32", [1])}),
    "nvfp4": ("NVFP4", 16,
              {"weight": ("U8", [576, 288]), "weight_scale": ("F8_E4M3", [576, 36]), "weight_scale_2": ("F32", []),
               "input_scale": ("F32", [])},
              {"weight": ("U8", [960, 288]), "weights_scaling_factor": ("F8_E4M3", [960, 36]),
               "weights_scaling_factor_2": ("F32", [])}),
    # Added through the format registry alone: E8M0 (biased exponent, uint8) scales per 32 values.
    "mxfp8": ("MXFP8", 32,
              {"weight": ("F8_E4M3", [576, 576]), "weight_scale": ("U8", [576, 18])},
              {"weight": ("F8_E4M3", [960, 576]), "weights_scaling_factor": ("U8", [960, 18])}),
    "nvfp4_w4a16": ("W4A16_NVFP4", 16,
                    {"weight": ("U8", [576, 288]), "weight_scale": ("F8_E4M3", [576, 36]),
                     "weight_scale_2": ("F32", [])},
                    {"weight": ("U8", [960, 288]), "weights_scaling_factor": ("F8_E4M3", [960, 36]),
                     "weights_scaling_factor_2": ("F32", [])}),
}


def inventory(path, prefix):
    with safe_open(path, "pt") as fh:
        return {k[len(prefix) + 1:]: (fh.get_slice(k).get_dtype(), fh.get_slice(k).get_shape())
                for k in fh.keys() if k.startswith(prefix + ".")}


@pytest.mark.slow
@pytest.mark.parametrize("preset", list(EXPECTED))
def test_export_inventory_matches_the_format(run_preset, preset):
    algo, group, hf_tensors, trt_tensors = EXPECTED[preset]
    outcomes = {o.stage: o for o in run_preset(preset, "export.formats=[trtllm,hf]").outcomes}
    export = outcomes["export"].artifact

    hf_config = json.loads((export / "hf" / "hf_quant_config.json").read_text())["quantization"]
    trt_config = json.loads((export / "trtllm" / "config.json").read_text())
    assert hf_config["quant_algo"] == trt_config["quantization"]["quant_algo"] == algo
    if group:
        assert hf_config["group_size"] == trt_config["quantization"]["group_size"] == group
    assert trt_config["mapping"]["tp_size"] == 1 and trt_config["mapping"]["pp_size"] == 1
    assert inventory(export / "hf" / "model.safetensors", HF_Q) == {k: (d, s) for k, (d, s) in hf_tensors.items()}
    trt = inventory(export / "trtllm" / "rank0.safetensors", TRT_QKV)
    assert {k: trt[k] for k in trt_tensors} == trt_tensors

    # lm_head stays unquantized; tokenizer, generation config and model card travel with both checkpoints.
    with safe_open(export / "trtllm" / "rank0.safetensors", "pt") as fh:
        assert fh.get_slice("lm_head.weight").get_dtype() == "F16"
        assert "lm_head.weights_scaling_factor" not in fh.keys()
    for fmt in ("hf", "trtllm"):
        names = {p.name for p in (export / fmt).iterdir()}
        assert {"tokenizer.json", "generation_config.json", "README.md"} <= names
        assert f"| format | {load_recipe(preset).quantization.format} " in (export / fmt / "README.md").read_text()
    # The quantized checkpoints are smaller than fp16 (embeddings stay fp16 in this small model).
    sizes = outcomes["export"].artifact.metadata["formats"]
    assert all(info["bytes"] < outcomes["export"].artifact.metadata["fp16_bytes"] for info in sizes.values())


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["mxfp8", "nvfp4_w4a16"])
def test_formats_added_through_the_registry_verify_on_cpu(run_preset, preset):
    """Calibrated with the CPU fake quantizers, both checkpoint layouts dequantized by the format's codec and
    checked against the serving engines' loader contract, within the format's default thresholds."""
    verify = run_preset(preset, "export.formats=[trtllm,hf]", until="verify").outcomes[-1].artifact.metadata
    assert verify["passed"], verify["failures"]
    assert set(verify["exports"]) == {"hf", "trtllm"} and verify["exports"]["hf"]["contract"] == []


@pytest.mark.slow
def test_int4_block_size_fallback_is_decided_recorded_and_carded(run_preset):
    outcomes = {o.stage: o for o in run_preset("int4_awq").outcomes}
    calibration = outcomes["calibrate"].artifact.metadata
    assert calibration["block_size"] == 64
    assert "block size 128 does not divide the input width of 180 of 210 layers" in calibration["decisions"][0]
    card = (outcomes["export"].artifact / "hf" / "README.md").read_text()
    assert "every layer uses block size 64 instead" in card


@pytest.mark.slow
def test_int4_exclude_policy_leaves_misfit_layers_unquantized(run_preset):
    outcomes = {o.stage: o for o in run_preset("int4_awq", "quantization.block_size_policy=exclude").outcomes}
    assert outcomes["calibrate"].artifact.metadata["excluded_layers"] == 180
    with safe_open(outcomes["export"].artifact / "hf" / "model.safetensors", "pt") as fh:
        assert fh.get_slice(f"{HF_Q}.weight").get_dtype() in ("F16", "F32")
        assert f"{HF_Q}.weight_scale" not in fh.keys()
        assert fh.get_slice("model.layers.0.mlp.down_proj.weight").get_dtype() == "U8"


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["fp8", "int8_sq"])
def test_calibration_state_is_small_and_restores_bit_identically(real_store, preset):
    """The state holds scales, not weights (SmoothQuant's rescaled weights are replayed from their scales), and a
    fresh model with the state restored computes exactly what the calibrated model computed."""
    from pipeline import runner
    from pipeline.modeling import load_model
    from pipeline.quant import library_prints, modelopt, plan_quantization, restore_calibration

    recipe = load_recipe(preset, TINY)
    outcomes = {o.stage: o for o in runner.run(recipe, real_store, until="calibrate").outcomes}
    calibration, weights = outcomes["calibrate"].artifact, outcomes["load"].artifact.metadata["weights_bytes"]
    assert calibration.metadata["state_bytes"] < 0.01 * weights

    # Calibrate again in this process, then compare with a fresh model restored from the artifact.
    from pipeline import data

    calibrated, tokenizer = load_model(outcomes["load"].artifact / "model")
    windows = data.token_windows(tokenizer, "calib", recipe.calibration.samples, recipe.calibration.seq_len, 0)
    mtq, _ = modelopt()
    with library_prints(), torch.no_grad():
        mtq.quantize(calibrated, plan_quantization(recipe.quantization, calibrated).config,
                     lambda m: [m(b) for b in torch.split(windows, recipe.calibration.batch_size)])
    restored, _ = load_model(outcomes["load"].artifact / "model")
    restore_calibration(restored, calibration.path)
    ids = tokenizer("Calibration state must restore exactly.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(calibrated(ids).logits, restored(ids).logits)

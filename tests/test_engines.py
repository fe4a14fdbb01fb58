"""The deployable decoder ONNX and real TensorRT-RTX engines, built here with no GPU."""

import numpy as np
import onnx
import pytest
import torch

from pipeline.backends.tensorrt_rtx import ENGINE_FILE, ENGINE_MAGIC
from pipeline.stages.export import ONNX_FILE

pytestmark = pytest.mark.slow


def test_onnx_decoder_has_dynamic_shapes_and_a_kv_cache(run_preset):
    export = run_preset("fp8").outcomes[-1].artifact
    graph = onnx.load(str(export / "onnx" / ONNX_FILE), load_external_data=False).graph

    def dims(values):
        return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}

    inputs, outputs = dims(graph.input), dims(graph.output)
    assert inputs["input_ids"] == ["batch", "seq"] and inputs["attention_mask"] == ["batch", "total"]
    assert inputs["past_key_values.0.key"] == ["batch", 3, "past", 64] == inputs["past_key_values.29.value"]
    assert outputs["logits"][:2] == ["batch", "seq"] and len(outputs["logits"]) == 3
    assert outputs["present.29.key"][0::2] == ["batch", "total"] and len(graph.output) == 61
    ops = export.metadata["formats"]["onnx"]["ops"]
    assert ops["DequantizeLinear[weight:FLOAT8E4M3FN]"] == 210 and ops["QuantizeLinear[act]"] >= 210


def test_onnx_decodes_token_by_token_in_onnxruntime_like_the_model(run_preset, real_store):
    from pipeline.modeling import load_model
    from pipeline.onnx_export import OrtDecoder
    from pipeline.quant import restore_calibration

    outcomes = {o.stage: o for o in run_preset("fp8").outcomes}
    model, tokenizer = load_model(outcomes["load"].artifact / "model")
    restore_calibration(model, outcomes["calibrate"].artifact.path)
    prompt = tokenizer("The ocean covers most of the planet and", return_tensors="pt").input_ids[0]
    _, steps = OrtDecoder(outcomes["export"].artifact / "onnx" / ONNX_FILE).prefill_then_decode(
        model.config, prompt.numpy(), steps=4)
    with torch.no_grad():
        greedy = model.generate(prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                max_new_tokens=4, do_sample=False)[0, len(prompt):].tolist()
    assert steps == greedy


@pytest.mark.parametrize(("preset", "layer"), [("fp8", "DEQUANTIZE:FP8->FLOAT"), ("int4_awq", "DEQUANTIZE:INT4->FLOAT")])
def test_tensorrt_rtx_engine_for_ada(run_preset, preset, layer):
    outcomes = {o.stage: o for o in run_preset(preset, until="build").outcomes}
    build = outcomes["build"].artifact
    engine = (build / ENGINE_FILE).read_bytes()
    assert engine[:4] == ENGINE_MAGIC and build.metadata["compute_capability"] == "SM89"
    assert build.metadata["quantize_layers"][layer] >= 200
    fp16_weights = outcomes["load"].artifact.metadata["parameters"] * 2
    assert len(engine) < fp16_weights, "a low-precision engine must be smaller than the fp16 weights alone"
    assert run_preset(preset, until="build").outcomes[-1].status == "hit"


def test_engine_key_follows_the_target_architecture(run_preset):
    ada = run_preset("fp8", until="build").outcomes
    rtx50 = run_preset("fp8", "target=blackwell-rtx", until="build").outcomes
    assert [o.key for o in ada[:-1]] == [o.key for o in rtx50[:-1]], "a new target reuses every export"
    assert ada[-1].key != rtx50[-1].key and rtx50[-1].artifact.metadata["compute_capability"] == "SM120"
    assert np.frombuffer((rtx50[-1].artifact / ENGINE_FILE).read_bytes()[:4], np.uint8).tobytes() == ENGINE_MAGIC


def test_one_engine_for_ada_and_blackwell_rtx(run_preset):
    outcomes = run_preset("fp8", "build.also_for=[blackwell-rtx]", until="build").outcomes
    build = outcomes[-1].artifact
    assert build.metadata["compute_capability"] == "SM89,SM120"
    assert (build / ENGINE_FILE).read_bytes()[:4] == ENGINE_MAGIC
    single = run_preset("fp8", until="build").outcomes
    assert [o.key for o in outcomes[:-1]] == [o.key for o in single[:-1]] and outcomes[-1].key != single[-1].key


def test_nvfp4_engine_for_blackwell_rtx_from_fp4_onnx(run_preset, tmp_path):
    from pipeline.modeling import load_model
    from pipeline.quant import fold_weight_quantization, restore_calibration
    from pipeline.verify.dequant import onnx_fp4_weights

    outcomes = {o.stage: o for o in run_preset("nvfp4", until="build").outcomes}
    build, export = outcomes["build"].artifact, outcomes["export"].artifact
    engine = (build / ENGINE_FILE).read_bytes()
    assert engine[:4] == ENGINE_MAGIC and build.metadata["compute_capability"] == "SM120"
    assert build.metadata["quantize_layers"]["DEQUANTIZE:FP4->FLOAT"] >= 400, "FP4 weights and activations"
    assert len(engine) < outcomes["load"].artifact.metadata["parameters"] * 2
    ops = export.metadata["formats"]["onnx"]["ops"]
    assert ops["DequantizeLinear[weight:FLOAT4E2M1]"] == 210 == ops["DequantizeLinear[weight:FLOAT8E4M3FN]"]

    # The FP4 initializers hold exactly the calibrated model's fake-quantized weights; a wrong block scale shows.
    model, _ = load_model(outcomes["load"].artifact / "model")
    restore_calibration(model, outcomes["calibrate"].artifact.path)
    fold_weight_quantization(model)
    weights = onnx_fp4_weights(export / "onnx" / ONNX_FILE)
    name = "model.layers.3.mlp.down_proj.weight"
    assert len(weights) == 210 and torch.equal(weights[name], model.get_submodule(name[:-7]).weight.float())
    graph = onnx.load(str(export / "onnx" / ONNX_FILE))
    scale = next(i for i in graph.graph.initializer if i.name == f"model.{name}_f8_scale_f32_scale")
    scale.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(scale) * 2, scale.name))
    onnx.save(graph, str(tmp_path / "broken.onnx"))
    broken = onnx_fp4_weights(tmp_path / "broken.onnx")[name]
    assert torch.allclose(broken, weights[name] * 2)

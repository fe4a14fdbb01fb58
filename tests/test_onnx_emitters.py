"""The ONNX post-processing helpers (pipeline/onnx_export.py) on small hand-built graphs, run in onnxruntime."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from pipeline import formats, onnx_export

RNG = np.random.default_rng(0)


def run(model: onnx.ModelProto, **feeds) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def graph(nodes, inputs, outputs, initializers, opset: int = 19) -> onnx.ModelProto:
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, initializers),
                              opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


def test_every_format_names_an_emitter_or_says_why_it_has_no_onnx():
    for fmt in formats.FORMATS.values():
        assert fmt.onnx in onnx_export.EMITTERS if fmt.onnx else fmt.refusal("onnx")


def test_int8_weights_fold_the_weight_quantizer_into_an_int8_initializer():
    weight = RNG.standard_normal((16, 8)).astype(np.float32)  # [out, in], used through a Transpose as torch does
    scale = (np.abs(weight).max(axis=1) / 127).astype(np.float32)
    model = graph(
        [helper.make_node("QuantizeLinear", ["w", "s", "z"], ["wq"], axis=0),
         helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["wd"], axis=0),
         helper.make_node("Transpose", ["wd"], ["wt"], perm=[1, 0]),
         helper.make_node("MatMul", ["x", "wt"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(scale, "s"),
         numpy_helper.from_array(np.zeros(16, np.int8), "z")])
    x = RNG.standard_normal((2, 8)).astype(np.float32)
    folded = onnx_export._int8_weights(model)
    ops = [n.op_type for n in folded.graph.node]
    assert "QuantizeLinear" not in ops and "Transpose" not in ops
    assert any(i.data_type == TensorProto.INT8 and list(i.dims) == [8, 16] for i in folded.graph.initializer)
    np.testing.assert_allclose(run(folded, x=x), run(model, x=x), rtol=1e-5, atol=1e-5)


def test_half_unquantized_stores_large_float_weights_in_fp16_with_the_same_fp32_interface():
    table = RNG.standard_normal((300, 256)).astype(np.float32)  # >= 65536 elements: large enough to halve
    model = graph(
        [helper.make_node("Gather", ["table", "ids"], ["h"]), helper.make_node("MatMul", ["h", "proj"], ["y"])],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 300])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(table.T.copy(), "proj")])
    ids = np.array([[1, 5, 7]], dtype=np.int64)
    halved = onnx_export._half_unquantized(model)
    assert {i.data_type for i in halved.graph.initializer} == {TensorProto.FLOAT16}
    assert halved.ByteSize() < 0.6 * model.ByteSize()
    np.testing.assert_allclose(run(halved, ids=ids), run(model, ids=ids), rtol=2e-2, atol=0.5)


def test_float_after_half_matmuls_casts_an_fp16_matmul_back_to_fp32():
    model = graph(
        [helper.make_node("Cast", ["x"], ["xh"], to=TensorProto.FLOAT16),
         helper.make_node("Cast", ["w"], ["wh"], to=TensorProto.FLOAT16),
         helper.make_node("MatMul", ["xh", "wh"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(RNG.standard_normal((4, 3)).astype(np.float32), "w")])
    onnx_export._float_after_half_matmuls(model)
    assert model.graph.node[-1].op_type == "Cast" and model.graph.node[-1].output == ["y"]
    assert run(model, x=np.ones((2, 4), np.float32)).dtype == np.float32


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128)).eval()


def test_static_fp4_blocks_pin_the_blocked_axis_of_a_reshaped_activation():
    name = "/model/model/layers.0/self_attn/o_proj/input_quantizer/TRT_FP4DynamicQuantize"
    model = graph(
        [helper.make_node("Reshape", ["x", "shape"], ["r"]),
         helper.make_node("TRT_FP4DynamicQuantize", ["r"], ["q"], name=name, domain="trt")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 16])],
        [helper.make_tensor_value_info("q", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array([0, 0, -1], np.int64), "shape")])
    onnx_export._static_fp4_blocks(model, tiny_llama())
    pin = next(n for n in model.graph.node if n.name == f"{name}/pin")
    shape = next(i for i in model.graph.initializer if i.name == pin.input[1])
    assert list(numpy_helper.to_array(shape)) == [0, 0, 64]  # o_proj's in_features
    assert next(n for n in model.graph.node if n.name == name).input == [pin.output[0]]


@pytest.mark.parametrize("transposed", [False, True])
def test_fp8_weights_are_recomputed_with_torchs_rounding(transposed):
    from pipeline.quant import library_prints, modelopt, plan_quantization
    from pipeline.recipe import QuantizationSpec

    llama = tiny_llama()
    mtq, _ = modelopt()
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    with library_prints(), torch.no_grad():
        mtq.quantize(llama, plan_quantization(QuantizationSpec(format="fp8"), llama).config, lambda m: m(ids))
    module = llama.model.layers[0].self_attn.k_proj  # [32, 64]: not square, so the layout is unambiguous
    amax = module.weight_quantizer._get_amax(module.weight).float()
    want = (module.weight.detach().float() * (448.0 / amax)).clamp(-448, 448).to(torch.float8_e4m3fn)
    want = want.view(torch.uint8).numpy()
    want = want.T.copy() if transposed else want
    stale = np.zeros(want.size, np.uint8).tobytes()  # whatever the ONNX exporter's rounding left
    init = helper.make_tensor("k_fp8", TensorProto.FLOAT8E4M3FN, list(want.shape), stale, raw=True)
    model = graph([helper.make_node("DequantizeLinear", ["k_fp8", "s"], ["k"],
                                    name="/model/model/layers.0/self_attn/k_proj/weight_quantizer/DequantizeLinear")],
                  [], [helper.make_tensor_value_info("k", TensorProto.FLOAT, None)],
                  [init, numpy_helper.from_array(np.array(1.0, np.float32), "s")])
    onnx_export._fp8_weights_as_torch(model, llama)
    got = np.frombuffer(model.graph.initializer[0].raw_data, np.uint8).reshape(want.shape)
    np.testing.assert_array_equal(got, want)

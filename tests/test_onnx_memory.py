"""The ONNX export's memory bound, checked structurally on a small fake-quantized Llama: the tracer serializes no
weight into a protobuf, every post-processing step starts from a graph whose weights are on disk, and the final
graph holds none inline. Each of these was a copy of every weight in memory before (issue 17)."""

import dataclasses

import numpy as np
import onnx
import pytest
import torch

from pipeline import onnx_export


@pytest.fixture(scope="module")
def fp8_model():
    import modelopt.torch.quantization as mtq
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=2, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))

    def forward_loop(m):
        with torch.no_grad():
            m(ids)

    mtq.quantize(model, mtq.FP8_DEFAULT_CFG, forward_loop)
    return model


def test_onnx_export_never_holds_the_weights_in_a_protobuf(fp8_model, tmp_path, monkeypatch):
    weights = sum(p.numel() * p.element_size() for p in fp8_model.parameters())
    serialized = []
    original = torch._C.Graph._export_onnx

    def recording(self, params, *rest):
        proto = original(self, params, *rest)
        serialized.append((len(params), len(proto[0])))
        return proto

    monkeypatch.setattr(torch._C.Graph, "_export_onnx", recording)
    step_inputs = []
    for kind, emitter in list(onnx_export.EMITTERS.items()):
        def process(graph, model, _process=emitter.process, _kind=kind):
            step_inputs.append((_kind, graph.ByteSize()))
            return _process(graph, model)
        monkeypatch.setitem(onnx_export.EMITTERS, kind, dataclasses.replace(emitter, process=process))
    half = onnx_export._half_unquantized

    def half_recording(graph, *args):
        step_inputs.append(("fp16", graph.ByteSize()))
        return half(graph, *args)

    monkeypatch.setattr(onnx_export, "_half_unquantized", half_recording)

    path = tmp_path / "onnx" / "model.onnx"
    path.parent.mkdir()
    details = onnx_export.export(fp8_model, path)

    assert details["quantized"] == ["fp8"]
    # The tracer was handed no initializer, so its protobuf (which Python receives as one bytes object) is the graph.
    assert [count for count, _ in serialized] == [0] and serialized[0][1] < weights / 20
    # Each step (ModelOpt's FP8 exporter, the fp16 storage of unquantized weights) got the weights on disk.
    assert [kind for kind, _ in step_inputs] == ["fp8", "fp16"]
    assert all(size < weights / 20 for _, size in step_inputs), (step_inputs, weights)
    graph = onnx.load(str(path), load_external_data=False)
    assert all(len(init.raw_data) < onnx_export.EXTERNAL_MIN_BYTES for init in graph.graph.initializer)
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx", "model.onnx.data"]  # no raw or spill


def test_the_streamed_onnx_computes_like_the_fake_quantized_model(fp8_model, tmp_path):
    path = tmp_path / "model.onnx"
    onnx_export.export(fp8_model, path)
    config = fp8_model.config
    ids = np.array([[5, 17, 42, 7]])
    empty = np.zeros(onnx_export.kv_shape(config, 1, 0), np.float32)
    logits, _, _ = onnx_export.OrtDecoder(path)(ids, np.ones((1, 4)), empty, empty)
    with torch.no_grad():
        expected = fp8_model(torch.tensor(ids)).logits.numpy()
    assert np.abs(logits - expected).max() < 0.05 * np.abs(expected).max()
    assert (logits[0].argmax(-1) == expected[0].argmax(-1)).mean() >= 0.75

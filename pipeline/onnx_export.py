"""A deployable decoder ONNX with Q/DQ nodes from a ModelOpt fake-quantized model, and an onnxruntime runner for it.

The graph takes (input_ids [B,S], attention_mask [B,P+S], past_key_values.{i}.key/value [B,KVH,P,D] per layer) and
returns (logits, present.{i}.key/value), with dynamic batch, new-token and past lengths (P may be 0), so generation
runs token by token. Names and layout are ONNX Runtime GenAI's, so the same graph is its package's decoder. It is
traced with the legacy exporter, where ModelOpt's quantizer functions emit Q/DQ nodes, then ModelOpt's ONNX
post-processors turn them into standard ops with low-precision weight initializers.
"""

from __future__ import annotations

import collections
import contextlib
import warnings
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.host import large_frees_to_os, release_memory

KV_PAST, KV_PRESENT = "past_key_values.%d.{}", "present.%d.{}"  # ONNX Runtime GenAI's default names


def kv_names(template: str, layers: int) -> list[str]:
    """Per-layer cache tensor names, key then value for each layer."""
    return [template.format(kind) % layer for layer in range(layers) for kind in ("key", "value")]


def io_names(layers: int) -> tuple[list[str], list[str]]:
    return (["input_ids", "attention_mask", *kv_names(KV_PAST, layers)],
            ["logits", *kv_names(KV_PRESENT, layers)])


def dynamic_axes(layers: int) -> dict:
    return {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
            "logits": {0: "batch", 1: "seq"}, **{n: {0: "batch", 2: "past"} for n in kv_names(KV_PAST, layers)},
            **{n: {0: "batch", 2: "total"} for n in kv_names(KV_PRESENT, layers)}}


class Decoder(nn.Module):
    """One decoder step with explicit KV cache tensors. Position ids and the 4D causal+padding mask are computed
    here from attention_mask (left padding works), so transformers' own mask code is never traced."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, *past):
        from transformers import DynamicCache

        new, total = input_ids.shape[1], attention_mask.shape[1]
        position_ids = (torch.cumsum(attention_mask, dim=-1) - 1).clamp(min=0)[:, total - new:]
        query = torch.arange(new, device=input_ids.device) + (total - new)
        key = torch.arange(total, device=input_ids.device)
        allowed = (key[None, :] <= query[:, None])[None, None] & attention_mask.bool()[:, None, None, :]
        dtype = self.model.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
        cache = DynamicCache(config=self.model.config)
        for layer in range(self.model.config.num_hidden_layers):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        return out.logits, *(t for c in out.past_key_values.layers for t in (c.keys, c.values))


def kv_shape(config, batch: int, past: int) -> tuple[int, ...]:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return (config.num_hidden_layers, batch, config.num_key_value_heads, past, head_dim)


def _example(config):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (2, 3), generator=generator)
    cache = torch.randn((2 * config.num_hidden_layers, *kv_shape(config, 2, 4)[1:]), generator=generator)
    return ids, torch.ones(2, 7, dtype=torch.int64), *cache


def quantized_formats(model) -> list[str]:
    """The Q/DQ kinds (EMITTERS) the fake-quantized model holds, in the order they are emitted."""
    from modelopt.torch._deploy.utils import torch_onnx

    return [kind for kind, emitter in EMITTERS.items() if getattr(torch_onnx, emitter.detect)(model)]


def export(model, path: Path) -> dict:
    """Trace `model` to `path` (plus path.data when large) and post-process its Q/DQ; returns a summary."""
    import onnx
    from modelopt.onnx.quantization.qdq_utils import replace_zero_scale_with_smallest_nonzero
    from modelopt.torch.quantization.export_onnx import configure_linear_module_onnx_quantizers

    large_frees_to_os()  # the steps below load, convert and drop one weight after another
    path = path.resolve()
    raw = path.with_suffix(".raw.onnx")
    # Block-quantized weights export as static Q/DQ, activations as dynamic quantization (TensorRT's FP4 recipe).
    with torch.inference_mode(), warnings.catch_warnings(), configure_linear_module_onnx_quantizers(model):
        warnings.simplefilter("ignore")  # tracer warnings about Python-side shape logic: the graph is verified
        layers = model.config.num_hidden_layers
        _trace(Decoder(model).eval(), _example(model.config), raw, input_names=io_names(layers)[0],
               output_names=io_names(layers)[1], dynamic_axes=dynamic_axes(layers), opset_version=19,
               do_constant_folding=True, dynamo=False)
    formats = quantized_formats(model)
    release_memory()  # the tracer's graph and folded constants, before the graph is read back
    # Large initializers stay in raw's external data, read one at a time when a step needs their values (onnx and
    # onnx-graphsurgeon resolve external data against the working directory) and copied to path's data at the end.
    spill = f"{raw.name}.spill"  # in-memory tensors a step made, kept on disk between steps
    with contextlib.chdir(path.parent), _disk_values_read_per_use():
        graph = onnx.load(raw.name, load_external_data=False)
        for kind in formats:
            graph = _to_disk(EMITTERS[kind].process(graph, model), spill)
        for node in graph.graph.node:  # the FP8 exporter renames TRT ops but keeps their custom domain
            if node.domain == "trt" and node.op_type in ("QuantizeLinear", "DequantizeLinear"):
                node.domain = ""
        stale = {n.output[0] for n in graph.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")}
        kept = [vi for vi in graph.graph.value_info if vi.name not in stale]  # types left by the custom ops
        del graph.graph.value_info[:]
        graph.graph.value_info.extend(kept)
        release_memory()  # the graphs each step above replaced
        graph = replace_zero_scale_with_smallest_nonzero(graph)  # TensorRT wants positive scales
        graph = _to_disk(_half_unquantized(graph), spill)
        needed = [EMITTERS[kind].ir_version for kind in formats if EMITTERS[kind].ir_version]
        graph.ir_version = max(needed) if needed else min(graph.ir_version, 10)
        release_memory()
        # Weights stream to external data, each tensor's bytes dropped from the graph once written: serializing
        # them into the protobuf would hold one more copy of every weight (and is impossible above 2 GB).
        _save_external(graph, path)
    raw.unlink()
    for leftover in path.parent.glob(f"{raw.name}*"):
        leftover.unlink()
    return {"quantized": formats, "external_data": True, "ops": qdq_histogram(path)}


EXTERNAL_MIN_BYTES = 1024  # initializers this large go to external data (onnx.save_model's size_threshold)

_ONNX_TYPES = {torch.float32: 1, torch.uint8: 2, torch.int8: 3, torch.int32: 6, torch.int64: 7, torch.bool: 9,
               torch.float16: 10, torch.float64: 11, torch.bfloat16: 16, torch.float8_e4m3fn: 17}  # TensorProto


def _trace(module, args, path: Path, **options) -> None:
    """torch.onnx.export (legacy tracer) writing only the graph: the exporter would serialize every initializer
    (the weights and the constants it folded) into one protobuf string and copy that into Python, two copies of
    the weights beside the model. Here it serializes none; `_write_initializers` streams them to external data,
    tensor by tensor, straight from the tensors the tracer collected (the model's own parameters, not copies)."""
    collected = {}
    graph_type = torch._C.Graph
    original = graph_type._export_onnx

    def graph_only(self, params, *rest):
        collected.update(params)
        return original(self, {}, *rest)  # without initializers the exporter lists them as graph inputs

    graph_type._export_onnx = graph_only
    try:
        torch.onnx.export(module, args, str(path), **options)
    finally:
        graph_type._export_onnx = original
    _write_initializers(path, collected)


def _write_initializers(path: Path, tensors: dict) -> None:
    """Turn the graph inputs at `path` named in `tensors` into initializers, the large ones written to
    `path.data` one at a time (the protobuf never holds their bytes)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False)
    inputs = [i for i in graph.graph.input if i.name not in tensors]
    names = [i.name for i in graph.graph.input if i.name in tensors]
    del graph.graph.input[:]
    graph.graph.input.extend(inputs)
    data = path.with_name(f"{path.name}.data")
    with open(data, "wb") as out:
        for name in names:
            tensor = tensors[name].detach()
            init = graph.graph.initializer.add()
            init.name, init.data_type = name, _ONNX_TYPES[tensor.dtype]
            init.dims.extend(tensor.shape)
            raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()  # the tensor's own bytes, no copy
            if raw.nbytes < EXTERNAL_MIN_BYTES:
                init.raw_data = raw.tobytes()
                continue
            _external(init, data.name, out.tell(), raw.nbytes)
            out.write(memoryview(raw))
    onnx.save_model(graph, str(path))


def _external(tensor, location: str, offset: int, length: int) -> None:
    import onnx

    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.ClearField("raw_data")


SPILL_MIN_BYTES = 1 << 16  # in-memory initializers this large are moved to disk between export steps


def _to_disk(graph, spill: str):
    """Move the large in-memory initializers a step made (or loaded) to the external file `spill` (relative to the
    working directory), so the next step's copies of the graph (onnx-graphsurgeon copies it twice on export) do
    not copy weights. Also drops the EXTERNAL mark onnx-graphsurgeon leaves on a tensor whose values a step
    replaced with in-memory bytes (onnx would otherwise read a file the tensor no longer names)."""
    import onnx

    with open(spill, "ab") as out:
        for init in graph.graph.initializer:
            if not init.HasField("raw_data"):
                continue
            if init.data_location == onnx.TensorProto.EXTERNAL:
                init.data_location = onnx.TensorProto.DEFAULT
                del init.external_data[:]
            if len(init.raw_data) >= SPILL_MIN_BYTES:
                offset = out.tell()
                out.write(init.raw_data)
                _external(init, spill, offset, out.tell() - offset)
    release_memory()
    return graph


@contextlib.contextmanager
def _disk_values_read_per_use():
    """onnx-graphsurgeon reads a lazily loaded tensor's values on first use and keeps them in the graph: a pass
    that reads every weight once (ModelOpt's weight compression) then holds all of them, in fp32, until the graph
    goes. Within this block a tensor still on disk is read at each use instead, read-only, so a pass that changed
    one in place would fail loudly rather than lose the change."""
    from onnx.external_data_helper import uses_external_data
    from onnx_graphsurgeon.ir.tensor import Constant, LazyValues

    cached = Constant.values

    def values(self):
        lazy = self._values
        if isinstance(lazy, LazyValues) and uses_external_data(lazy.tensor):
            array = lazy.load()
            array.flags.writeable = False
            return array
        return cached.fget(self)

    Constant.values = property(values, cached.fset)
    try:
        yield
    finally:
        Constant.values = cached


def _save_external(graph, path: Path) -> None:
    """Save `graph` to `path` with every initializer of EXTERNAL_MIN_BYTES or more in `path.data`: in-memory ones
    written and dropped, those still in another file's external data (read relative to the working directory)
    copied over one at a time."""
    import onnx
    from onnx.external_data_helper import _read_external_data_bytes, uses_external_data

    location = f"{path.name}.data"
    with open(path.with_name(location), "wb") as out:
        for init in graph.graph.initializer:
            if init.HasField("raw_data"):
                if len(init.raw_data) < EXTERNAL_MIN_BYTES:
                    continue
                raw = init.raw_data
            elif uses_external_data(init):
                raw = _read_external_data_bytes(init, "")
            else:
                continue
            offset = out.tell()
            out.write(raw)
            _external(init, location, offset, len(raw))
            del raw
    onnx.save_model(graph, str(path))


def _emit_int4(graph, model):
    from modelopt.onnx.export import INT4QuantExporter
    from modelopt.onnx.utils import infer_shapes

    # The exporter's last stage expects an fp16 graph (a Cast after each pre-quant scale): run the first three.
    graph = INT4QuantExporter.compress_weights(INT4QuantExporter.compute_scales(
        INT4QuantExporter.pre_process(infer_shapes(graph))))
    for opset in graph.opset_import:  # block-wise DequantizeLinear (INT4 input, block_size) is opset 21
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, 21)
    return graph


def _emit_fp8(graph, model):
    from modelopt.onnx.export import FP8QuantExporter

    graph = FP8QuantExporter.process_model(graph)
    _fp8_weights_as_torch(graph, model)
    return graph


def _emit_nvfp4(graph, model):
    from modelopt.onnx.export import NVFP4QuantExporter
    from modelopt.onnx.utils import topologically_sort_graph_nodes

    graph = NVFP4QuantExporter.process_model(graph)  # FP4 weights + FP8 block scales, opset 23
    _float_after_half_matmuls(graph)
    _static_fp4_blocks(graph, model)
    topologically_sort_graph_nodes(graph.graph)  # both append nodes at the end
    return graph


def _emit_int8(graph, model):
    return _int8_weights(graph)  # ModelOpt 0.47's INT8 exporter leaves fp32 weights behind a Q/DQ pair


@dataclass(frozen=True)
class Emitter:
    """How one Q/DQ kind becomes standard ONNX: ModelOpt's check that finds it in a model, the post-processing of
    the traced graph, and the ONNX IR version its tensor types need."""

    detect: str  # a function of modelopt.torch._deploy.utils.torch_onnx
    process: Callable  # (graph, model) -> graph
    ir_version: int | None = None


# Q/DQ kind -> its emitter, in the order they are applied. A format names its kind (QuantFormat.onnx).
EMITTERS: dict[str, Emitter] = {
    "int4": Emitter("is_int4_quantized", _emit_int4),
    "fp8": Emitter("is_fp8_quantized", _emit_fp8),
    "nvfp4": Emitter("is_fp4_quantized", _emit_nvfp4, ir_version=11),  # FLOAT4E2M1 needs IR 11
    "int8": Emitter("is_int8_quantized", _emit_int8),
}


def _fp8_weights_as_torch(graph, model) -> None:
    """Recompute FP8 weight initializers with torch's formula (w * 448/amax): the ONNX exporter divides by
    amax/448, which rounds about 0.2% of bf16-born weights one FP8 step the other way. Bit-exact with the model."""
    import onnx

    modules = dict(model.named_modules())
    initializers = {i.name: i for i in graph.graph.initializer}
    for node in graph.graph.node:
        init = initializers.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if init is None or init.data_type != onnx.TensorProto.FLOAT8E4M3FN or "/weight_quantizer" not in node.name:
            continue
        name = node.name.split("/weight_quantizer")[0].strip("/").replace("/", ".").removeprefix("model.")
        module = modules.get(name)
        if module is None:
            continue
        with torch.no_grad():
            amax = module.weight_quantizer._get_amax(module.weight).to(torch.float32)
            fp8 = (module.weight.float() * (448.0 / amax)).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
        current = np.frombuffer(init.raw_data, dtype=np.uint8).reshape(list(init.dims))
        candidate = fp8.view(torch.uint8).numpy()
        if list(candidate.shape) != list(init.dims) or (
                candidate.shape[0] == candidate.shape[1] and (candidate != current).sum() > (candidate.T != current).sum()):
            candidate = candidate.T
        init.raw_data = np.ascontiguousarray(candidate).tobytes()


def _float_after_half_matmuls(graph) -> None:
    """ModelOpt's NVFP4 exporter casts each FP4 MatMul's inputs to fp16, assuming an fp16 graph: cast its output
    back to fp32, so the rest of this fp32 graph (and its fp32 inputs and outputs) is unchanged."""
    import onnx

    produced_by_cast = {n.output[0]: n for n in graph.graph.node if n.op_type == "Cast"}
    casts = []
    for node in graph.graph.node:
        if node.op_type != "MatMul" or not all(
                produced_by_cast.get(i) is not None and produced_by_cast[i].attribute[0].i == onnx.TensorProto.FLOAT16
                for i in node.input):
            continue
        half = f"{node.output[0]}_f16"
        casts.append(onnx.helper.make_node("Cast", [half], [node.output[0]], to=onnx.TensorProto.FLOAT))
        node.output[0] = half
    graph.graph.node.extend(casts)


def _static_fp4_blocks(graph, model) -> None:
    """TensorRT needs the blocked (last) axis of a dynamically FP4-quantized activation known at build time, but
    the attention output's width comes from a Reshape to -1: pin it with Reshape(x, [0, 0, in_features])."""
    import onnx

    modules = dict(model.named_modules())
    reshaped = {n.output[0] for n in graph.graph.node if n.op_type == "Reshape"}
    pinned = []
    for node in graph.graph.node:
        if node.op_type != "TRT_FP4DynamicQuantize" or node.input[0] not in reshaped:
            continue
        name = node.name.split("/input_quantizer")[0].strip("/").replace("/", ".").removeprefix("model.")
        module = modules.get(name)
        if module is None or not hasattr(module, "in_features"):
            continue
        shape = f"{node.name}/static_shape"
        graph.graph.initializer.append(onnx.numpy_helper.from_array(
            np.array([0, 0, module.in_features], dtype=np.int64), shape))
        static = f"{node.input[0]}/static"
        pinned.append(onnx.helper.make_node("Reshape", [node.input[0], shape], [static], name=f"{node.name}/pin"))
        node.input[0] = static
    graph.graph.node.extend(pinned)


def _int8_weights(graph):
    """Fold each weight QuantizeLinear into an int8 initializer (and a following Transpose into its axis)."""
    import onnx_graphsurgeon as gs

    g = gs.import_onnx(graph)
    g.fold_constants().cleanup().toposort()
    for node in list(g.nodes):
        if node.op != "QuantizeLinear" or not isinstance(node.inputs[0], gs.Constant):
            continue
        scale = node.inputs[1]
        zero = node.inputs[2] if len(node.inputs) > 2 else None
        if not isinstance(scale, gs.Constant) or (zero is not None and zero.values.dtype != np.int8):
            continue
        weight = node.inputs[0].values.astype(np.float32)
        axis = node.attrs.get("axis", 1)
        shape = [1] * weight.ndim
        if scale.values.size > 1:
            shape[axis] = scale.values.size
        s = scale.values.astype(np.float32).reshape(shape if scale.values.size > 1 else ())
        q = np.clip(np.round(weight / s), -128, 127).astype(np.int8)
        dequant = node.outputs[0].outputs[0]
        consumers = list(dequant.outputs[0].outputs)
        if (len(consumers) == 1 and consumers[0].op == "Transpose" and weight.ndim == 2
                and all(c.op == "MatMul" for c in consumers[0].outputs[0].outputs)):
            transpose = consumers[0]
            perm = transpose.attrs.get("perm", [1, 0])
            q = np.ascontiguousarray(q.transpose(perm))
            dequant.attrs["axis"] = perm.index(axis % weight.ndim)
            out = transpose.outputs[0]
            for consumer in list(out.outputs):
                consumer.inputs[[i for i, t in enumerate(consumer.inputs) if t is out][0]] = dequant.outputs[0]
            transpose.outputs.clear()
            dequant.outputs[0].shape = list(q.shape)
        dequant.outputs[0].dtype = np.float32
        dequant.inputs[0] = gs.Constant(node.inputs[0].name + "_int8", q)
        node.outputs.clear()
    g.cleanup().toposort()
    return gs.export_onnx(g)


def _half_unquantized(graph, min_elements: int = 1 << 16):
    """Store the weights left unquantized (embedding, lm_head, excluded layers) in fp16, as the checkpoints do:
    Gather and MatMul run on fp16 weights between Casts, so the fp32 graph around them is unchanged."""
    import onnx
    import onnx_graphsurgeon as gs

    g = gs.import_onnx(graph)
    for node in list(g.nodes):
        position = {"Gather": 0, "MatMul": 1}.get(node.op)
        weight = node.inputs[position] if position is not None else None
        if not (isinstance(weight, gs.Constant) and weight.dtype == np.float32
                and np.prod(weight.shape) >= min_elements):  # read from the tensor's type, not its values
            continue
        node.inputs[position] = gs.Constant(f"{weight.name}_fp16", weight.values.astype(np.float16))
        if node.op == "MatMul":
            activation = node.inputs[0]
            half = gs.Variable(f"{activation.name}_as_fp16", dtype=np.float16)  # unique beside an output_fp16
            g.nodes.append(gs.Node("Cast", inputs=[activation], outputs=[half],
                                   attrs={"to": onnx.TensorProto.FLOAT16}))
            node.inputs[0] = half
        output = node.outputs[0]
        node.outputs[0] = gs.Variable(f"{output.name}_fp16", dtype=np.float16)
        g.nodes.append(gs.Node("Cast", inputs=[node.outputs[0]], outputs=[output],
                               attrs={"to": onnx.TensorProto.FLOAT}))
    g.cleanup().toposort()
    return gs.export_onnx(g)


def qdq_histogram(path: Path) -> dict:
    """Q/DQ nodes by kind (weight or activation) and weight type: what a reader checks first."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False)
    initializers = {i.name: i.data_type for i in graph.graph.initializer}
    counts = collections.Counter()
    for node in graph.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            source = node.input[0]
            kind = f"weight:{onnx.TensorProto.DataType.Name(initializers[source])}" if source in initializers else "act"
            counts[f"{node.op_type}[{kind}]"] += 1
    return dict(counts)


def layer_feeds(past_key: np.ndarray, past_value: np.ndarray) -> dict:
    """The graph's per-layer cache inputs from stacked [L,B,KVH,P,D] arrays."""
    names = kv_names(KV_PAST, len(past_key))
    return {name: (past_key, past_value)[i % 2][i // 2] for i, name in enumerate(names)}


def stacked(presents: list) -> tuple[np.ndarray, np.ndarray]:
    """Stacked [L,B,KVH,T,D] key and value caches from the graph's per-layer outputs (key, value, key, ...)."""
    return np.stack(presents[0::2]), np.stack(presents[1::2])


class StepDecoder:
    """A runtime for the exported decoder graph (onnxruntime, or a TensorRT-RTX engine): subclasses map
    (input_ids, attention_mask, past_key, past_value) numpy arrays, the caches stacked over layers, to (logits,
    present_key, present_value)."""

    def __call__(self, ids: np.ndarray, mask: np.ndarray, past_key: np.ndarray, past_value: np.ndarray):
        raise NotImplementedError

    def greedy(self, prompt: np.ndarray, cache_shape: tuple, stop: Collection[int] = ()) -> Iterator[tuple]:
        """The prompt through an empty cache of `cache_shape` ([L,1,KVH,0,D]), then greedy tokens fed back one by
        one, each yielded with the logits it was picked from, until a `stop` token (or the caller stops)."""
        empty = np.zeros(cache_shape, np.float32)
        logits, key, value = self(prompt[None], np.ones((1, len(prompt))), empty, empty)
        while True:
            token = int(logits[0, -1].argmax())
            yield logits[0], token
            if token in stop:
                return
            logits, key, value = self(np.array([[token]]), np.ones((1, key.shape[3] + 1)), key, value)

    def prefill_then_decode(self, config, prompt: np.ndarray, steps: int,
                            progress: Callable[[range], Iterable] = iter) -> tuple[np.ndarray, list[int]]:
        """Logits of the prompt (past length 0), then `steps` greedy tokens fed back one by one through the cache
        (`progress` wraps the steps, e.g. in a progress bar)."""
        greedy = self.greedy(prompt, kv_shape(config, 1, 0))
        picked = [next(greedy)]  # the prompt's logits and the first token
        picked += [next(greedy) for _ in progress(range(steps - 1))]
        return picked[0][0], [token for _, token in picked][:steps]


class OrtDecoder(StepDecoder):
    """The exported decoder in onnxruntime on CPU."""

    def __init__(self, path: Path, threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        # ORT's fused INT4 MatMul defaults to int8 activations; level 0 keeps fp32 compute, as the model does.
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, ids: np.ndarray, mask: np.ndarray, past_key: np.ndarray, past_value: np.ndarray):
        feeds = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64),
                 **layer_feeds(past_key.astype(np.float32), past_value.astype(np.float32))}
        logits, *presents = self.session.run(None, feeds)
        return logits, *stacked(presents)

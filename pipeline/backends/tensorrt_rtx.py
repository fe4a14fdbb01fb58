"""TensorRT-RTX: engines for Ada (SM89) and Blackwell RTX (SM120/121) compiled ahead of time from the exported
Q/DQ ONNX, on any host (no GPU needed to build; running one needs a GPU of its architecture)."""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path
from typing import Literal

from pipeline import host
from pipeline.backends import Builder, registry
from pipeline.facts import Facts

ENGINE_FILE = "model.engine"
ENGINE_MAGIC = b"vtrt"  # the first bytes of a serialized TensorRT-RTX engine

_logger = None


def _trt_logger():
    """TensorRT keeps the first logger it is given for the whole process: make one and reuse it."""
    global _logger
    import tensorrt_rtx as trt

    if _logger is None:
        _logger = trt.Logger(trt.Logger.ERROR)
    return _logger


class TensorRTRTXFacts(Facts):
    """A TensorRT-RTX engine compiled ahead of time: for which GPUs, with which profile, and the Q/DQ layers the
    builder saw."""

    backend: Literal["tensorrt-rtx"]
    engine_bytes: int
    tensorrt_rtx: str
    compute_capability: str  # e.g. "SM89,SM120"
    build_seconds: float
    profile: dict[str, tuple[int, int, int]]  # min, opt, max of batch, new tokens and past tokens
    quantize_layers: dict[str, int]
    checks: list[str]
    not_checked: str


class TensorRTRTX(Builder):
    """Builds ahead of time on any host: the target's compute capability is in the key, not this host's GPU."""

    info = registry()["tensorrt-rtx"]
    libraries = ("tensorrt-rtx",)
    Facts = TensorRTRTXFacts

    def missing(self, recipe) -> str | None:
        if not host.has_module("tensorrt_rtx"):
            return "build.backend tensorrt-rtx needs the tensorrt-rtx package: pip install 'quantpipe[rtx]'"
        return None

    def build(self, ctx, tool_cache: Path) -> dict:
        from transformers import AutoConfig

        from pipeline.onnx_export import io_names

        model = AutoConfig.from_pretrained(ctx.input("load") / "model")
        graph = next((ctx.input("export") / self.info.export).glob("*.onnx"))  # the decoder (weights may sit beside it)
        metadata = compile_engine(graph, model, ctx.recipe.build,
                                  [int(gpu.removeprefix("sm_")) for gpu in ctx.recipe.gpus], ctx.out / ENGINE_FILE)
        (ctx.out / "engine.json").write_text(json.dumps(
            {"compute_capability": metadata["compute_capability"], "profile": metadata["profile"],
             "inputs": io_names(model.num_hidden_layers)[0]}, indent=2))
        return metadata

    def runnable_here(self, metadata: dict) -> str | None:
        return runnable_here(metadata)

    def decoder(self, folder: Path):
        return engine_decoder(folder / ENGINE_FILE)


def compile_engine(onnx_path: Path, model_config, spec, sms: list[int], engine_path: Path) -> dict:
    """Parse the ONNX decoder (from its file: the parser reads the external weights itself) and write one
    serialized engine that runs on each of `sms` (no GPU needed) to `engine_path`. The parser and network, which
    hold the weights, are freed before the engine is written, and the engine goes to the file from TensorRT's own
    buffer (no Python copy)."""
    import tensorrt_rtx as trt

    from pipeline.onnx_export import KV_PAST, kv_names, kv_shape

    started = time.time()
    builder = trt.Builder(_trt_logger())
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, _trt_logger())
    if not parser.parse_from_file(str(onnx_path)):
        errors = " | ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT-RTX could not parse the exported ONNX: {errors[:500]}")
    layers = _quantize_layers(network)
    config = builder.create_builder_config()
    layers_n, _, kv_heads, _, head_dim = kv_shape(model_config, 1, 0)
    profile = builder.create_optimization_profile()
    batch, seq, past = (1, 1, spec.max_batch_size), (1, 1, spec.max_input_len), (0, 0, spec.max_seq_len - 1)
    profile.set_shape("input_ids", *[(b, s) for b, s in zip(batch, seq)])
    profile.set_shape("attention_mask", *[(b, p + s) for b, s, p in zip(batch, seq, past)])
    for name in kv_names(KV_PAST, layers_n):
        profile.set_shape(name, *[(b, kv_heads, p, head_dim) for b, p in zip(batch, past)])
    config.add_optimization_profile(profile)
    config.num_compute_capabilities = len(sms)
    for index, sm in enumerate(sms):
        config.set_compute_capability(getattr(trt.ComputeCapability, f"SM{sm}"), index)
    serialized = builder.build_serialized_network(network, config)
    del parser, network, config, profile, builder
    host.release_memory()
    if serialized is None:
        raise RuntimeError("TensorRT-RTX returned no engine; rerun with -vv for the builder log")
    engine = memoryview(serialized)
    with open(engine_path, "wb") as out:
        out.write(engine)
    magic, size = bytes(engine[:4]), engine.nbytes
    del engine, serialized
    checks = ["ONNX parsed", "engine serialized", f"header magic {ENGINE_MAGIC!r}: {magic == ENGINE_MAGIC}"]
    return {"backend": "tensorrt-rtx", "tensorrt_rtx": trt.__version__,
                    "compute_capability": ",".join(f"SM{sm}" for sm in sms), "engine_bytes": size,
                    "build_seconds": round(time.time() - started, 2),
                    "profile": {"batch": batch, "new_tokens": seq, "past_tokens": past}, "quantize_layers": layers,
                    "checks": checks, "not_checked": "running the engine needs an RTX-class GPU of its architecture"}


def engine_decoder(path: Path):
    """The engine at `path` as a StepDecoder on this host's GPU (torch CUDA tensors in and out)."""
    import tensorrt_rtx as trt
    import torch

    from pipeline.onnx_export import StepDecoder, io_names, layer_feeds, stacked

    dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT64: torch.int64,
              trt.DataType.INT32: torch.int32}

    class EngineDecoder(StepDecoder):
        def __init__(self) -> None:
            self.engine = trt.Runtime(_trt_logger()).deserialize_cuda_engine(path.read_bytes())
            if self.engine is None:
                raise RuntimeError(f"TensorRT-RTX could not load {path} on this GPU; rerun with -vv for its log")
            self.context = self.engine.create_execution_context()
            self.stream = torch.cuda.Stream()

        def __call__(self, ids, mask, past_key, past_value):
            feeds = {"input_ids": ids, "attention_mask": mask, **layer_feeds(past_key, past_value)}
            held = []  # keep every device buffer alive until the engine has run
            for name, array in feeds.items():
                tensor = torch.as_tensor(array).to("cuda", dtypes[self.engine.get_tensor_dtype(name)]).contiguous()
                self.context.set_input_shape(name, tuple(tensor.shape))
                held.append(tensor if tensor.numel() else torch.empty(1, dtype=tensor.dtype, device="cuda"))
                self.context.set_tensor_address(name, held[-1].data_ptr())
            outputs, output_names = {}, io_names(len(past_key))[1]
            for name in output_names:
                shape = tuple(self.context.get_tensor_shape(name))
                outputs[name] = torch.empty(shape, dtype=dtypes[self.engine.get_tensor_dtype(name)], device="cuda")
                self.context.set_tensor_address(name, outputs[name].data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT-RTX engine execution failed; rerun with -vv for its log")
            self.stream.synchronize()
            logits, *presents = (outputs[name].float().cpu().numpy() for name in output_names)
            return logits, *stacked(presents)

    return EngineDecoder()


def runnable_here(build_metadata: dict) -> str | None:
    """The name of a GPU on this host the engine was built for, when the runtime can use it; else None."""
    if not host.has_module("tensorrt_rtx") or not host.has_module("torch"):
        return None
    import torch

    built_for = set(build_metadata.get("compute_capability", "").split(","))
    match = next((g for g in host.gpus() if f"SM{g.sm}" in built_for), None)
    return f"{match.name} (sm_{match.sm})" if match and torch.cuda.is_available() else None


def _quantize_layers(network) -> dict:
    """The network's Q/DQ layers by type and data types: proof the low precision reached TensorRT."""
    counts = collections.Counter()
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        kind = str(layer.type).split(".")[-1]
        if kind in ("QUANTIZE", "DEQUANTIZE", "DYNAMIC_QUANTIZE"):
            source = str(layer.get_input(0).dtype).split(".")[-1]
            result = str(layer.get_output(0).dtype).split(".")[-1]
            counts[f"{kind}:{source}->{result}"] += 1
    return dict(counts)

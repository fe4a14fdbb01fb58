"""Read exported checkpoints and dequantize them by hand, because plain transformers loads them wrong.

Both layouts (unified HF and TensorRT-LLM) become one mapping of Hugging Face names -> effective float weights
(pre-quant scales folded in, dequantized on access), which verify swaps into the calibrated model run as a plain one
and compares with it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline import formats
from pipeline.formats.base import WeightCodec
from pipeline.modeling import weight_files


@dataclass(frozen=True)
class Layout:
    """Tensor naming of one checkpoint format: suffixes of the weight's companions."""

    weight_scale: str
    weight_scale_2: str
    input_scale: str
    pre_quant_scale: str


HF = Layout("weight_scale", "weight_scale_2", "input_scale", "pre_quant_scale")
TRTLLM = Layout("weights_scaling_factor", "weights_scaling_factor_2", "activation_scaling_factor",
                "prequant_scaling_factor")

# Per-layer formats (AutoQuantize): the checkpoint names each quantized layer's own quant_algo.
MIXED = "MIXED_PRECISION"
TRTLLM_LAYERS = "quant_cfg.json"  # where a mixed-precision TensorRT-LLM checkpoint lists them


def read_config(folder: Path) -> dict:
    """quant_algo, kv cache algo, group size and layout of an exported checkpoint."""
    config = json.loads((folder / "config.json").read_text())
    if (folder / "hf_quant_config.json").is_file():
        q = json.loads((folder / "hf_quant_config.json").read_text())["quantization"]
        return {"layout": "hf", "quant_algo": q.get("quant_algo"), "kv_cache_quant_algo": q.get("kv_cache_quant_algo"),
                "group_size": q.get("group_size"), "exclude_modules": q.get("exclude_modules", []), "config": config,
                "layer_algos": _layer_algos(q)}
    q = config.get("quantization", {})
    return {"layout": "trtllm", "quant_algo": q.get("quant_algo"), "kv_cache_quant_algo": q.get("kv_cache_quant_algo"),
            "group_size": q.get("group_size"), "exclude_modules": q.get("exclude_modules", []), "config": config,
            "mapping": config.get("mapping", {}), "layer_algos": _layer_algos(
                json.loads((folder / TRTLLM_LAYERS).read_text()) if (folder / TRTLLM_LAYERS).is_file() else q)}


def _layer_algos(quant: dict) -> dict[str, str]:
    """Module -> quant_algo for a MIXED_PRECISION checkpoint ({} for one format)."""
    return {name: layer["quant_algo"] for name, layer in (quant.get("quantized_layers") or {}).items()}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, one file or shards with an index."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(set(weight_files(folder).values())):
        tensors.update(load_file(file))
    return tensors


class EffectiveWeights(Mapping):
    """HF name -> effective float weight of a checkpoint, dequantized when asked for and not kept: only the
    checkpoint's own (compact) tensors stay in memory, never a float copy of the whole model."""

    def __init__(self, makers: dict[str, Callable[[], torch.Tensor]]) -> None:
        self._makers = makers

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._makers[name]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._makers)

    def __len__(self) -> int:
        return len(self._makers)


def effective_weights(folder: Path, shapes: dict[str, tuple[int, int]]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """HF-named float weights of a checkpoint (quantized ones dequantized, pre-quant scales folded in), and the
    structure problems found on the way. `shapes` maps each HF linear name to its original (out, in)."""
    weights, problems = dequantized(folder, shapes)
    return dict(weights.items()), problems


def dequantized(folder: Path, shapes: dict[str, tuple[int, int]]) -> tuple[EffectiveWeights, list[str]]:
    """effective_weights, dequantized on access (each weight's shape is checked here on the meta device, where
    dequantizing computes nothing, or by dequantizing it once where a codec cannot run there)."""
    info = read_config(folder)
    tensors = _tensors(folder)
    layer_algos = info["layer_algos"]
    if info["layout"] == "trtllm":
        tensors = _trtllm_to_hf(tensors, info["config"])
        layer_algos = _trtllm_layer_algos(layer_algos, info["config"])
        layout = TRTLLM
    else:
        layout = HF
    algo = info["quant_algo"]
    known = formats.by_quant_algo(algo) is not None or (
        algo == MIXED and all(formats.by_quant_algo(a) for a in layer_algos.values()))
    problems: list[str] = [] if known else [f"unknown quant_algo {algo!r}"]
    out: dict[str, Callable[[], torch.Tensor]] = {}
    for name, tensor in tensors.items():
        module = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and f"{module}.{layout.weight_scale}" in tensors:
            algo = layer_algos.get(module, info["quant_algo"])
            fmt = formats.by_quant_algo(algo)
            codec = fmt.weights if fmt else WeightCodec((), (), None)
            expected_dtypes = tuple(getattr(torch, name) for name in codec.dtypes)
            if tensor.dtype not in expected_dtypes:
                problems.append(f"{name}: dtype {tensor.dtype}, {algo} expects {expected_dtypes[:1] or 'no scales'}")
                continue
            missing = [c for c in codec.companions if f"{module}.{getattr(layout, c)}" not in tensors]
            if missing:
                problems.append(f"{module}: missing {', '.join(getattr(layout, c) for c in missing)}")
                continue
            make = functools.partial(_dequantize, codec, tensor, tensors[f"{module}.{layout.weight_scale}"],
                                     tensors.get(f"{module}.{layout.weight_scale_2}"), shapes[module][1],
                                     tensors.get(f"{module}.{layout.pre_quant_scale}"))
            shape = _dequantized_shape(make)
            if shape != tuple(shapes[module]):
                problems.append(f"{name}: dequantizes to {shape}, model has {tuple(shapes[module])}")
                continue
            out[name] = make
        elif not any(name.endswith(f".{getattr(layout, f)}") for f in layout.__dataclass_fields__):
            out[name] = tensor.float
    if "lm_head.weight" not in out and "model.embed_tokens.weight" in out:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]  # tied embeddings are stored once
    for module in shapes:
        if f"{module}.weight" not in out:
            problems.append(f"{module}.weight: not in the checkpoint")
    return EffectiveWeights(out), problems


def _dequantized_shape(make: functools.partial) -> tuple[int, ...]:
    try:
        meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in make.args]
        return tuple(make.func(*meta).shape)
    except (NotImplementedError, RuntimeError, TypeError, ValueError, IndexError):
        return tuple(make().shape)


def _dequantize(codec: WeightCodec, tensor, scale, scale_2, in_features: int, pre_quant_scale) -> torch.Tensor:
    weight = codec.dequantize(tensor, scale, scale_2, in_features)
    return weight * pre_quant_scale.float().reshape(1, -1) if pre_quant_scale is not None else weight


# TensorRT-LLM decoder names -> Hugging Face Llama names (per layer); qkv is split by head counts.
_TRTLLM_LAYER = {
    "attention.dense": "self_attn.o_proj",
    "mlp.fc": "mlp.gate_proj",
    "mlp.gate": "mlp.up_proj",
    "mlp.proj": "mlp.down_proj",
    "input_layernorm": "input_layernorm",
    "post_layernorm": "post_attention_layernorm",
}
_TRTLLM_TOP = {"transformer.vocab_embedding": "model.embed_tokens", "transformer.ln_f": "model.norm",
               "lm_head": "lm_head"}


def _trtllm_to_hf(tensors: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Rename a single-rank TensorRT-LLM checkpoint to HF names, splitting fused qkv tensors."""
    head = config["head_size"]
    q_rows, kv_rows = config["num_attention_heads"] * head, config["num_key_value_heads"] * head
    renamed: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        module, _, leaf = name.rpartition(".")
        if module in _TRTLLM_TOP:
            renamed[f"{_TRTLLM_TOP[module]}.{leaf}"] = tensor
            continue
        prefix, _, rest = module.partition(".layers.")
        index, _, sub = rest.partition(".")
        hf_layer = f"model.layers.{index}"
        if sub == "attention.qkv":
            renamed.update(_split_qkv(hf_layer, leaf, tensor, q_rows, kv_rows))
        elif sub in _TRTLLM_LAYER:
            renamed[f"{hf_layer}.{_TRTLLM_LAYER[sub]}.{leaf}"] = tensor
    return renamed


def _trtllm_layer_algos(layer_algos: dict[str, str], config: dict) -> dict[str, str]:
    """Per-layer quant_algo under HF names, renamed exactly as the tensors are (a fused qkv names q, k and v)."""
    algos = sorted(set(layer_algos.values()))
    codes = {f"{module}.weight": torch.tensor(algos.index(algo)) for module, algo in layer_algos.items()}
    return {name.removesuffix(".weight"): algos[int(code)] for name, code in _trtllm_to_hf(codes, config).items()}


def _split_qkv(layer: str, leaf: str, tensor: torch.Tensor, q_rows: int, kv_rows: int) -> dict[str, torch.Tensor]:
    names = [f"{layer}.self_attn.{p}.{leaf}" for p in ("q_proj", "k_proj", "v_proj")]
    total = q_rows + 2 * kv_rows
    # A pre-quant scale runs along the input (hidden) axis, whose length can equal total // 2 (KV heads = heads / 2).
    if leaf != TRTLLM.pre_quant_scale and tensor.dim() >= 1 and tensor.shape[0] in (total, total // 2) \
            and tensor.numel() > 1:
        factor = tensor.shape[0] / total  # int4 weights pack two rows per byte row
        sizes = [int(q_rows * factor), int(kv_rows * factor), int(kv_rows * factor)]
        return dict(zip(names, torch.split(tensor, sizes, dim=0)))
    return dict.fromkeys(names, tensor)  # per-tensor scales and pre-quant scales are shared by q, k and v


def onnx_fp4_weights(path: Path) -> dict[str, torch.Tensor]:
    """Effective weights of an NVFP4 ONNX decoder: each FP4 initializer times its FP8 block scales times their
    fp32 scale (TensorRT's two-DequantizeLinear form), under the Hugging Face name of the weight."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    initializers = {i.name: i for i in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    weights = {}
    for node in graph.node:
        packed = initializers.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if packed is None or packed.data_type != onnx.TensorProto.FLOAT4E2M1:
            continue
        scales = producers[node.input[1]]  # DequantizeLinear(FP8 block scales, fp32 scale)
        block_scale = (numpy_helper.to_array(initializers[scales.input[0]]).astype(np.float32)
                       * numpy_helper.to_array(initializers[scales.input[1]]).astype(np.float32))
        block = next(a.i for a in node.attribute if a.name == "block_size")
        values = numpy_helper.to_array(packed).astype(np.float32)
        blocks = values.reshape(*values.shape[:-1], -1, block) * block_scale[..., None]
        weights[packed.name.removeprefix("model.").removesuffix("_f4")] = torch.from_numpy(blocks.reshape(values.shape))
    return weights

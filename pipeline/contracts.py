"""What the serving engines' ModelOpt loaders require of a unified HF checkpoint, as data, and the check verify runs
on any host (no GPU, no engine).

Sources (checked 2026-11):
- vLLM `model_executor/layers/quantization/modelopt.py`: ModelOptFp8LinearMethod registers weight, weight_scale and
  input_scale; ModelOptNvFp4LinearMethod weight, weight_scale (FP8 per 16-block), weight_scale_2 and input_scale;
  KV cache scales `k_proj.k_scale` / `v_proj.v_scale` for kv_cache_quant_algo FP8; hf_quant_config.json's
  quant_algo and exclude_modules pick the method per layer. SGLang's `quantization/modelopt_quant.py` mirrors it.
- TensorRT-LLM `_torch/modules/linear.py` (FP8, NVFP4, W4A16/W4A8 AWQ, W8A8 SmoothQuant): fused qkv and gate_up
  load one input_scale (and one weight_scale_2, one pre_quant_scale) per fused
  layer (per-tensor FP8 weight scales are requantized to their maximum instead); AWQ and SmoothQuant layers carry pre_quant_scale where it was not folded into the preceding norm.
- ModelOpt `export/quant_utils.py` (preprocess_linear_fusion): the exporter unifies exactly those scales, so a
  checkpoint that differs there was damaged or exported wrong.
"""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path

from pipeline import formats
from pipeline.formats.base import SGLANG, TRTLLM, VLLM, Contract

# Per-layer formats (AutoQuantize): quant_algo MIXED_PRECISION, each quantized layer's own quant_algo in
# quantized_layers (TensorRT-LLM's QuantConfig reads it per layer; the layers listed nowhere stay unquantized).
MIXED_PRECISION = "MIXED_PRECISION"
# kv_cache_quant_algo -> the engines that load a KV cache of it; each attention layer then carries both scales.
KV_CACHE_ENGINES: dict[str, tuple[str, ...]] = {"FP8": (TRTLLM, VLLM, SGLANG), "NVFP4": (TRTLLM,)}
KV_SCALES = ("k_proj.k_scale", "v_proj.v_scale")
# Projections whose input comes from no norm, so the exporter cannot fold a pre_quant_scale into one (q/k/v and
# gate/up may carry theirs in the preceding norm instead).
UNFOLDABLE = ("o_proj", "down_proj", "w2")
# Sibling projections the engines fuse into one GEMM (Mixtral's experts call gate/up w1/w3).
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))
SCALES = ("weight_scale", "weight_scale_2", "input_scale", "pre_quant_scale", "k_scale", "v_scale")
FLOAT_WEIGHTS = ("F16", "BF16", "F32")
# 2-D weights that are not linear layers: engines never quantize them, listed in exclude_modules or not (ModelOpt
# leaves a Gemma's embedding out of the list).
NOT_LINEAR = ("embed_tokens",)


def check(folder: Path) -> list[str]:
    """Every way the HF checkpoint in `folder` breaks its engines' loader contract, one line each, naming the
    tensor (or file field) and the engines that would refuse it."""
    from safetensors import safe_open

    quant = json.loads((folder / "hf_quant_config.json").read_text())["quantization"]
    algo, kv_algo = quant.get("quant_algo"), quant.get("kv_cache_quant_algo")
    layer_algos = ({m: layer.get("quant_algo") for m, layer in (quant.get("quantized_layers") or {}).items()}
                   if algo == MIXED_PRECISION else {})
    unknown = sorted({str(a) for a in (layer_algos.values() or [algo]) if formats.by_quant_algo(a) is None})
    if unknown:
        known = ", ".join(dict.fromkeys(f.quant_algo for f in formats.FORMATS.values()))
        return [f"hf_quant_config.json: quant_algo {unknown[0]!r} has no ModelOpt loader contract here (known: {known})"]
    contract = (formats.by_quant_algo(algo).contract if not layer_algos
                else _mixed_contract(set(layer_algos.values())))
    refuse = f"{', '.join(contract.engines)} would refuse it"
    problems = _config_problems(folder, quant, refuse)
    tensors, weights = {}, {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as fh:
            for name in fh.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                if name.rsplit(".", 1)[-1] in SCALES:
                    tensors[name] = fh.get_tensor(name).float()
                elif (name.endswith(".weight") and len(fh.get_slice(name).get_shape()) == 2
                      and name.split(".")[-2] not in NOT_LINEAR):
                    weights[name.removesuffix(".weight")] = fh.get_slice(name).get_dtype()
    excluded = quant.get("exclude_modules") or []
    for module, dtype in sorted(weights.items()):
        skipped = any(fnmatch.fnmatchcase(module, p) or fnmatch.fnmatchcase(module.split(".")[-1], p)
                      for p in excluded) or (bool(layer_algos) and module not in layer_algos)
        layer = formats.by_quant_algo(layer_algos[module]).contract if module in layer_algos else contract
        if skipped:
            if f"{module}.weight_scale" in tensors:
                problems.append(f"{module}.weight_scale: the module is in exclude_modules but quantized; {refuse}")
        elif dtype in FLOAT_WEIGHTS:
            problems.append(f"{module}.weight: unquantized ({dtype}) but not in exclude_modules; {refuse}")
        else:
            needed = (*layer.tensors, *(("pre_quant_scale",) if layer.pre_quant
                                        and module.rsplit(".", 1)[-1] in UNFOLDABLE else ()))
            problems += [f"{module}.{t}: missing for {layer_algos.get(module, algo)}; {refuse}" for t in needed
                         if f"{module}.{t}" not in tensors]
    for name, value in sorted(tensors.items()):
        if not bool(value.isfinite().all()) or not bool((value > 0).all()):
            problems.append(f"{name}: zero, negative, NaN or infinite scale; {refuse}")
    problems += _fused_problems(tensors, contract, refuse)
    if kv_algo:
        kv_refuse = f"{', '.join(KV_CACHE_ENGINES.get(kv_algo, (TRTLLM,)))} would refuse it"
        for attention in sorted({m.rsplit(".", 1)[0] for m in weights if m.endswith(".k_proj")}):
            problems += [f"{attention}.{s}: missing for kv_cache_quant_algo {kv_algo}; {kv_refuse}"
                         for s in KV_SCALES if f"{attention}.{s}" not in tensors]
    elif any(n.endswith((".k_scale", ".v_scale")) for n in tensors):
        problems.append(f"hf_quant_config.json: kv_cache_quant_algo is null but the checkpoint holds KV cache "
                        f"scales; {refuse}")
    return problems


def _mixed_contract(algos: set[str]) -> Contract:
    """A MIXED_PRECISION checkpoint as a whole: fused siblings share one format, so they share its scales."""
    identical = tuple(sorted({scale for algo in algos for scale in formats.by_quant_algo(algo).contract.identical}))
    return Contract((), identical, formats.get("auto").contract.engines)


def _config_problems(folder: Path, quant: dict, refuse: str) -> list[str]:
    """config.json's quantization_config must say what hf_quant_config.json says (engines read either)."""
    config = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    problems = []
    if config.get("quant_algo") != quant.get("quant_algo"):
        problems.append(f"config.json: quantization_config.quant_algo {config.get('quant_algo')!r} differs from "
                        f"hf_quant_config.json's {quant.get('quant_algo')!r}; {refuse}")
    if "ignore" in config and sorted(config["ignore"]) != sorted(quant.get("exclude_modules") or []):
        problems.append(f"config.json: quantization_config.ignore differs from hf_quant_config.json's "
                        f"exclude_modules; {refuse}")
    return problems


def _fused_problems(tensors: dict, contract: Contract, refuse: str) -> list[str]:
    """Scales that fused siblings (q/k/v, gate/up) must share."""
    problems = []
    for name, value in sorted(tensors.items()):
        match = re.match(r"(.*)\.([^.]+)\.([^.]+)$", name)
        if not match or match.group(3) not in contract.identical:
            continue
        parent, module, scale = match.groups()
        group = next((g for g in FUSED if module == g[0]), None)  # compare each group once, against its first
        for sibling in group[1:] if group else ():
            other = tensors.get(f"{parent}.{sibling}.{scale}")
            if other is not None and (other.shape != value.shape or not bool((other == value).all())):
                problems.append(f"{parent}.{sibling}.{scale}: differs from {name}, but the engines fuse "
                                f"{'/'.join(group)} into one layer with one {scale}; {refuse}")
    return problems

"""Checks of the exported checkpoints (HF, TensorRT-LLM): config fields against the model and recipe, every
dequantized layer against the calibrated one, and the logits of a plain model holding the dequantized weights
against the calibrated model's. One plain model serves every export: each export's weights are swapped in."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from pipeline import formats
from pipeline.recipe import Recipe
from pipeline.verify import evaluate

# Norms whose scale an exporter may fold AWQ/SmoothQuant pre-quant scales into, and the layers they feed (Llama-like).
FOLDED_NORMS = {"self_attn.q_proj": "input_layernorm", "self_attn.k_proj": "input_layernorm",
                "self_attn.v_proj": "input_layernorm", "mlp.gate_proj": "post_attention_layernorm",
                "mlp.up_proj": "post_attention_layernorm"}


def original_tensors(model_dir: Path, names: Iterable[str]) -> dict:
    """The unquantized tensors `names` that the load artifact's model files hold, read one by one."""
    from safetensors import safe_open

    wanted, found = set(names), {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            found |= {name: f.get_tensor(name) for name in wanted & set(f.keys())}
    return found


class Skeleton:
    """One plain model (the load artifact's) for every export's dequantized weights: an export's weights are
    swapped in, and the tensors the previous export replaced are read back from the load artifact's files, so no
    second model is ever built and no full copy of the original weights is held."""

    def __init__(self, model, model_dir: Path) -> None:
        self.model = model  # loaded from model_dir
        self.model_dir = model_dir
        self.replaced: set[str] = set()

    def holding(self, weights: dict, experts: dict):
        """The model with `weights` (HF names, float; `experts` says where each expert projection goes) in place
        of its own; every other tensor is the original."""
        import torch

        from pipeline.modeling import expert_weight

        state = self.model.state_dict()
        swapped = {k: v.to(state[k].dtype) for k, v in weights.items() if k in state}
        restored = original_tensors(self.model_dir, self.replaced - swapped.keys())
        self.model.load_state_dict({**restored, **swapped}, strict=False)
        self.replaced = set(swapped)
        with torch.no_grad():
            for name, where in experts.items():
                if f"{name}.weight" in weights:
                    expert_weight(self.model, where).copy_(weights[f"{name}.weight"])
                    self.replaced.add(f"{where.module}.{where.param}")
        return self.model


def check_export(folder: Path, quantized, folded: list[str], skeleton: Skeleton, windows, recipe: Recipe,
                 track) -> dict:
    """One exported checkpoint against the calibrated model (`quantized`, its activation quantizers off)."""
    import torch

    from pipeline.verify.dequant import effective_weights, read_config
    from pipeline.modeling import expert_slices, expert_weight

    info = read_config(folder)
    fmt = folder.name
    problems = config_problems(info, quantized.config, recipe)
    world = recipe.export.tp * recipe.export.pp if info["layout"] == "trtllm" else 1
    if world > 1:
        # Shards are checked for completeness; the tensors themselves through the unsharded HF export.
        ranks = sorted(p.name for p in folder.glob("rank*.safetensors"))
        if len(ranks) != world:
            problems.append(f"{len(ranks)} rank files for tp x pp = {world}")
        return {"quant_algo": info["quant_algo"], "kv_cache_quant_algo": info["kv_cache_quant_algo"],
                "group_size": info["group_size"], "problems": problems, "bad_layers": [], "layers": [],
                "parity": None, "shards": ranks}
    shapes = {n: tuple(m.weight.shape) for n, m in quantized.named_modules() if isinstance(m, torch.nn.Linear)}
    experts = expert_slices(quantized)  # every expert is checked, not only those calibration reached
    shapes |= {name: tuple(expert_weight(quantized, where).shape) for name, where in experts.items()}
    weights, weight_problems = effective_weights(folder, shapes)
    problems += weight_problems
    plain = skeleton.holding(weights, experts)
    layers = layer_errors(quantized, evaluate.tracked(track, folded, f"{fmt}: dequantized layers vs calibrated"),
                          skeleton.model_dir, weights, info) + _expert_errors(quantized, experts, weights)
    bad = over_tolerance(layers, formats.get(recipe.quantization.format).layer_tolerance)
    on = evaluate.describe_windows(windows)
    described = f"{fmt}: dequantized export vs calibrated model, logits and perplexity: {on}"
    parity = evaluate.compare_on_windows(evaluate.model_logits(plain), quantized, evaluate.tracked(
        track, evaluate.batches(windows), described))
    return {"quant_algo": info["quant_algo"], "kv_cache_quant_algo": info["kv_cache_quant_algo"],
            "group_size": info["group_size"], "problems": problems, "bad_layers": bad[:5], "layers": layers,
            "parity": {k: parity[k] for k in ("cosine", "max_abs_error")}, "ppl_dequantized": parity["ppl"]}


def _expert_errors(quantized, experts: dict, weights: dict) -> list[dict]:
    """Per expert projection: relative distance between the export's weight and the calibrated expert's."""
    import torch

    from pipeline.modeling import expert_weight

    rows = []
    with torch.no_grad():
        for name, where in experts.items():
            if f"{name}.weight" not in weights:
                continue
            reference = expert_weight(quantized, where, fake_quantized=True).float()
            error = ((weights[f"{name}.weight"] - reference).norm() / reference.norm().clamp_min(1e-12)).item()
            rows.append({"layer": name, "error": round(error, 5), "tensors": f"{name}.weight / {name}.weight_scale"})
    return rows


def over_tolerance(layers: list[dict], tolerance: float) -> list[dict]:
    return [{**row, "tolerance": tolerance} for row in layers if row["error"] > tolerance]


def config_problems(info: dict, model_config, recipe: Recipe) -> list[str]:
    """Config fields that must agree with the model and the recipe (the tensors are checked separately)."""
    from pipeline.quant import rope_theta

    problems = []
    kv_expected = {"none": None, "fp8": "FP8", "nvfp4": "NVFP4"}[recipe.quantization.kv_cache]
    if info["kv_cache_quant_algo"] != kv_expected:
        problems.append(f"kv_cache_quant_algo {info['kv_cache_quant_algo']!r}, recipe asks {kv_expected!r}")
    if info["layout"] == "trtllm":
        rotary = info["config"].get("rotary_base")
        if rope_theta(model_config) and rotary != rope_theta(model_config):
            problems.append(f"rotary_base {rotary} in config.json, the model uses {rope_theta(model_config)}")
        mapping = info["config"].get("mapping", {})
        if (mapping.get("tp_size"), mapping.get("pp_size")) != (recipe.export.tp, recipe.export.pp):
            problems.append(f"mapping tp {mapping.get('tp_size')} pp {mapping.get('pp_size')}, recipe asks "
                            f"tp {recipe.export.tp} pp {recipe.export.pp}")
    return problems


def layer_errors(quantized, folded: Iterable[str], model_dir: Path, weights: dict, info: dict) -> list[dict]:
    """Per quantized layer: relative distance between the export's effective weight and the calibrated one
    (`folded` layers hold their fake-quantized weight). In the TensorRT-LLM layout q/k/v and gate/up are fused
    into one weight with one scale, the largest of its parts', so all but the largest part requantize coarser:
    those rows say `shared_scale`."""
    import torch

    rows = []
    folded = list(folded)
    norms = original_tensors(model_dir, (_norm_key(name) for name in folded if _norm_key(name) in weights))
    with torch.no_grad():
        for name in folded:
            module = quantized.get_submodule(name)
            if f"{name}.weight" not in weights:
                continue
            reference = module.weight.float()
            pqs = getattr(module.input_quantizer, "pre_quant_scale", None)
            if pqs is not None:
                reference = reference * pqs.float().reshape(1, -1)
            exported = weights[f"{name}.weight"]
            norm_key = _norm_key(name)  # None for layers no norm feeds
            if norm_key in norms:
                exported = exported * (weights[norm_key] / norms[norm_key].float()).reshape(1, -1)
            error = ((exported - reference).norm() / reference.norm().clamp_min(1e-12)).item()
            tensors = {"hf": f"{name}.weight / {name}.weight_scale",
                       "onnx": f"the ONNX initializers model.{name}.weight_f4 / _f8_scale"}.get(
                info["layout"], f"the TensorRT-LLM tensors of {name} (weights / weights_scaling_factor)")
            rows.append({"layer": name, "error": round(error, 5), "tensors": tensors,
                         "shared_scale": info["layout"] == "trtllm" and norm_key is not None})
    return rows


def _norm_key(layer: str) -> str | None:
    """The norm weight an exporter may fold `layer`'s pre-quant scale into (None when there is none)."""
    prefix, _, leaf = layer.partition(".layers.")
    index, _, sub = leaf.partition(".")
    norm = FOLDED_NORMS.get(sub)
    return f"{prefix}.layers.{index}.{norm}.weight" if norm else None

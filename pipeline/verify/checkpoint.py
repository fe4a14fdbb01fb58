"""Checks of the exported checkpoints (HF, TensorRT-LLM): config fields against the model and recipe, every
dequantized layer against the calibrated one, and the logits of a plain model holding the dequantized weights
against the calibrated model's. No second model is built: the calibrated model itself runs as a plain model holding
an export's dequantized weights, swapped in module by module (`holding`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
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


def fold_in_place(model) -> list[str]:
    """pipeline.quant.fold_weight_quantization (each weight replaced by its fake-quantized value once, its weight
    quantizer off: the same forward, re-quantizing nothing per call), but written into the weight's own storage.
    The weights of a loaded model are private copy-on-write maps of the load artifact's file: a new tensor per
    weight would leave every page of the file that folding read resident beside the folded copy (measured: 1.48 GB
    instead of 1.07 GB for the bundled model); written in place, each page read becomes the folded page. The
    file itself is never written (a private map)."""
    import torch

    folded = []
    with torch.no_grad():
        for name, module in model.named_modules():
            quantizer = getattr(module, "weight_quantizer", None)
            if quantizer is not None and quantizer.is_enabled:
                module.weight.copy_(quantizer(module.weight))
                quantizer.disable()
                folded.append(name)
    return folded


@contextlib.contextmanager
def holding(model, weights: Mapping, experts: dict) -> Iterator:
    """`model` (the calibrated one) computing as a plain transformers model that holds `weights` (HF names ->
    float tensors, dequantized on access) in place of its own: every ModelOpt quantizer passes its input through
    (pre-quant scales included, as in a plain model), and each module's exported tensors are swapped in just before
    its forward and back out just after it, so no second model is built and at most one module's dequantized
    weights are alive at a time. Tensors the export lacks stay the calibrated model's. `experts` says where each
    expert projection goes in a fused 3D parameter."""
    import torch

    from pipeline.modeling import expert_weight

    swaps: dict = {}  # module -> [(parameter, HF name)]
    for name in weights:
        owner, _, leaf = name.rpartition(".")
        try:
            module = model.get_submodule(owner)
        except AttributeError:
            continue
        if module._parameters.get(leaf) is not None:
            swaps.setdefault(module, []).append((leaf, name))
    fused: dict = {}  # module -> {parameter: [(expert slice, HF name)]}
    for name, where in experts.items():
        if f"{name}.weight" in weights:
            module = model.get_submodule(where.module)
            fused.setdefault(module, {}).setdefault(where.param, []).append((where, f"{name}.weight"))
    saved: dict = {}

    def swap_in(module, _args) -> None:
        if module in saved:  # re-entered (a shared module): already holding the export's tensors
            return
        saved[module] = dict(module._parameters)
        for leaf, name in swaps.get(module, ()):
            module._parameters[leaf] = weights[name].to(saved[module][leaf].dtype)
        for leaf, parts in fused.get(module, {}).items():
            module._parameters[leaf] = saved[module][leaf].detach().clone()
            for where, name in parts:
                expert_weight(model, where).copy_(weights[name])

    def swap_out(module, _args, _output) -> None:
        module._parameters.update(saved.pop(module))

    quantizers = [m for m in model.modules() if type(m).__name__ in ("TensorQuantizer", "SequentialQuantizer")]
    handles = []
    try:
        for quantizer in quantizers:
            quantizer.forward = _passthrough
        for module in {*swaps, *fused}:
            handles += [module.register_forward_pre_hook(swap_in), module.register_forward_hook(swap_out)]
        with torch.no_grad():
            yield model
    finally:
        for handle in handles:
            handle.remove()
        for quantizer in quantizers:
            del quantizer.forward
        for module, parameters in saved.items():  # a forward that raised
            module._parameters.update(parameters)


def _passthrough(inputs, *args, **kwargs):
    return inputs


def held_logits(model, weights: Mapping, experts: dict):
    """[b, len] ids -> logits of `model` holding `weights` (see `holding`)."""

    def logits_of(batch):
        with holding(model, weights, experts) as plain:
            return plain(batch).logits

    return logits_of


def check_export(folder: Path, quantized, folded: list[str], model_dir: Path, windows, recipe: Recipe,
                 track, progress=None) -> dict:
    """One exported checkpoint against the calibrated model (`quantized`, its activation quantizers off)."""
    import torch

    from pipeline.modeling import expert_slices, expert_weight
    from pipeline.verify.dequant import dequantized, read_config

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
    weights, weight_problems = dequantized(folder, shapes)  # read on access, one tensor at a time
    problems += weight_problems
    layers = layer_errors(quantized, evaluate.tracked(track, folded, f"{fmt}: dequantized layers vs calibrated"),
                          model_dir, weights, info) + _expert_errors(quantized, experts, weights)
    bad = over_tolerance(layers, formats.get(recipe.quantization.format).layer_tolerance)
    on = evaluate.describe_windows(windows)
    described = f"{fmt}: dequantized export vs calibrated model, logits and perplexity: {on}"
    batches = evaluate.batches(windows)
    with progress(quantized, 2 * len(batches), described) if progress else contextlib.nullcontext():
        parity = evaluate.compare_on_windows(held_logits(quantized, weights, experts), quantized, evaluate.tracked(
            track, batches, described))
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

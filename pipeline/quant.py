"""ModelOpt glue: a recipe's quantization section as a ModelOpt config, with per-model decisions recorded.

Each format names its ModelOpt config in the format registry (pipeline/formats/), not here.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import hashlib
import io
import json
import logging
import pickle
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from pipeline import formats
from pipeline.architectures import family
from pipeline.errors import BadInput
from pipeline.modeling import offload_hooks, state_dict
from pipeline.recipe import QuantizationSpec

log = logging.getLogger(__name__)

@dataclass
class QuantPlan:
    """The ModelOpt config for one model, and the decisions taken to make it fit (for manifest and model card)."""

    config: dict
    block_size: int | None
    quantized_layers: list[str]
    excluded_layers: list[str] = field(default_factory=list)
    decisions: list[str] = field(default_factory=list)
    layer_formats: dict[str, str] = field(default_factory=dict)  # format auto: the format AutoQuantize chose per layer


def modelopt():
    """Import ModelOpt's quantization API quietly (it warns about untested transformers releases), with the
    formats' CPU fake quantizers registered: a restored model that names one must find it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is not tested with current version of modelopt.*")
        import modelopt.torch.opt as mto
        import modelopt.torch.quantization as mtq
        from modelopt.torch.quantization.nn.modules import tensor_quantizer
    for cpu in formats.cpu_quantizers():
        if not tensor_quantizer.is_registered_quant_backend(cpu.backend):
            tensor_quantizer.register_quant_backend(cpu.backend, cpu.fake_quant)
    return mtq, mto


def computes_on_cpu(model) -> bool:
    """No parameter of `model` sits on a GPU (offloaded ones are meta): ModelOpt's CUDA-only fake quantizers cannot
    run it, also on a host that has a GPU (model.device: cpu)."""
    return not any(p.device.type == "cuda" for p in model.parameters())


def _cpu_backend(num_bits, block_sizes: dict | None) -> str | None:
    """The CPU fake quantizer covering these value and scale bits, if any."""
    scale_bits = (block_sizes or {}).get("scale_bits")
    return next((q.backend for q in formats.cpu_quantizers() if (q.num_bits, q.scale_bits) == (num_bits, scale_bits)),
                None)


def use_cpu_quantizers(config: dict) -> None:
    """Point every quantizer entry whose value and scale bits a CPU fake quantizer covers at that quantizer."""
    for entry in config["quant_cfg"]:
        cfgs = entry.get("cfg")
        for cfg in cfgs if isinstance(cfgs, list) else [cfgs] if cfgs else []:
            backend = _cpu_backend(cfg.get("num_bits"), cfg.get("block_sizes"))
            if backend:
                cfg["backend"] = backend


def _use_cpu_quantizer_modules(model) -> None:
    """use_cpu_quantizers for the quantizers of a model already quantized."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    for module in model.modules():
        if isinstance(module, TensorQuantizer) and module.backend is None:
            backend = _cpu_backend(module.num_bits, module.block_sizes)
            if backend:
                module.backend = backend


class _LineLog(io.TextIOBase):
    """A stdout that sends each complete line to the debug log and to `on_line` as soon as it is printed."""

    def __init__(self, on_line: Callable[[str], None]) -> None:
        self.on_line, self.pending = on_line, ""

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            self.emit(line)
        return len(text)

    def emit(self, line: str) -> None:
        if line.strip():
            log.debug("modelopt: %s", line)
            self.on_line(line.strip())


@contextlib.contextmanager
def library_prints(on_line: Callable[[str], None] = lambda line: None) -> Iterator[None]:
    """ModelOpt prints progress to stdout, where --json output goes: route it to the debug log instead, line by
    line while it runs, and to `on_line` (ModelOpt announces its calibration phases this way)."""
    sink = _LineLog(on_line)
    try:
        with contextlib.redirect_stdout(sink):
            yield
    finally:
        sink.emit(sink.pending)


def _algorithm(spec: QuantizationSpec, moe: bool) -> str | dict:
    name = spec.algorithm
    algorithm = {"method": name, "alpha": spec.smoothquant_alpha} if name == "smoothquant" else {"method": name}
    if moe:  # route calibration tokens to every expert: one that no token reaches exports uncalibrated scales
        algorithm["moe_calib_experts_ratio"] = 1.0
    return name if algorithm == {"method": "max"} else algorithm


def _exclusion_pattern(pattern: str) -> str:
    return pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"


def _disabled_patterns(config: dict) -> list[str]:
    return [e["quantizer_name"] for e in config["quant_cfg"]
            if e.get("enable") is False and "parent_class" not in e and e["quantizer_name"] != "*"]


def _set_block_size(config: dict, size: int) -> None:
    """Rewrite every weight-quantizer block size in a ModelOpt config (entries may hold one cfg or a list)."""
    for entry in config["quant_cfg"]:
        cfgs = entry.get("cfg")
        for cfg in cfgs if isinstance(cfgs, list) else [cfgs] if cfgs else []:
            blocks = cfg.get("block_sizes")
            if "weight_quantizer" in entry["quantizer_name"] and blocks and -1 in blocks:
                cfg["block_sizes"] = {**blocks, -1: size}


def plan_quantization(spec: QuantizationSpec, model) -> QuantPlan:
    """Build the ModelOpt config for `model`, applying exclusions, KV cache and the block-size policy."""
    import torch

    mtq, _ = modelopt()
    config = copy.deepcopy(getattr(mtq, formats.get(spec.format).modelopt_config))
    known = family(model.config.model_type)
    config["algorithm"] = _algorithm(spec, moe=bool(known and known.moe))
    config["quant_cfg"] += [{"quantizer_name": _exclusion_pattern(p), "enable": False} for p in spec.exclude]
    if spec.kv_cache != "none":
        kv = getattr(mtq, formats.KV_CACHES[spec.kv_cache].modelopt_config)["quant_cfg"]
        with library_prints():
            config = mtq.update_quant_cfg_with_kv_cache_quant(config, copy.deepcopy(kv))
    if computes_on_cpu(model):
        use_cpu_quantizers(config)
    disabled = _disabled_patterns(config)
    widths = {name: m.in_features for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
              and not any(fnmatch.fnmatch(f"{name}.weight_quantizer", p) for p in disabled)}
    plan = QuantPlan(config, spec.block_size, sorted(widths))
    if plan.block_size is not None:
        _fit_block_size(spec, plan, widths)
    return plan


def _fit_block_size(spec: QuantizationSpec, plan: QuantPlan, widths: dict[str, int]) -> None:
    """Apply block_size_policy to layers whose input width the block size does not divide."""
    size = plan.block_size
    misfits = {name: w for name, w in widths.items() if w % size}
    if len(misfits) == len(widths):
        options = [b for b in (128, 64, 32, 16) if all(w % b == 0 for w in widths.values())]
        layer_widths = ", ".join(map(str, sorted(set(widths.values()))))
        raise BadInput(f"quantization.block_size {size} divides no layer's input width ({layer_widths}); "
                       f"use {' or '.join(map(str, options)) or 'a divisor of those widths'}")
    if not misfits:
        return
    example = next(iter(sorted(misfits)))
    problem = (f"block size {size} does not divide the input width of {len(misfits)} of {len(widths)} layers "
               f"(e.g. {example}: {misfits[example]})")
    fallbacks = formats.get(spec.format).block_fallbacks
    fallback = next((b for b in fallbacks if b < size and all(w % b == 0 for w in widths.values())), None)
    if spec.block_size_policy == "error":
        hint = f"set quantization.block_size: {fallback}" if fallback else "exclude those layers"
        raise BadInput(f"{problem}; {hint}, or set quantization.block_size_policy to fallback or exclude")
    if spec.block_size_policy == "fallback" and fallback:
        plan.block_size = fallback
        _set_block_size(plan.config, fallback)
        decision = f"{problem}: every layer uses block size {fallback} instead (block_size_policy: fallback)"
    else:
        plan.excluded_layers = sorted(misfits)
        plan.quantized_layers = [n for n in plan.quantized_layers if n not in misfits]
        plan.config["quant_cfg"] += [{"quantizer_name": f"{n}.*", "enable": False} for n in plan.excluded_layers]
        decision = f"{problem}: those layers stay unquantized (block_size_policy: {spec.block_size_policy})"
    log.warning("%s", decision)
    plan.decisions.append(decision)


STATE_FILE = "modelopt_state.pkl"
TENSORS_FILE = "calibration.safetensors"
RESCALED_FILE = "rescaled.json"


def _smoothed(weight, module):
    """The weight AWQ/SmoothQuant leave behind: ModelOpt's apply_pre_quant_scale_and_smooth multiplies each input
    column by 1 / pre_quant_scale (in fp32). Replaying it lets the state store the scale, not the weight."""

    pqs = getattr(module.input_quantizer, "_pre_quant_scale", None) if hasattr(module, "input_quantizer") else None
    if pqs is None:
        return None
    return _divide_columns(weight, pqs)


def _divide_columns(weight, pre_quant_scale):
    """weight with each input column divided by its pre-quant scale, computed in fp32 as ModelOpt does."""
    import torch

    inverse = 1.0 / pre_quant_scale.to(weight.device, torch.float32)  # the scale may sit on the GPU calibration used
    return (weight * inverse.squeeze()[None, :]).to(weight.dtype)


def write_state(path, state) -> None:
    """A ModelOpt state as a plain pickle, byte for byte the same on every rerun: torch.save adds a random
    serialization id, and ModelOpt builds some dicts from sets (so they are key-sorted first)."""
    path.write_bytes(pickle.dumps(_canonical(state), protocol=4))


def _canonical(value):
    """The same value with every string-keyed dict in sorted key order (order carries no meaning in them), and
    equal strings one object: pickle writes a repeated object as a back-reference, so which equal strings share an
    object (a state resumed from layer checkpoints shares fewer) must not change the bytes."""
    if isinstance(value, str):
        return sys.intern(value)
    if isinstance(value, dict):
        items = sorted(value.items()) if all(isinstance(k, str) for k in value) else value.items()
        return {_canonical(k): _canonical(v) for k, v in items}
    if isinstance(value, (list, tuple)):
        return type(value)(_canonical(v) for v in value)
    return value


def weight_digests(model) -> dict[str, bytes]:
    """A digest of every tensor before calibration: save_calibration then finds what calibration changed without
    reading the original weights a second time (that read doubled the stage's peak memory)."""
    return {name: _digest(tensor) for name, tensor in state_dict(model)}


def _digest(tensor) -> bytes:
    import torch

    raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.blake2b(raw, digest_size=16).digest()


def save_calibration(model, model_dir, out, before: dict[str, bytes]) -> dict:
    """Store what calibration added or changed: ModelOpt's mode state, the new tensors (amax, pre-quant scales),
    and changed weights only where replaying the smoothing from the stored scales does not reproduce them bit for
    bit. No second copy of the weights: `before` (weight_digests) tells which ones changed, and only those are
    read back, one at a time, from the model directory's weight files (one file or shards) for the replay check."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from pipeline.modeling import weight_files

    _, mto = modelopt()
    files = weight_files(model_dir)

    def original(name: str):
        with safe_open(files[name], "pt") as fh:
            return fh.get_tensor(name)

    changed, rescaled = {}, []
    # A tied weight (lm_head sharing the embedding) is one Parameter under two names: saved once, under the name
    # the weight files have.
    owners: dict[int, set[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        owners.setdefault(id(tensor), set()).add(name)
    stored = {n for names in owners.values() if names & files.keys() for n in names}
    for name, tensor in state_dict(model):  # one at a time, on the CPU (offloaded weights read as reached)
        if name in files:
            if before.get(name) == _digest(tensor):
                continue
            before_tensor = original(name)
            if torch.equal(tensor, before_tensor):
                continue
            module = model.get_submodule(name.rsplit(".", 1)[0])
            replay = _smoothed(before_tensor, module) if name.endswith(".weight") else None
            if replay is not None and torch.equal(replay, tensor):
                rescaled.append(name)
                continue
            changed[name] = tensor.contiguous()  # a parameter of its own: saved as is, not copied
        elif name not in stored:
            changed[name] = tensor.clone().contiguous()
    save_file(changed, out / TENSORS_FILE)
    (out / RESCALED_FILE).write_text(json.dumps(rescaled))
    write_state(out / STATE_FILE, mto.modelopt_state(model))
    return {"tensors": len(changed), "rescaled_weights": len(rescaled),
            "bytes": sum(t.numel() * t.element_size() for t in changed.values())}


def restore_calibration(model, folder) -> None:
    """Put a calibration artifact back onto a freshly loaded model, bit-identical to the calibrated one. On a model
    with weights offloaded by accelerate (meta tensors), the changed and rescaled weights are replayed when each
    offloaded weight is read (`OffloadedReplay`), never materialised all at once."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    _, mto = modelopt()
    state = pickle.loads((folder / STATE_FILE).read_bytes())  # our own artifact, sha256-checked by the store
    with library_prints():
        mto.restore_from_modelopt_state(model, state)
    replay = OffloadedReplay.of(model)
    if replay is None:
        result = model.load_state_dict(load_file(folder / TENSORS_FILE), strict=False)
        if result.unexpected_keys:
            raise RuntimeError(f"calibration state does not fit this model: {result.unexpected_keys[:3]}")
    else:
        with safe_open(folder / TENSORS_FILE, "pt") as fh:
            names = list(fh.keys())
        replay.put(model, {name: (folder / TENSORS_FILE, name) for name in names})
    if computes_on_cpu(model):  # a calibration made on a GPU names ModelOpt's CUDA-only quantizers
        _use_cpu_quantizer_modules(model)
    with torch.no_grad():
        for name in json.loads((folder / RESCALED_FILE).read_text()):
            module = model.get_submodule(name.rsplit(".", 1)[0])
            if module.weight.is_meta:
                replay.rescale(name, module.input_quantizer._pre_quant_scale)
            else:
                module.weight.copy_(_smoothed(module.weight, module))


class OffloadedReplay:
    """The weights of an accelerate-offloaded model as upstream stages left them, computed when a weight is read.

    accelerate reads an offloaded (meta) weight from its hooks' weights map each time a module runs (for disk
    offload: straight from the model's own safetensors). Writing a changed weight back would keep it in CPU memory
    (accelerate cannot write disk offload back), so the whole model would end up resident for AWQ. Instead this
    wraps the map: each read applies, in order, the replacement stored by calibration or fine-tuning (read from its
    file then), the AWQ/SmoothQuant rescaling from the calibrated pre-quant scale, the cast to the export dtype and
    the export's resmoothing, exactly as the resident path applies them to the resident weight."""

    def __init__(self, loader) -> None:
        self.loader = loader  # accelerate's OffloadedWeightsLoader: its state_dict and index stay readable below
        self.replaced: dict[str, tuple] = {}  # name -> (file, tensor name)
        self.scales: dict[str, object] = {}  # name -> pre-quant scale to divide input columns by
        self.after_cast: dict[str, list] = {}  # name -> functions applied after the cast (export resmoothing)
        self.dtype = None

    @classmethod
    def of(cls, model) -> OffloadedReplay | None:
        """The model's replay (installed on every offload hook on first use), or None when nothing is offloaded."""
        from accelerate.utils.offload import PrefixedDataset

        hooks = [h for h in offload_hooks(model) if isinstance(h.weights_map, PrefixedDataset)]
        if not hooks:
            return None
        existing = next((h.weights_map.dataset for h in hooks if isinstance(h.weights_map.dataset, cls)), None)
        replay = existing or cls(hooks[0].weights_map.dataset)
        for hook in hooks:
            hook.weights_map.dataset = replay
        return replay

    @property
    def state_dict(self):  # ModelOpt's writeback and accelerate look these up on the loader
        return self.loader.state_dict

    @property
    def index(self):
        return self.loader.index

    def keys(self):
        return self.loader.keys()

    def __iter__(self):
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)

    def __contains__(self, key) -> bool:
        return key in self.loader

    def __getitem__(self, key: str):
        from safetensors import safe_open

        if key in self.replaced:
            file, name = self.replaced[key]
            with safe_open(file, "pt") as fh:
                tensor = fh.get_tensor(name)
        else:
            tensor = self.loader[key]
        if key in self.scales:
            tensor = _divide_columns(tensor, self.scales[key])
        if self.dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(self.dtype)
        for step in self.after_cast.get(key, ()):
            tensor = step(tensor)
        return tensor

    def put(self, model, tensors: dict[str, tuple]) -> None:
        """Load (file, name) tensors into the model: offloaded weights replayed on read, everything else (quantizer
        state, weights that stayed in memory) now, onto the device its module computes on."""
        from accelerate.utils import set_module_tensor_to_device
        from safetensors import safe_open

        state = model.state_dict(keep_vars=True)
        unknown = [name for name in tensors if name not in state]
        if unknown:
            raise RuntimeError(f"state does not fit this model: {unknown[:3]}")
        for name, (file, key) in tensors.items():
            if state[name].is_meta and name in self.loader:
                self.replaced[name] = (file, key)
                continue
            with safe_open(file, "pt") as fh:
                value = fh.get_tensor(key)
            device = "cpu" if state[name].is_meta else state[name].device
            set_module_tensor_to_device(model, name, device, value=value)

    def rescale(self, name: str, pre_quant_scale) -> None:
        self.scales[name] = pre_quant_scale.detach().clone()


def is_offloaded(model) -> bool:
    return bool(offload_hooks(model))


@contextlib.contextmanager
def weights_of(module, model) -> Iterator[None]:
    """`module`'s weights readable for the duration (an offloaded module's are read in, then dropped again)."""
    from modelopt.torch.quantization.utils.core_utils import enable_weight_access_and_writeback

    if not any(p.is_meta for p in module.parameters()):
        yield
        return
    with enable_weight_access_and_writeback(module, model, writeback=False):
        yield


def layer_errors(model) -> list[dict]:
    """Relative weight error ||Q(W) - W|| / ||W|| of every quantized linear layer, for reports and plots (an
    offloaded layer's weight is read in for its row, one layer at a time)."""
    import torch

    rows = []
    with torch.no_grad():
        for name, module in model.named_modules():
            quantizer = getattr(module, "weight_quantizer", None)
            if quantizer is None or not quantizer.is_enabled:
                continue
            with weights_of(module, model):
                weight = module.weight.float()
                error = (quantizer(module.weight).float() - weight).norm() / weight.norm().clamp_min(1e-12)
            rows.append({"layer": name, "relative_error": round(float(error), 6), "shape": list(weight.shape)})
    return rows


def export_unified(model, dtype, export_dir, max_shard_size: str, on_layer: Callable[[int, int], None] | None = None
                   ) -> None:
    """ModelOpt's unified Hugging Face checkpoint: real quantized tensors, hf_quant_config.json, in shards of at
    most `max_shard_size` with an index when it takes more than one. The exporter's dtype leaves unquantized
    tensors (embeddings, norms) as they are, so the model is cast first. Exporters change the model in place:
    callers pass a model they no longer need.

    A model with offloaded weights goes through ModelOpt's streaming exporter (one decoder layer in memory at a
    time); its weights are cast as they are read, and `on_layer(done, total)` is called as each decoder layer is
    written (the exporter has no callback: a state_dict hook on each layer sees it being written)."""
    import torch
    from modelopt.torch.export import export_hf_checkpoint

    check_architectures(model)
    offloaded = is_offloaded(model)
    if offloaded:
        OffloadedReplay.of(model).dtype = dtype
        torch.nn.Module.to(model, dtype)  # meta weights take the dtype, resident ones are cast (accelerate refuses)
    else:
        model.to(dtype)
    with library_prints(), warnings.catch_warnings(), _streamed_resmoothing(model, offloaded), \
            _layers_written(model, on_layer if offloaded else None):
        warnings.simplefilter("ignore")
        export_hf_checkpoint(model, dtype=dtype, export_dir=export_dir, max_shard_size=max_shard_size)


def check_architectures(model) -> None:
    """ModelOpt's exporters read config.architectures (a list) and fail on a config without it. Filling it in from
    the model class would be a guess about what the user's serving engine should load, so it is a BadInput."""
    if not getattr(model.config, "architectures", None):
        raise BadInput(f"the model's config.json has no \"architectures\" (ModelOpt's exporter needs it); add "
                       f"\"architectures\": [\"{type(model).__name__}\"] to config.json if that is the class to serve")


@contextlib.contextmanager
def _layers_written(model, on_layer: Callable[[int, int], None] | None) -> Iterator[None]:
    if on_layer is None:
        yield
        return
    from modelopt.torch.quantization.utils.layerwise_calib import LayerActivationCollector

    layers = LayerActivationCollector.get_decoder_layers(model) or []
    seen: set[int] = set()

    def written(index: int):
        def hook(*_):
            if index not in seen:
                seen.add(index)
                on_layer(len(seen), len(layers))
        return hook

    handles = [layer.register_state_dict_post_hook(written(i)) for i, layer in enumerate(layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _streamed_resmoothing(model, offloaded: bool) -> Iterator[None]:
    """ModelOpt 0.47's streaming export resmooths AWQ/SmoothQuant layers that share an input (one pre-quant scale
    for q/k/v, folded into the layer norm) on the meta weights of offloaded modules: the result is lost and their
    weight amax becomes meta. While the offloaded model exports, those two steps run on each module with its
    weights read in, and the rescaling is added to the weights' replay, so nothing is kept in memory."""
    if not offloaded:
        yield
        return
    from unittest import mock

    import torch
    from modelopt.torch.export import quant_utils, unified_export_hf

    replay = OffloadedReplay.of(model)
    names = {id(m): n for n, m in model.named_modules()}
    update, fuse = quant_utils._update_pre_quant_scale, unified_export_hf.fuse_prequant_layernorm

    def update_pre_quant_scale(module, new_scale):
        if not module.weight.is_meta:
            return update(module, new_scale)
        old = module.input_quantizer._pre_quant_scale.detach().clone()
        new = new_scale.detach().clone()

        def resmooth(weight):  # ModelOpt's arithmetic, in fp32
            return (weight.to(torch.float32) * old.to(torch.float32) / new.to(torch.float32)).to(weight.dtype)

        with weights_of(module, model):  # ModelOpt resmooths the weight read in and redoes its amax on it
            update(module, new_scale)
        replay.after_cast.setdefault(f"{names[id(module)]}.weight", []).append(resmooth)  # later reads too

    def fuse_prequant_layernorm(norm, modules):
        if not norm.weight.is_meta:
            return fuse(norm, modules)
        with weights_of(norm, model):
            fuse(norm, modules)
            fused = {k: v.detach().clone() for k, v in norm.named_parameters(recurse=False)}
        for key, value in fused.items():  # a norm's weight is one vector: kept as it is
            replay.after_cast.setdefault(f"{names[id(norm)]}.{key}", []).append(lambda _, v=value: v)

    with mock.patch.object(quant_utils, "_update_pre_quant_scale", update_pre_quant_scale), \
            mock.patch.object(unified_export_hf, "fuse_prequant_layernorm", fuse_prequant_layernorm):
        yield


def rope_theta(config) -> float | None:
    """transformers 5 keeps the RoPE base in rope_parameters; older code (ModelOpt's exporters) reads rope_theta."""
    return (getattr(config, "rope_parameters", None) or {}).get("rope_theta") or getattr(config, "rope_theta", None)


def export_trtllm(model, dtype, export_dir, tp: int, pp: int) -> None:
    """TensorRT-LLM checkpoint (config.json + rank{N}.safetensors), sharded for tp x pp."""
    from modelopt.torch.export import export_tensorrt_llm_checkpoint
    from modelopt.torch.export.model_utils import get_model_type

    # Without a top-level rope_theta the TensorRT-LLM config gets no rotary_base, and TensorRT-LLM would use 10000.
    model.config.rope_theta = rope_theta(model.config)
    with library_prints(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_tensorrt_llm_checkpoint(model, decoder_type=get_model_type(model), dtype=dtype, export_dir=export_dir,
                                       inference_tensor_parallel=tp, inference_pipeline_parallel=pp)


def fold_weight_quantization(model) -> list[str]:
    """Replace each weight by its fake-quantized value once and switch the weight quantizer off: the same
    forward, without re-quantizing every weight on every call (decoding gets ~10x faster on CPU)."""
    import torch

    folded = []
    with torch.no_grad():
        for name, module in model.named_modules():
            quantizer = getattr(module, "weight_quantizer", None)
            if quantizer is not None and quantizer.is_enabled:
                module.weight.data = quantizer(module.weight)
                quantizer.disable()
                folded.append(name)
    return folded

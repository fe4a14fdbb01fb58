"""Loading the pipeline's model artifact with transformers: one place for the dtype and logging choices."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline import architectures
from pipeline.errors import BadInput

# Quiet on success: no library progress bars. Set at import, before tqdm or transformers read them.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # GGUF import and ModelOpt use tqdm directly
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def quiet_libraries() -> None:
    """Keep transformers (and accelerate's note that offloaded weights are on the meta device) from logging below
    errors."""
    from transformers.utils import logging as hf_logging

    logging.getLogger("accelerate.big_modeling").setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def load_model(folder: Path, *, dtype: str = "auto", device_map: dict | None = None, offload_dir: Path | None = None):
    """(model, tokenizer) from a load artifact's model directory, in eval mode: on CPU, or placed by an accelerate
    `device_map` (pipeline.placement) with weights that fit nowhere else in `offload_dir`. `auto` keeps the dtype the
    weights are stored in (the load stage already applied model.dtype): a bf16 model is never upcast whole."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_libraries()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto" if dtype == "auto" else getattr(torch, dtype),
                                                 device_map=device_map, offload_folder=offload_dir)
    model.eval()
    return model, AutoTokenizer.from_pretrained(folder)


def state_dict(model):
    """(name, tensor on the CPU) for every entry of model.state_dict(), one at a time: weights accelerate placed on
    a GPU are copied back, offloaded (meta) ones are read from accelerate's weights map as they are reached, so the
    model is never materialised whole (accelerate's get_state_dict_offloaded_model would hold it all)."""
    hooks = offload_hooks(model)
    weights = getattr(hooks[-1].weights_map, "dataset", hooks[-1].weights_map) if hooks else None  # one shared loader
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.is_meta and weights is not None and name in weights:
            yield name, weights[name]
        else:
            yield name, tensor.detach().cpu()


def offload_hooks(model) -> list:
    """accelerate's offloading hooks (those holding a weights map) of every module of `model`."""
    from accelerate.hooks import AlignDevicesHook, SequentialHook

    found = []
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        for h in hook.hooks if isinstance(hook, SequentialHook) else [hook]:
            if isinstance(h, AlignDevicesHook) and h.offload and h.weights_map is not None:
                found.append(h)
    return found


INDEX_FILE = "model.safetensors.index.json"


def weight_files(folder: Path) -> dict[str, Path]:
    """Each tensor's safetensors file in a model directory, one file or shards with an index, checked against the
    files themselves: a shard the index names but the folder lacks, a tensor no shard holds, or a shard shorter
    than its header says (an interrupted copy) is a BadInput naming the file, not a traceback three stages later."""
    from safetensors import SafetensorError, safe_open

    index = folder / INDEX_FILE
    listed = json.loads(index.read_text())["weight_map"] if index.is_file() else None
    files = sorted({folder / f for f in listed.values()}) if listed else sorted(folder.glob("*.safetensors"))
    found: dict[str, Path] = {}
    for file in files:
        if not file.is_file():
            raise BadInput(f"model {folder.name}: {index.name} lists {file.name}, which is missing; copy the "
                           "complete model (every shard the index names)")
        try:
            with safe_open(file, "pt") as fh:
                found.update(dict.fromkeys(fh.keys(), file))
        except SafetensorError as exc:
            raise BadInput(f"model {folder.name}: {file.name} is damaged or truncated ({exc}); copy it again "
                           "from the source") from None
    unplaced = sorted(set(listed or ()) - set(found))
    if unplaced:
        raise BadInput(f"model {folder.name}: {index.name} names {len(unplaced)} tensors no shard holds (e.g. "
                       f"{unplaced[0]}); copy the complete model or fix the index")
    return found


@dataclass(frozen=True)
class ExpertSlice:
    """Where one expert projection lives in a transformers 5 fused experts module (3D gate_up_proj / down_proj)."""

    module: str
    param: str
    expert: int
    rows: slice


def expert_slices(model) -> dict[str, ExpertSlice]:
    """Each expert projection by the name ModelOpt's HF export gives it (e.g. ...mlp.experts.3.gate_proj)."""
    family = architectures.family(model.config.model_type)
    if family is None or not family.moe:
        return {}
    gate, up, down = family.expert_names
    slices = {}
    for name, module in model.named_modules():
        fused = getattr(module, "gate_up_proj", None)
        if fused is None or fused.ndim != 3:
            continue
        prefix = name.replace(".mlp.experts", f".{family.moe_block}.experts")
        half = fused.shape[1] // 2
        for e in range(fused.shape[0]):
            slices[f"{prefix}.{e}.{gate}"] = ExpertSlice(name, "gate_up_proj", e, slice(0, half))
            slices[f"{prefix}.{e}.{up}"] = ExpertSlice(name, "gate_up_proj", e, slice(half, None))
            slices[f"{prefix}.{e}.{down}"] = ExpertSlice(name, "down_proj", e, slice(None))
    return slices


def expert_weight(model, where: ExpertSlice, fake_quantized: bool = False):
    """A view of one expert projection's weight; with `fake_quantized`, passed through its ModelOpt weight quantizer."""
    module = model.get_submodule(where.module)
    weight = getattr(module, where.param)[where.expert]
    quantizers = getattr(module, f"{where.param}_weight_quantizers", None) if fake_quantized else None
    if quantizers is not None:
        weight = quantizers[where.expert](weight)
    return weight[where.rows]

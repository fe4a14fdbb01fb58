"""Model state replay: the model a downstream stage works on is the loaded model with every upstream state-changing
artifact put back onto it, in pipeline order (the calibration, then an optional fine-tuning). Stages that need the
model list MODEL_STATE among their inputs and call `restore_model`, so a new state-changing stage is added here once
and nobody downstream can skip it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

MODEL_STATE = ("calibrate", "finetune")  # pipeline order, which is replay order
FINETUNED_FILE = "finetuned.safetensors"


def restore_finetune(model, folder) -> None:
    """Put a fine-tuning artifact's trained weights back onto a calibrated model (offloaded weights: when read)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from pipeline.quant import OffloadedReplay

    replay = OffloadedReplay.of(model)
    if replay is not None:
        with safe_open(folder / FINETUNED_FILE, "pt") as fh:
            names = list(fh.keys())
        replay.put(model, {name: (folder / FINETUNED_FILE, name) for name in names})
        return
    result = model.load_state_dict(load_file(folder / FINETUNED_FILE), strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"fine-tuned weights do not fit this model: {result.unexpected_keys[:3]}")


def save_finetune(model, out: Path) -> int:
    """The trained weights (every parameter that is not quantizer state), as a replayable artifact; returns bytes."""
    from safetensors.torch import save_file

    tensors = {name: p.detach().contiguous() for name, p in trainable(model)}
    save_file(tensors, out / FINETUNED_FILE)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def trainable(model) -> list:
    """(name, parameter) pairs fine-tuning trains: the weights, not the calibrated quantizer ranges (as ModelOpt's
    QAT keeps amax fixed); tied parameters appear once."""
    return [(name, p) for name, p in model.named_parameters() if "quantizer" not in name]


def replay(model, inputs: Mapping):
    """Apply every state-changing artifact among `inputs` (stage -> artifact or folder) to `model`, in order."""
    from pipeline.quant import restore_calibration

    restorers = {"calibrate": restore_calibration, "finetune": restore_finetune}
    for stage in MODEL_STATE:
        if stage in inputs:
            restorers[stage](model, inputs[stage])
    return model


def restore_model(inputs: Mapping, dtype: str = "auto", device_map: dict | None = None,
                  offload_dir: Path | None = None):
    """(model, tokenizer): the load artifact's model (in its stored dtype unless `dtype` says otherwise) with every
    upstream state replayed onto it; placed by an accelerate `device_map` when one is given."""
    from pipeline.modeling import load_model

    model, tokenizer = load_model(inputs["load"] / "model", dtype=dtype, device_map=device_map,
                                  offload_dir=offload_dir)
    return replay(model, inputs), tokenizer


def restore_placed(ctx, scratch: Path, dtype: str = "auto"):
    """(model, tokenizer, placement) for a stage that writes the model out (quantize, the trtllm export): in CPU
    memory when the weights fit `model.max_memory` (the common case, as before), else with the rest offloaded to
    disk, where accelerate reads it from the model's own safetensors, and the upstream state replayed as each
    offloaded weight is read. The math runs on the CPU whatever GPUs the host has: these stages' outputs do not
    depend on the host, and only calibration's key records a device kind. `scratch` takes whatever accelerate
    cannot read in place (the caller removes it)."""
    from pipeline import placement

    spec = ctx.recipe.model.model_copy(update={"device": "cpu"})
    placed = placement.plan(ctx.inputs["load"] / "model", spec, dtype, resident_input=True)
    if placed.devices == {"cpu"}:
        return (*restore_model(ctx.inputs, dtype), placed)
    ctx.report({"placement": placed.to_json(), "message": f"placement: {placed.describe()}"})
    own = ctx.recipe.model.offload_dir
    offload = Path(own).expanduser() / scratch.name if own else scratch
    return (*restore_model(ctx.inputs, dtype, placed.device_map, offload), placed)

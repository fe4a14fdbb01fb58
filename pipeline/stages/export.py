"""export: the deployable checkpoints. `hf` is the unified Hugging Face checkpoint from quantize; `trtllm` is the
TensorRT-LLM checkpoint (config.json + rank{N}.safetensors) sharded for tp x pp; `onnx` the Q/DQ decoder. Each gets
the tokenizer, the generation config and a model card. Keyed on the quantized artifacts and export fields only:
never recalibrates. Each format is also a part with its own key (its inputs and only the fields it reads), so adding
a format to a recipe links the formats already exported elsewhere in the store (the runner does) instead of
exporting them again."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from pipeline import architectures, card, host
from pipeline.errors import BadInput, HostLacks, UnsupportedOnTarget
from pipeline.facts import Facts
from pipeline.files import link_tree
from pipeline.fmt import human_bytes
from pipeline.recipe import Recipe
from pipeline.stages.base import Stage, StageContext
from pipeline.stages.quantize import CHECKPOINT
from pipeline.state import MODEL_STATE

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
# ModelOpt 0.49 removed the TensorRT-LLM checkpoint exporter (TensorRT-LLM 1.3 had already removed trtllm-build):
# the unified HF checkpoint replaced both.
TRTLLM_LAST = "TensorRT-LLM 1.2.x and ModelOpt 0.48"
MODELOPT_WITHOUT_TRTLLM = (0, 49)
ONNX_MODULES = ("onnx_graphsurgeon", "onnxconverter_common", "onnxruntime")  # ModelOpt's ONNX exporters need them
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")


class ExportedFormat(Facts):
    """One format's folder: its weight bytes, its files, the quant_algo its config names, and for onnx what the
    exporter found quantized, whether the weights are external data, and the Q/DQ nodes by kind."""

    bytes: int
    files: list[str]
    quant_algo: str | None
    quantized: list[str] | None = None
    external_data: bool | None = None
    ops: dict[str, int] | None = None


class ExportFacts(Facts):
    formats: dict[str, ExportedFormat]
    fp16_bytes: int
    tp: int
    pp: int


class Export(Stage):
    name = "export"
    # 2: ONNX Runtime GenAI layout and genai_config.json; 3: cards say what loads each export; 4: ONNX weights
    # always in model.onnx.data; 5: part keys and reused parts are the runner's (manifest fields), not metadata
    version = "5"
    inputs = ("load", *MODEL_STATE, "quantize")
    fields = ("export",)
    libraries = ("torch", "transformers", "nvidia-modelopt", "onnx", "onnx-graphsurgeon")
    Facts = ExportFacts

    def preflight(self, recipe: Recipe, model: dict) -> None:
        if recipe.export.pp > 1 and "trtllm" not in recipe.export.formats:
            raise BadInput("export.pp applies to the trtllm format only; add trtllm to export.formats or set pp: 1")
        if model:
            _check_parallelism(model, recipe.export.tp, recipe.export.pp)
            architectures.check(recipe, model)  # the load artifact is cached, so load's own check did not run
        if "trtllm" in recipe.export.formats:
            _check_trtllm_exporter()
        missing = [m for m in ONNX_MODULES if not host.has_module(m)]
        if "onnx" in recipe.export.formats and missing:
            raise HostLacks(f"export format onnx needs {', '.join(missing)}: pip install 'quantpipe[rtx]'")

    def summary(self, facts: ExportFacts) -> str:
        return "; ".join(f"{f} {human_bytes(part.bytes)} ({part.bytes / facts.fp16_bytes:.2f}x of fp16)"
                         for f, part in facts.formats.items())

    def parts(self, recipe: Recipe) -> dict[str, dict[str, Any]]:
        """One part per format, reading only its own export fields (the quantize input already covers export.dtype
        for hf)."""
        spec = recipe.export
        fields = {"trtllm": {"tp": spec.tp, "pp": spec.pp, "dtype": spec.dtype}}
        return {fmt: {"format": fmt, **fields.get(fmt, {})} for fmt in spec.formats}

    def run(self, ctx: StageContext) -> ExportFacts:
        loaded, calibrated, quantized = ctx.input("load"), ctx.input("calibrate"), ctx.input("quantize")
        spec = ctx.recipe.export
        _check_parallelism(loaded.metadata, spec.tp, spec.pp)
        written = {}
        for fmt in spec.formats:
            target = ctx.out / fmt
            if (earlier := ctx.reused.get(fmt)) is not None:  # already linked in by the runner
                written[fmt] = earlier.facts.formats[fmt]
                continue
            details = {}
            if fmt == "hf":
                link_tree(quantized / CHECKPOINT, target)
            elif fmt == "trtllm":
                _export_trtllm(ctx, target, spec)
            else:
                details = _export_onnx(ctx.inputs, target)
            for name in TOKENIZER_FILES:
                if (loaded / "model" / name).is_file() and not (target / name).exists():
                    shutil.copy2(loaded / "model" / name, target / name)
            written[fmt] = ExportedFormat(bytes=_weights_bytes(target), files=sorted(p.name for p in target.iterdir()),
                                          quant_algo=_quant_algo(target), **details)
            host.release_memory()  # each format loaded its own model: free it before the next one loads
        # The target GPU is not part of this artifact's key, so its cards leave it out (publish adds it).
        facts = {**card.facts(ctx.recipe, {"load": loaded, "calibrate": calibrated}), "target": None}
        for fmt, part in written.items():
            readme = ctx.out / fmt / "README.md"
            readme.unlink(missing_ok=True)  # never write through a hard link into another artifact
            readme.write_text(card.render({**facts, **card.sharding(ctx.recipe, fmt), "bytes": part.bytes,
                                           "artifact": f"{fmt} checkpoint"}))
        return ExportFacts(formats=written, fp16_bytes=loaded.facts.parameters * 2, tp=spec.tp, pp=spec.pp)


def _check_trtllm_exporter() -> None:
    """The legacy TensorRT-LLM checkpoint: a warning while ModelOpt still has its exporter, exit 3 once it has not."""
    installed = host.version("nvidia-modelopt")
    if installed and tuple(int(part) for part in installed.split(".")[:2]) >= MODELOPT_WITHOUT_TRTLLM:
        raise UnsupportedOnTarget(f"export format trtllm needs ModelOpt 0.48 or older (installed: {installed}); "
                                  "export hf instead (TensorRT-LLM's LLM API, vLLM and SGLang load it) or install "
                                  "nvidia-modelopt==0.48.*")
    log.warning("export format trtllm and build.backend trtllm are legacy: the last versions that support them are "
                "%s; the hf checkpoint is what current TensorRT-LLM, vLLM and SGLang load", TRTLLM_LAST)


def _check_parallelism(model: dict, tp: int, pp: int) -> None:
    """tp must split heads, KV heads and the MLP evenly; pp must split the layers."""
    for what, count in (("attention heads", model["num_heads"]), ("KV heads", model["num_kv_heads"]),
                        ("intermediate size", model["intermediate_size"])):
        if count and count % tp:
            raise BadInput(f"export.tp {tp} does not divide the model's {count} {what}; use a tp that divides it")
    if model["num_layers"] and pp > model["num_layers"]:
        raise BadInput(f"export.pp {pp} exceeds the model's {model['num_layers']} layers; lower it")


def _export_trtllm(ctx, target: Path, spec) -> None:
    """ModelOpt 0.47's TensorRT-LLM exporter reads every weight directly (it has no streaming form for offloaded
    models), so the model must fit the CPU memory budget: one that would spill to disk stops here, before loading,
    with exit 4 (the hf checkpoint, written layer by layer by quantize, is what TensorRT-LLM loads today)."""
    import torch

    from pipeline import placement
    from pipeline.quant import export_trtllm
    from pipeline.state import restore_model

    folder = ctx.inputs["load"] / "model"
    placed = placement.plan(folder, ctx.recipe.model.model_copy(update={"device": "cpu"}))
    if placed.spills:
        raise HostLacks(f"export format trtllm needs the whole model in CPU memory ({placed.describe()} under "
                        "model.max_memory); raise model.max_memory.cpu on a larger host or export hf only")
    model, _ = restore_model(ctx.inputs)
    export_trtllm(model, getattr(torch, spec.dtype), target, spec.tp, spec.pp)


def _export_onnx(inputs: dict, target: Path) -> dict:
    from pipeline import genai, onnx_export
    from pipeline.quant import library_prints
    from pipeline.state import restore_model

    model, _ = restore_model(inputs, dtype="float32")  # the decoder graph computes in fp32 (inputs, caches, logits)
    target.mkdir(parents=True)
    with library_prints():
        details = onnx_export.export(model, target / ONNX_FILE)
    genai.write_config(target, model, ONNX_FILE)  # the folder is also an ONNX Runtime GenAI package
    return details


def _weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for pattern in ("*.safetensors", "*.onnx", "*.onnx.data")
               for p in folder.glob(pattern))


def _quant_algo(folder: Path) -> str | None:
    for name, path in (("hf_quant_config.json", ("quantization", "quant_algo")),
                       ("config.json", ("quantization", "quant_algo"))):
        try:
            value = json.loads((folder / name).read_text())
            for part in path:
                value = value[part]
            return value
        except (OSError, KeyError, TypeError, ValueError):
            continue
    return None

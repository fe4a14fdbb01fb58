"""Which model families each export format takes, as data, and the check every recipe passes before any work.

Sources (ModelOpt 0.47, transformers 5.23; every row measured with a tiny model in tests/test_architectures.py):
- modelopt/torch/export/model_utils.py, MODEL_NAME_TO_TYPE: the decoder type ModelOpt's exporters give a model class.
- modelopt/torch/export/tensorrt_llm_utils.py, convert_to_tensorrt_llm_config: TensorRT-LLM checkpoints exist for the
  decoder types gpt, gemma, llama, qwen, mpt, recurrentgemma, dbrx, mllama and encoder-decoders only; any other
  type raises "Cannot export tensorrt_llm checkpoint for model <type>".
- modelopt/torch/export/layer_utils.py, build_moe_config: MoE layers for the decoder types llama, dbrx, phi3,
  deepseek and qwen, and only with experts held as a list of modules; transformers 5 fuses each layer's experts
  into one module ("object of type 'QuantMixtralExperts' has no len()").
- modelopt/torch/export/unified_export_hf.py, requantize_resmooth_fused_llm_layers: for AWQ formats it resmooths
  MoE experts through layer_utils.get_experts_list, which also needs a list of expert modules.
- pipeline/onnx_export.py: the decoder graph is traced, so a data-dependent path (which experts a token is routed
  to) is frozen at the example's routing (onnxruntime then fails on other inputs: "Cannot split using values in
  'split' attribute"); its KV cache is one tensor for all layers, so a sliding-window layer (whose cache keeps
  window - 1 positions) only fits while sequences stay shorter than the window.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.backends import registry
from pipeline.errors import UnsupportedOnTarget
from pipeline.formats import FORMATS
from pipeline.recipe import Recipe

TRTLLM_EXPORTER = "ModelOpt's TensorRT-LLM checkpoint exporter"
FUSED_EXPERTS = (f"{TRTLLM_EXPORTER} needs each layer's experts as separate modules, and transformers 5 fuses them "
                 "into one")
TRACED_ROUTING = ("the ONNX decoder is traced, which freezes the expert routing of the example input (data-dependent "
                  "expert selection)")
AWQ_EXPERTS = ("ModelOpt's HF checkpoint exporter resmooths AWQ experts as separate modules, and transformers 5 fuses "
               "them into one")
MOE_REFUSED = {"trtllm": FUSED_EXPERTS, "onnx": TRACED_ROUTING}
MOE_REFUSED_FORMATS = dict.fromkeys(("int4_awq", "w4a8_awq", "nvfp4_awq"), AWQ_EXPERTS)


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # config.json model_type
    decoder_type: str  # what ModelOpt's MODEL_NAME_TO_TYPE calls it
    refused: dict[str, str] = field(default_factory=dict)  # export format -> why it cannot take this family
    refused_formats: dict[str, str] = field(default_factory=dict)  # quantization.format -> why not
    moe: bool = False  # calibration must route tokens to every expert
    # How ModelOpt's HF export names a fused expert's projections (gate, up, down) and the block holding them.
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    moe_block: str = "mlp"


def _no_trtllm(decoder_type: str) -> str:
    return f"{TRTLLM_EXPORTER} has no '{decoder_type}' decoder"


FAMILIES: tuple[Family, ...] = (
    Family("Llama", ("llama",), "llama"),
    Family("Mistral", ("mistral",), "llama"),
    Family("Qwen2", ("qwen2",), "qwen"),
    Family("Qwen3", ("qwen3",), "qwen"),
    Family("Phi-3", ("phi3",), "phi3", {"trtllm": _no_trtllm("phi3")}),
    Family("Gemma 2", ("gemma2",), "gemma2", {"trtllm": _no_trtllm("gemma2")}),
    Family("Gemma 3", ("gemma3_text",), "gemma3", {"trtllm": _no_trtllm("gemma3")}),
    Family("Qwen2-MoE", ("qwen2_moe",), "qwen", MOE_REFUSED, MOE_REFUSED_FORMATS, moe=True),
    Family("Qwen3-MoE", ("qwen3_moe",), "qwen3moe", MOE_REFUSED, MOE_REFUSED_FORMATS, moe=True),
    Family("Mixtral", ("mixtral",), "llama", MOE_REFUSED, MOE_REFUSED_FORMATS, moe=True,
           expert_names=("w1", "w3", "w2"), moe_block="block_sparse_moe"),
)
BY_MODEL_TYPE: dict[str, Family] = {t: f for f in FAMILIES for t in f.model_types}
# GGUF files name their architecture differently (general.architecture).
GGUF_MODEL_TYPES: dict[str, str] = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gemma3": "gemma3_text"}
MODELOPT_FORMATS = tuple(FORMATS)  # every quantization.format


def family(model_type: str | None) -> Family | None:
    return BY_MODEL_TYPE.get(model_type or "")


def model_facts(config: dict) -> dict:
    """What the checks read from a config.json: its family and its shortest sliding attention window."""
    layer_types = config.get("layer_types")
    sliding = config.get("sliding_window") if not layer_types or "sliding_attention" in layer_types else None
    if config.get("use_sliding_window") is False:
        sliding = None
    return {"model_type": config.get("model_type"), "architecture": (config.get("architectures") or ["?"])[0],
            "attention_window": sliding or None}


def refusals(facts: dict, max_seq_len: int) -> dict[str, str]:
    """Export format -> why it cannot take this model ({} for an unknown family: nothing is known against it)."""
    known = family(facts.get("model_type"))
    reasons = dict(known.refused) if known else {}
    window = facts.get("attention_window")
    if window and window <= max_seq_len and "onnx" not in reasons:
        reasons["onnx"] = (f"its sliding attention window ({window} tokens) is not longer than build.max_seq_len "
                           f"{max_seq_len}, and the ONNX decoder's one KV cache tensor cannot drop old positions")
    return reasons


def check(recipe: Recipe, facts: dict) -> None:
    """UnsupportedOnTarget (exit 3) naming the architecture and the quantization or export format (and the build
    backend that builds from it) when the recipe asks for something that cannot take this model."""
    known = family(facts.get("model_type"))
    name = f"{known.name} ({facts.get('architecture')})" if known else facts.get("architecture")
    fmt = recipe.quantization.format
    if known and fmt in known.refused_formats:
        others = [f for f in MODELOPT_FORMATS if f not in known.refused_formats]
        raise UnsupportedOnTarget(f"{name} cannot be quantized as {fmt}: {known.refused_formats[fmt]}; use "
                                  f"quantization.format {' or '.join(others)}")
    reasons = refusals(facts, recipe.build.max_seq_len)
    for export in recipe.export.formats:
        if export not in reasons:
            continue
        builds = [n for n, b in registry().items() if b.export == export and n == recipe.build.backend]
        via = f" (build.backend {builds[0]} builds from it)" if builds else ""
        others = [f for f in ("hf", "trtllm", "onnx") if f not in reasons]
        backends = ["none", *(n for n, b in registry().items() if b.export in others)]
        raise UnsupportedOnTarget(
            f"{name} cannot be exported as {export}{via}: {reasons[export]}; keep export.formats to "
            f"{' and '.join(others)}, and build.backend to {' or '.join(backends)}"
        )

"""The ONNX Runtime GenAI package: the exported decoder folder (model.onnx, its data, tokenizer files) plus the
`genai_config.json` that onnxruntime-genai loads, so its generation loop, KV cache and tokenizer run the graph.

The config is written in export for the CPU provider (target-independent, like the export itself); publish names
the TensorRT-RTX execution provider where every target GPU is an RTX-class one that TensorRT-RTX runs."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline import targets

CONFIG_FILE = "genai_config.json"
RTX_PROVIDER = "NvTensorRtRtx"  # ONNX Runtime's TensorRT-RTX execution provider


def config(model_config, generation_config, onnx_file: str) -> dict:
    """genai_config.json for the exported decoder of a transformers model (greedy search by default)."""
    from pipeline.onnx_export import KV_PAST, KV_PRESENT  # imports torch: not for publish's import of this module

    heads, layers = model_config.num_attention_heads, model_config.num_hidden_layers
    context = model_config.max_position_embeddings
    token = {name: _first(getattr(generation_config, name, None), getattr(model_config, name, None))
             for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    eos = token["eos_token_id"]
    return {
        "model": {
            "type": model_config.model_type,
            "bos_token_id": token["bos_token_id"],
            "eos_token_id": eos,
            "pad_token_id": _first(token["pad_token_id"], eos[0] if isinstance(eos, list) else eos),
            "vocab_size": model_config.vocab_size,
            "context_length": context,
            "decoder": {
                "filename": onnx_file,
                # ONNX Runtime's fused INT4 MatMul would quantize activations to int8: keep the model's math.
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": [],
                                    "session.qdq_matmulnbits_accuracy_level": "0"},
                "head_size": getattr(model_config, "head_dim", None) or model_config.hidden_size // heads,
                "hidden_size": model_config.hidden_size,
                "num_attention_heads": heads,
                "num_key_value_heads": model_config.num_key_value_heads,
                "num_hidden_layers": layers,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "past_key_names": KV_PAST.format("key"), "past_value_names": KV_PAST.format("value")},
                "outputs": {"logits": "logits", "present_key_names": KV_PRESENT.format("key"),
                            "present_value_names": KV_PRESENT.format("value")},
            },
        },
        # The graph returns past + new tokens as its present cache: no shared buffer.
        "search": {"max_length": context, "past_present_share_buffer": False, "do_sample": False, "num_beams": 1,
                   "num_return_sequences": 1, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
                   "repetition_penalty": 1.0, "min_length": 0, "early_stopping": True},
    }


def write_config(folder: Path, model, onnx_file: str) -> None:
    """Write the CPU-provider config for `model` (a transformers model) into its exported ONNX folder."""
    (folder / CONFIG_FILE).write_text(json.dumps(config(model.config, model.generation_config, onnx_file), indent=2))


def _first(*values):
    return next((v for v in values if v is not None), None)


def providers_for(gpus: tuple[str, ...]) -> list[dict]:
    """The execution providers a package for these target GPUs names: TensorRT-RTX where all of them run it."""
    rtx = all(int(gpu.removeprefix("sm_")) in targets.backend_archs()["tensorrt-rtx"] for gpu in gpus)
    return [{RTX_PROVIDER: {}}] if rtx else []


def with_providers(config: bytes, gpus: tuple[str, ...]) -> bytes:
    """A package's config (genai_config.json's bytes) naming the execution providers for its target GPUs."""
    data = json.loads(config)
    data["model"]["decoder"]["session_options"]["provider_options"] = providers_for(gpus)
    return json.dumps(data, indent=2).encode()

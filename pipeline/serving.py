"""Serving bundles: how TensorRT-LLM, vLLM and SGLang serve a published unified HF checkpoint, as data.

Sources (checked 2026-11):
- TensorRT-LLM `trtllm-serve` and LLM API: `trtllm-serve MODEL --backend pytorch --extra_llm_api_options FILE`; the
  YAML holds LLM API arguments (max_batch_size, max_num_tokens, max_seq_len, kv_cache_config.dtype); the weight
  quantization is read from the checkpoint's hf_quant_config.json. It serves every ModelOpt format.
- vLLM `vllm/model_executor/layers/quantization/modelopt.py`: ModelOptFp8Config ("modelopt", FP8, sm_89+) and
  ModelOptNvFp4Config ("modelopt_fp4", NVFP4); KV_CACHE_QUANT_ALGOS = ["FP8"]. No ModelOpt INT8-SQ, INT4-AWQ or
  W4A8-AWQ loader.
- SGLang `python -m sglang.launch_server`: the same ModelOpt methods ("modelopt", "modelopt_fp4");
  `--kv-cache-dtype fp8_e4m3` for an FP8 KV cache.
"""

from __future__ import annotations

import shlex

import yaml

from pipeline import targets
from pipeline.recipe import Recipe

# LLM API kv_cache_config.dtype per quantization.kv_cache.
TRTLLM_KV_CACHE_DTYPE = {"none": "auto", "fp8": "fp8", "nvfp4": "nvfp4"}
# quantization.format -> the --quantization method vLLM and SGLang load a ModelOpt checkpoint of it with.
MODELOPT_METHOD = {"fp8": "modelopt", "nvfp4": "modelopt_fp4"}
# quantization.kv_cache -> each engine's --kv-cache-dtype (absent: that engine has no such KV cache).
KV_CACHE_FLAG = {"vllm": {"none": None, "fp8": "fp8"}, "sglang": {"none": None, "fp8": "fp8_e4m3"}}
OPTIONS_FILE = "trtllm-llm-api-options.yaml"


def llm_api_options(recipe: Recipe) -> dict:
    """TensorRT-LLM LLM API arguments from the recipe's build section (quantization comes from the checkpoint)."""
    spec = recipe.build
    return {"max_batch_size": spec.max_batch_size, "max_num_tokens": spec.max_num_tokens,
            "max_seq_len": spec.max_seq_len,
            "kv_cache_config": {"dtype": TRTLLM_KV_CACHE_DTYPE[recipe.quantization.kv_cache]}}


def refusal(engine: str, recipe: Recipe) -> str | None:
    """Why vLLM or SGLang cannot serve this checkpoint (None when it can)."""
    fmt, kv = recipe.quantization.format, recipe.quantization.kv_cache
    if fmt not in MODELOPT_METHOD:
        return f"its ModelOpt loaders take {' and '.join(f.upper() for f in MODELOPT_METHOD)} only, not {fmt}"
    if kv not in KV_CACHE_FLAG[engine]:
        return f"it has no ModelOpt {kv} KV cache"
    return None


def commands(recipe: Recipe, checkpoint: str) -> dict[str, str]:
    """engine -> the exact serve command for the HF checkpoint at `checkpoint`, for each engine that serves it."""
    spec, path = recipe.build, shlex.quote(checkpoint)
    found = {"trtllm": f"trtllm-serve {path} --backend pytorch --extra_llm_api_options "
                       f"{shlex.quote(f'{checkpoint}/serve/{OPTIONS_FILE}')}"}
    if refusal("vllm", recipe) is None:
        found["vllm"] = " ".join([f"vllm serve {path} --quantization {MODELOPT_METHOD[recipe.quantization.format]}",
                                  *_kv_flag("vllm", recipe), f"--max-model-len {spec.max_seq_len}",
                                  f"--max-num-seqs {spec.max_batch_size}",
                                  f"--max-num-batched-tokens {spec.max_num_tokens}"])
    if refusal("sglang", recipe) is None:
        found["sglang"] = " ".join([f"python -m sglang.launch_server --model-path {path}",
                                    f"--quantization {MODELOPT_METHOD[recipe.quantization.format]}",
                                    *_kv_flag("sglang", recipe),
                                    f"--context-length {spec.max_seq_len}",
                                    f"--max-running-requests {spec.max_batch_size}"])
    return found


def _kv_flag(engine: str, recipe: Recipe) -> list[str]:
    dtype = KV_CACHE_FLAG[engine][recipe.quantization.kv_cache]
    return [f"--kv-cache-dtype {dtype}"] if dtype else []


def bundle(recipe: Recipe, checkpoint: str) -> dict[str, bytes]:
    """The files published in <checkpoint>/serve/: the LLM API options and one shell script per serving engine."""
    files = {OPTIONS_FILE: yaml.safe_dump(llm_api_options(recipe), sort_keys=False).encode()}
    for engine, command in commands(recipe, checkpoint).items():
        files[f"{engine}-serve.sh"] = f"#!/bin/sh\nexec {command}\n".encode()
    return files


ENGINE_NAMES = {"trtllm": "TensorRT-LLM (PyTorch backend)", "vllm": "vLLM", "sglang": "SGLang"}


def card_lines(recipe: Recipe, checkpoint: str) -> list[str]:
    """The model card's serving section: where the format runs, then each engine's command (also in
    serve/<engine>-serve.sh; TensorRT-LLM's options in serve/trtllm-llm-api-options.yaml) or why it cannot serve it."""
    q = recipe.quantization
    archs = frozenset.intersection(*(targets.format_archs()[f] for f in (q.format, *(q.auto.candidates if q.auto
                                                                                     else ()))))
    runs_on = ", ".join(targets.ARCHS[sm].label for sm in sorted(archs))
    found = commands(recipe, checkpoint)
    lines = [(f"{recipe.quantization.format} runs natively on {runs_on}. Each command is also in "
              f"`serve/<engine>-serve.sh`; TensorRT-LLM's options are in `serve/{OPTIONS_FILE}`."), ""]
    for engine, name in ENGINE_NAMES.items():
        lines.append(f"- {name}: `{found[engine]}`" if engine in found else
                     f"- {name}: does not serve it ({refusal(engine, recipe)})")
    return lines

"""TensorRT-LLM on GPU hosts. Its pins (torch, transformers, modelopt, Python) clash with ours, so it runs in its
own interpreter: $QUANTPIPE_TRTLLM_PYTHON (default: this one). <= 1.2 builds engines with trtllm-build; newer
releases have no engine path and serve the checkpoint through the PyTorch backend (LLM API)."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline import formats, host, serving
from pipeline.backends import Builder, registry
from pipeline.errors import HostLacks
from pipeline.facts import Facts


def interpreter() -> str:
    return os.environ.get("QUANTPIPE_TRTLLM_PYTHON") or sys.executable


@functools.cache
def trtllm_version() -> str | None:
    """tensorrt_llm's version in its interpreter, or None when it does not import (e.g. no libnvinfer)."""
    try:
        probe = subprocess.run([interpreter(), "-c", "import tensorrt_llm; print(tensorrt_llm.__version__)"],
                               capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = probe.stdout.strip().splitlines()
    return lines[-1] if probe.returncode == 0 and lines else None


def _missing(recipe) -> str | None:
    sm = int(recipe.target.gpu.removeprefix("sm_"))
    gpus = host.gpus()
    matching = [g for g in gpus if g.sm == sm]
    if trtllm_version() and matching:
        return None
    found = [f"tensorrt_llm {trtllm_version()}" if trtllm_version() else f"no tensorrt_llm in {interpreter()}",
             ", ".join(f"{g.name} (sm_{g.sm})" for g in gpus) or "no NVIDIA GPU"]
    return (f"build.backend {recipe.build.backend} needs tensorrt_llm and an NVIDIA {recipe.target.gpu} GPU; found "
            f"{'; '.join(found)} (set QUANTPIPE_TRTLLM_PYTHON to an interpreter with tensorrt_llm)")


def _environment(recipe) -> dict:
    return {"tensorrt_llm": trtllm_version(), "gpus": [f"{g.name} (sm_{g.sm})" for g in host.gpus()]}


class _TrtllmBackend(Builder):
    """What both TensorRT-LLM paths share: its own interpreter, and a GPU of the target architecture."""
    missing = staticmethod(_missing)
    environment = staticmethod(_environment)


class TrtllmEngineFacts(Facts):
    backend: Literal["trtllm"]
    engine_bytes: int
    command: list[str]
    engines: int
    tensorrt_llm: str | None


class TrtllmPytorchFacts(Facts):
    backend: Literal["trtllm-pytorch"]
    options: dict[str, Any]
    tensorrt_llm: str | None


class TrtllmEngine(_TrtllmBackend):
    """A TensorRT engine from the exported TensorRT-LLM checkpoint with trtllm-build (TensorRT-LLM <= 1.2)."""

    info = registry()["trtllm"]
    Facts = TrtllmEngineFacts

    def build(self, ctx, tool_cache: Path) -> dict:
        spec, fmt = ctx.recipe.build, ctx.recipe.quantization.format
        checkpoint = ctx.input("export") / self.info.export
        builder = shutil.which("trtllm-build", path=str(Path(interpreter()).parent)) or shutil.which("trtllm-build")
        if builder is None:
            raise HostLacks(f"trtllm-build not found beside {interpreter()}: TensorRT-LLM >= 1.3 has no engine "
                            "builder, use build.backend: trtllm-pytorch")
        timing_cache = tool_cache / f"timing-{trtllm_version()}-{ctx.recipe.target.gpu}.cache"
        command = [builder, "--checkpoint_dir", str(checkpoint), "--output_dir", str(ctx.out / "engine"),
                   "--max_batch_size", str(spec.max_batch_size), "--max_input_len", str(spec.max_input_len),
                   "--max_seq_len", str(spec.max_seq_len), "--max_num_tokens", str(spec.max_num_tokens),
                   "--gemm_plugin", formats.get(fmt).gemm_plugin, "--timing_cache", str(timing_cache)]
        subprocess.run(command, check=True, capture_output=True, text=True)
        for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            if (checkpoint / name).is_file():
                shutil.copy2(checkpoint / name, ctx.out / "engine" / name)
        engines = list((ctx.out / "engine").glob("*.engine"))
        return {"backend": "trtllm", "command": command[1:], "engines": len(engines),
                "engine_bytes": sum(e.stat().st_size for e in engines), "tensorrt_llm": trtllm_version()}


class TrtllmPytorch(_TrtllmBackend):
    """The PyTorch-backend deployable: the HF checkpoint plus LLM API options, loaded once to warm the autotuner."""

    info = registry()["trtllm-pytorch"]
    Facts = TrtllmPytorchFacts

    def build(self, ctx, tool_cache: Path) -> dict:
        checkpoint = ctx.input("export") / self.info.export
        shutil.copytree(checkpoint, ctx.out / "checkpoint")
        options = serving.llm_api_options(ctx.recipe)
        (ctx.out / "llm_api_options.yaml").write_text(yaml.safe_dump(options))
        warm = ("import sys, yaml; from tensorrt_llm import LLM; "
                "llm = LLM(model=sys.argv[1], **yaml.safe_load(open(sys.argv[2]))); "
                "print(llm.generate(['Hello'])[0].outputs[0].text)")
        env = {**os.environ, "TLLM_AUTOTUNER_CACHE_PATH": str(tool_cache / "autotuner.cache")}
        subprocess.run([interpreter(), "-c", warm, str(ctx.out / "checkpoint"), str(ctx.out / "llm_api_options.yaml")],
                       check=True, capture_output=True, text=True, env=env)
        (ctx.out / "bundle.json").write_text(json.dumps({"backend": "pytorch", "options": options}, indent=2))
        return {"backend": "trtllm-pytorch", "options": options, "tensorrt_llm": trtllm_version()}

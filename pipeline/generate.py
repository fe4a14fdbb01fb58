"""Talking to what a run made: a published folder (engines/<model>/<format>-<target>/) or a recipe whose run is
cached, run by the best runtime this host has. Runtimes sit in a registry, each saying what it lacks here; they
turn prompt token ids into a stream of new token ids, and the tokenizer (the package's own files) does the rest."""

from __future__ import annotations

import functools
import itertools
import json
import logging
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import genai, host
from pipeline.errors import BadInput, HostLacks
from pipeline.state import MODEL_STATE, replay
from pipeline.store import ArtifactStore

log = logging.getLogger(__name__)

# (prompt ids, max new tokens, stop ids) -> new token ids, the stop token included when one ends the answer
Generate = Callable[[list[int], int, set[int]], Iterator[int]]
FP4_OPS = ("TRT_FP4DynamicQuantize", "TRT_FP4QDQ")  # TensorRT's FP4 ops: no ONNX Runtime kernel runs them


@dataclass
class Deployment:
    """The parts of one build a runtime may use; any of them may be absent."""

    name: str
    onnx: Path | None = None  # the ONNX Runtime GenAI package (the export's onnx folder)
    engine: Path | None = None  # a TensorRT-RTX build: model.engine + engine.json
    hf: Path | None = None  # ModelOpt's unified HF checkpoint
    keys: dict[str, str] = field(default_factory=dict)  # artifact key per stage, to find the cached model
    store: ArtifactStore | None = None

    @property
    def tokenizer_folder(self) -> Path:
        folder = self.onnx or self.hf
        if folder is None:
            raise BadInput(f"{self.name} holds neither an onnx nor an hf checkpoint to take a tokenizer from; "
                           "export it with export.formats including onnx")
        return folder


def resolve(target: str, overrides: list[str], store: ArtifactStore) -> Deployment:
    """A published folder (it has build.json), or a preset/recipe file whose export is in the store."""
    from pipeline.publish import PROVENANCE

    folder = Path(target)
    if (folder / PROVENANCE).is_file():
        keys = json.loads((folder / PROVENANCE).read_text())["keys"]
        present = {part: folder / part for part in ("onnx", "engine", "hf") if (folder / part).is_dir()}
        return Deployment(str(folder), keys=keys, store=store, **present)
    if folder.is_dir():
        raise BadInput(f"{folder} is not a published build (no {PROVENANCE}); pass engines/<model>/<format>-<target> "
                       "or a recipe")
    return _from_store(target, overrides, store)


def _from_store(name: str, overrides: list[str], store: ArtifactStore) -> Deployment:
    from pipeline import runner
    from pipeline.recipe import load_recipe

    recipe = load_recipe(name, overrides)
    keys = {step.stage.name: step.key for step in runner.plan(recipe, store)}
    export = store.get("export", keys["export"])
    if export is None:
        raise BadInput(f"{recipe.name} has no export in {store.root}; run `quantpipe run {name}` with the same "
                       "--set options first")
    build = store.get("build", keys["build"]) if "build" in keys else None
    return Deployment(recipe.name, keys=keys, store=store, engine=build.path if build is not None else None,
                      **{part: export / part for part in ("onnx", "hf") if (export / part).is_dir()})


class OnnxRuntimeGenAI:
    name = "onnxruntime-genai"

    def missing(self, deployment: Deployment) -> str | None:
        if deployment.onnx is None or not (deployment.onnx / genai.CONFIG_FILE).is_file():
            return "no ONNX Runtime GenAI package (an onnx folder with genai_config.json): export format onnx"
        if not host.has_module("onnxruntime_genai"):
            return "onnxruntime-genai is not installed: pip install 'quantpipe[rtx]'"
        if ops := _fp4_ops(deployment.onnx):
            return (f"the ONNX uses TensorRT's FP4 ops ({', '.join(ops)}), which ONNX Runtime cannot run; it runs "
                    "as the TensorRT-RTX engine on a Blackwell RTX GPU")
        return None

    def load(self, deployment: Deployment) -> Generate:
        import onnxruntime_genai as og

        config = og.Config(str(deployment.onnx))
        config.clear_providers()  # the CPU provider here; the package names TensorRT-RTX for its RTX target
        model = og.Model(config)

        def generate(prompt: list[int], max_new_tokens: int, stop: set[int]) -> Iterator[int]:
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=len(prompt) + max_new_tokens)
            generator = og.Generator(model, params)
            generator.append_tokens(prompt)
            while not generator.is_done():
                generator.generate_next_token()
                token = int(generator.get_next_tokens()[0])
                yield token
                if token in stop:
                    return

        return generate


class TensorRTRTXEngine:
    name = "tensorrt-rtx"

    def missing(self, deployment: Deployment) -> str | None:
        from pipeline.backends.tensorrt_rtx import ENGINE_FILE, runnable_here

        if deployment.engine is None or not (deployment.engine / ENGINE_FILE).is_file() or deployment.onnx is None:
            return "no TensorRT-RTX engine and its ONNX package in this build (build.backend tensorrt-rtx)"
        built_for = json.loads((deployment.engine / "engine.json").read_text())
        if runnable_here(built_for) is None:
            found = ", ".join(f"{g.name} (sm_{g.sm})" for g in host.gpus()) or "no NVIDIA GPU"
            return (f"the engine runs on an RTX GPU of {built_for['compute_capability']} with the tensorrt-rtx "
                    f"package and CUDA torch; found {found}")
        return None

    def load(self, deployment: Deployment) -> Generate:
        import numpy as np

        from pipeline.backends.tensorrt_rtx import ENGINE_FILE, engine_decoder

        decoder, cache_shape = engine_decoder(deployment.engine / ENGINE_FILE), _cache_shape(deployment.onnx)

        def generate(prompt: list[int], max_new_tokens: int, stop: set[int]) -> Iterator[int]:
            picked = decoder.greedy(np.array(prompt), cache_shape, stop)
            return (token for _, token in itertools.islice(picked, max_new_tokens))

        return generate


class TensorRTLLM:
    """TensorRT-LLM's LLM API (PyTorch backend) on the HF checkpoint, in its own interpreter: a small server
    reading requests on stdin and answering "@tokens <json list>" lines (its own logs share stdout), then null."""

    name = "trtllm"
    script = """
import asyncio, json, sys
from tensorrt_llm import LLM, SamplingParams

llm = LLM(model=sys.argv[1])

async def answer(request):
    params = SamplingParams(max_tokens=request["max_new_tokens"], top_k=1, stop_token_ids=request["stop"])
    seen = 0
    async for output in llm.generate_async(request["prompt"], sampling_params=params, streaming=True):
        tokens = output.outputs[0].token_ids
        print("@tokens", json.dumps(tokens[seen:]), flush=True)
        seen = len(tokens)
    print("@tokens null", flush=True)

for line in sys.stdin:
    asyncio.run(answer(json.loads(line)))
"""

    def missing(self, deployment: Deployment) -> str | None:
        from pipeline.backends.trtllm import interpreter, trtllm_version

        if deployment.hf is None:
            return "no HF checkpoint in this build (export format hf)"
        if not host.gpus() or trtllm_version() is None:
            found = ", ".join(g.name for g in host.gpus()) or "no NVIDIA GPU"
            return (f"needs an NVIDIA GPU and tensorrt_llm in {interpreter()} (set QUANTPIPE_TRTLLM_PYTHON to an "
                    f"interpreter with it); found {found}")
        return None

    def load(self, deployment: Deployment) -> Generate:
        from pipeline.backends.trtllm import interpreter

        server = subprocess.Popen([interpreter(), "-c", self.script, str(deployment.hf)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)

        def generate(prompt: list[int], max_new_tokens: int, stop: set[int]) -> Iterator[int]:
            request = {"prompt": prompt, "max_new_tokens": max_new_tokens, "stop": sorted(stop)}
            server.stdin.write(json.dumps(request) + "\n")
            server.stdin.flush()
            while line := server.stdout.readline():
                if line.startswith("@tokens "):
                    if (tokens := json.loads(line.removeprefix("@tokens "))) is None:
                        return
                    yield from tokens
            raise RuntimeError(f"TensorRT-LLM exited with {server.wait()} before answering; its log is above")

        return generate


class FakeQuantizedPyTorch:
    """The calibrated model with ModelOpt's fake quantization, from the cache: a simulation of the format, chosen
    only by name (`--runtime pytorch`), never standing in for the artifact itself."""

    name = "pytorch"

    def missing(self, deployment: Deployment) -> str | None:
        absent = [stage for stage in ("load", *MODEL_STATE)
                  if stage in deployment.keys and not _cached_model(deployment, stage)]
        return f"the {' and '.join(absent)} artifacts are not in this cache (--cache-dir)" if absent else None

    def load(self, deployment: Deployment) -> Generate:
        model = load_unquantized(deployment)
        replay(model, {stage: _cached_model(deployment, stage) for stage in MODEL_STATE if stage in deployment.keys})
        return functools.partial(_torch_greedy, model)


RUNTIMES = {runtime.name: runtime for runtime in
            (TensorRTRTXEngine(), TensorRTLLM(), OnnxRuntimeGenAI(), FakeQuantizedPyTorch())}
AUTO = ("tensorrt-rtx", "trtllm", "onnxruntime-genai")  # best first; pytorch only when asked for


def pick(deployment: Deployment, wanted: str = "auto") -> tuple[str, Generate]:
    """The first runtime (of `wanted`, or the best this host has) that can run the deployment, loaded."""
    names = AUTO if wanted == "auto" else (wanted,)
    reasons = {}
    for name in names:
        runtime = RUNTIMES[name]
        if (reason := runtime.missing(deployment)) is None:
            log.info("running %s with %s", deployment.name, name)
            return name, runtime.load(deployment)
        reasons[name] = reason
    fallback = wanted == "auto" and RUNTIMES["pytorch"].missing(deployment) is None
    raise HostLacks(f"no runtime here can run {deployment.name}: "
                    + "; ".join(f"{name}: {reason}" for name, reason in reasons.items())
                    + ("; --runtime pytorch runs its fake-quantized model from the cache instead" if fallback else ""))


@dataclass
class Answer:
    text: str
    tokens: int
    seconds: float

    def to_json(self) -> dict:
        return {"text": self.text, "tokens": self.tokens, "seconds": round(self.seconds, 3),
                "tokens_per_second": round(self.tokens / self.seconds, 2) if self.seconds else None}


class Conversation:
    """A loaded runtime plus the package's tokenizer: prompts in, streamed text out."""

    def __init__(self, deployment: Deployment, generate: Generate) -> None:
        from transformers import AutoTokenizer

        from pipeline.modeling import quiet_libraries

        quiet_libraries()
        self.tokenizer = AutoTokenizer.from_pretrained(deployment.tokenizer_folder)
        self.generate = generate
        self.stop = _stop_ids(deployment.tokenizer_folder, self.tokenizer)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                       return_dict=False))

    def prompt_ids(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt).input_ids

    def stream(self, ids: list[int], max_new_tokens: int, answer: list[Answer]) -> Iterator[str]:
        """Yield the answer's text as it grows; `answer` receives the finished Answer."""
        started, tokens, text = time.perf_counter(), [], ""
        for token in self.generate(ids, max_new_tokens, self.stop):
            tokens.append(token)
            # Decode the whole answer each time: a word can span tokens, so new text is the grown suffix.
            grown = self.tokenizer.decode(tokens, skip_special_tokens=True)
            if len(grown) > len(text) and not grown.endswith("\ufffd"):
                yield grown[len(text):]
                text = grown
        answer.append(Answer(self.tokenizer.decode(tokens, skip_special_tokens=True), len(tokens),
                             time.perf_counter() - started))


def unquantized(deployment: Deployment) -> Generate:
    """The unquantized model in PyTorch, for comparison."""
    return functools.partial(_torch_greedy, load_unquantized(deployment))


def load_unquantized(deployment: Deployment):
    """The unquantized model the build started from: the load stage's artifact in this cache."""
    from pipeline.modeling import load_model

    folder = _cached_model(deployment, "load")
    if folder is None:
        raise BadInput(f"the unquantized model of {deployment.name} (load artifact "
                       f"{deployment.keys.get('load', '?')[:12]}) is not in this cache; pass the --cache-dir it "
                       "was built with")
    return load_model(folder / "model")[0]


def _cached_model(deployment: Deployment, stage: str) -> Path | None:
    key = deployment.keys.get(stage)
    artifact = deployment.store.get(stage, key) if key and deployment.store else None
    return artifact.path if artifact is not None else None


def _fp4_ops(folder: Path) -> list[str]:
    import onnx

    graph = onnx.load(str(folder / json.loads((folder / genai.CONFIG_FILE).read_text())["model"]["decoder"]
                          ["filename"]), load_external_data=False).graph
    return sorted({node.op_type for node in graph.node if node.op_type in FP4_OPS})


def _stop_ids(folder: Path, tokenizer) -> set[int]:
    eos = json.loads((folder / genai.CONFIG_FILE).read_text())["model"]["eos_token_id"] \
        if (folder / genai.CONFIG_FILE).is_file() else tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos])


def _cache_shape(folder: Path) -> tuple[int, int, int, int, int]:
    """An empty KV cache's [L,B,KVH,P,D] shape, from the package's config."""
    decoder = json.loads((folder / genai.CONFIG_FILE).read_text())["model"]["decoder"]
    return decoder["num_hidden_layers"], 1, decoder["num_key_value_heads"], 0, decoder["head_size"]


def _torch_greedy(model, prompt: list[int], max_new_tokens: int, stop: set[int]) -> Iterator[int]:
    import torch
    from transformers import DynamicCache

    cache, ids = DynamicCache(config=model.config), torch.tensor([prompt])
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            out = model(input_ids=ids, past_key_values=cache, use_cache=True)
            token = int(out.logits[0, -1].argmax())
            yield token
            if token in stop:
                return
            ids = torch.tensor([[token]])

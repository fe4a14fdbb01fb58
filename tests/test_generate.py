"""Running what a run made: the ONNX Runtime GenAI package, `quantpipe generate` and `chat`, and their runtimes."""

import json
import subprocess
import sys

import numpy as np
import pytest

from pipeline import genai, host
from pipeline import generate as gen
from pipeline.backends.trtllm import trtllm_version
from pipeline.errors import BadInput, HostLacks
from pipeline.onnx_export import io_names
from pipeline.publish import publish
from pipeline.recipe import load_recipe
from pipeline.store import ArtifactStore
from tests.conftest import TINY

TINY_SET = [arg for setting in TINY for arg in ("--set", setting)]
PROMPT = "The capital of France is"


def quantpipe(*args, store: ArtifactStore, stdin: str | None = None):
    return subprocess.run([sys.executable, "-m", "pipeline", *args, "--cache-dir", str(store.root)], input=stdin,
                          capture_output=True, text=True, timeout=300)


def test_genai_config_names_the_exported_graphs_inputs_and_outputs():
    from transformers import LlamaConfig

    model = LlamaConfig(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                        eos_token_id=[2, 7], max_position_embeddings=512)
    decoder = genai.config(model, None, "model.onnx")["model"]["decoder"]
    inputs, outputs = io_names(3)
    names = decoder["inputs"], decoder["outputs"]
    assert [names[0]["input_ids"], names[0]["attention_mask"]] == inputs[:2]
    assert [names[0][f"past_{kind}_names"] % layer for layer in range(3) for kind in ("key", "value")] == inputs[2:]
    assert [names[1][f"present_{kind}_names"] % layer for layer in range(3) for kind in ("key", "value")] == outputs[1:]
    assert (decoder["head_size"], decoder["num_key_value_heads"]) == (16, 2)


def test_rtx_targets_name_the_tensorrt_rtx_provider():
    assert genai.providers_for(("sm_89",)) == genai.providers_for(("sm_89", "sm_120")) == [{"NvTensorRtRtx": {}}]
    assert genai.providers_for(("sm_90",)) == [], "Hopper has no TensorRT-RTX: the CPU provider"


def test_what_cannot_be_generated_from_says_why(tmp_path):
    store = ArtifactStore(tmp_path / "cache")
    with pytest.raises(BadInput, match="not a published build"):
        gen.resolve(str(tmp_path), [], store)
    with pytest.raises(BadInput, match="run `quantpipe run fp8`"):
        gen.resolve("fp8", TINY, store)
    (tmp_path / "build.json").write_text(json.dumps({"keys": {}}))
    with pytest.raises(HostLacks, match="onnxruntime-genai: no ONNX Runtime GenAI package"):
        gen.pick(gen.resolve(str(tmp_path), [], store))


def _published(run_preset, store, tmp_path, preset: str, *overrides: str, until: str = "export"):
    """Publish a run that stopped before verify, as a complete run would be published."""
    artifacts = {o.stage: o.artifact for o in run_preset(preset, *overrides, until=until).outcomes}
    return publish(tmp_path / "engines", load_recipe(preset, [*TINY, *overrides]), artifacts, store), artifacts


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["fp8", "int8_sq", "int4_awq"])
def test_generate_answers_from_the_published_onnx_package(run_preset, real_store, tmp_path, preset):
    folder, artifacts = _published(run_preset, real_store, tmp_path, preset)
    config = json.loads((folder / "onnx" / genai.CONFIG_FILE).read_text())
    assert config["model"]["decoder"]["session_options"]["provider_options"] == [{"NvTensorRtRtx": {}}]

    result = quantpipe("generate", str(folder), "--prompt", PROMPT, "--max-new-tokens", "8", "--json",
                       store=real_store)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["runtime"] == "onnxruntime-genai" and answer["text"].strip() and answer["tokens_per_second"] > 0

    # ONNX Runtime GenAI's own loop (KV cache, mask, positions) picks the tokens our step-by-step runner picks.
    from transformers import AutoConfig

    from pipeline.onnx_export import OrtDecoder
    from pipeline.stages.export import ONNX_FILE

    deployment = gen.resolve(str(folder), [], real_store)
    conversation = gen.Conversation(deployment, gen.pick(deployment)[1])
    ids = conversation.prompt_ids(PROMPT)
    package = list(conversation.generate(ids, 8, set()))
    config = AutoConfig.from_pretrained(artifacts["load"] / "model")
    _, stepped = OrtDecoder(artifacts["export"] / "onnx" / ONNX_FILE).prefill_then_decode(config, np.array(ids), 8)
    assert package == stepped[:len(package)] and (len(package) == 8 or package[-1] in conversation.stop)


@pytest.mark.slow
def test_generate_a_cached_recipe_beside_the_unquantized_model(run_preset, real_store):
    run_preset("fp8")
    result = quantpipe("generate", "fp8", *TINY_SET, "--prompt", PROMPT, "--max-new-tokens", "6", "--compare",
                       "--json", store=real_store)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert "Paris" in answer["text"] and "Paris" in answer["compare"]["text"]
    assert answer["compare"]["runtime"] == "pytorch" and answer["tokens"] == answer["compare"]["tokens"] == 6


@pytest.mark.slow
def test_chat_uses_the_chat_template(run_preset, real_store):
    run_preset("fp8")
    result = quantpipe("chat", "fp8", *TINY_SET, "--max-new-tokens", "12", "--json", store=real_store,
                       stdin="What is the capital of France?\n")
    assert result.returncode == 0, result.stderr
    turns = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(turns) == 1 and "Paris" in turns[0]["text"]


@pytest.mark.slow
def test_nvfp4_onnx_says_onnx_runtime_cannot_run_it(run_preset, real_store):
    run_preset("nvfp4")
    result = quantpipe("generate", "nvfp4", *TINY_SET, "--prompt", PROMPT, store=real_store)
    assert result.returncode == 4, result.stderr
    assert "TensorRT's FP4 ops" in result.stderr and "--runtime pytorch" in result.stderr
    assert result.stderr.strip().count("\n") == 0


def _rtx_gpu_for(sm: int) -> bool:
    return any(g.sm == sm for g in host.gpus()) and host.has_module("tensorrt_rtx")


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.skipif(not _rtx_gpu_for(89), reason=f"needs an Ada RTX GPU (sm_89) and tensorrt-rtx; found GPUs "
                                                 f"{[f'{g.name} sm_{g.sm}' for g in host.gpus()]}")
def test_tensorrt_rtx_engine_answers_like_the_onnx_package(run_preset, real_store, tmp_path):
    folder, _ = _published(run_preset, real_store, tmp_path, "fp8", until="build")
    deployment = gen.resolve(str(folder), [], real_store)
    engine = gen.Conversation(deployment, gen.pick(deployment, "tensorrt-rtx")[1])
    package = gen.Conversation(deployment, gen.pick(deployment, "onnxruntime-genai")[1])
    ids = engine.prompt_ids(PROMPT)
    assert list(engine.generate(ids, 6, set()))[:3] == list(package.generate(ids, 6, set()))[:3]


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.skipif(not host.gpus() or trtllm_version() is None,
                    reason=f"needs an NVIDIA GPU and tensorrt_llm; found GPUs {[g.name for g in host.gpus()]}")
def test_tensorrt_llm_api_answers_from_the_hf_checkpoint(run_preset, real_store, tmp_path):
    folder, _ = _published(run_preset, real_store, tmp_path, "fp8", f"target=sm_{host.gpus()[0].sm}")
    deployment = gen.resolve(str(folder), [], real_store)
    conversation = gen.Conversation(deployment, gen.pick(deployment, "trtllm")[1])
    assert "Paris" in conversation.tokenizer.decode(list(conversation.generate(conversation.prompt_ids(PROMPT), 6,
                                                                               set())))

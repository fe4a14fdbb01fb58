"""Quantization-aware fine-tuning (the finetune stage) and model-state replay. Real stages on a tiny random-init
Llama with the bundled tokenizer (seconds each once the session's load artifact exists); bad input without a model."""

import json
import os
import shutil
import signal
import time
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from pipeline import runner
from pipeline.errors import BadInput
from pipeline.recipe import load_recipe
from pipeline.state import FINETUNED_FILE, replay
from pipeline.store import ArtifactStore
from tests.faults import fingerprint, quantpipe
from tests.test_bad_input import assert_one_line_error, set_args
from tests.test_bad_input import quantpipe as quantpipe_cli

TINY_LLAMA = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 512, "tie_word_embeddings": False}
SMALL = ["calibration.samples=2", "calibration.seq_len=32", "calibration.batch_size=2", "export.formats=[hf]",
         "build.backend=none", "finetune.seq_len=32", "finetune.batch_size=2", "finetune.lr=1e-3",
         "finetune.checkpoint_every=2", "verify.tokens=128", "verify.seq_len=64", "verify.max_new_tokens=4",
         "verify.prompts=['The capital of France is']"]


@pytest.fixture(scope="module")
def tiny_llama(run_preset, tmp_path_factory):
    """A tiny random-init Llama saved with the bundled SmolLM2 tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer_dir = run_preset("default", until="load").outcomes[0].artifact.path / "model"
    config = AutoConfig.for_model("llama", vocab_size=len(AutoTokenizer.from_pretrained(tokenizer_dir)), **TINY_LLAMA)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llama")
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tokenizer_dir / name, folder / name)
    return folder


def recipe(model, preset: str, *overrides: str):
    return load_recipe(preset, [*SMALL, f"model.source={model}", f"name=ft-{preset}", *overrides])


def artifacts(result) -> dict:
    return {o.stage: o.artifact for o in result.outcomes}


@pytest.mark.slow
def test_qat_lowers_the_training_loss_and_changes_the_exported_weights(tiny_llama, real_store):
    plain = artifacts(runner.run(recipe(tiny_llama, "fp8"), real_store, until="quantize"))
    tuned = artifacts(runner.run(recipe(tiny_llama, "fp8", "finetune.method=qat", "finetune.steps=8"), real_store,
                                 until="quantize"))
    assert "finetune" not in plain and tuned["calibrate"].key == plain["calibrate"].key
    losses = json.loads((tuned["finetune"] / "losses.json").read_text())["loss_per_step"]
    assert len(losses) == 8 and sum(losses[-3:]) < sum(losses[:3]), losses
    exported = [load_file(a / "checkpoint" / "model.safetensors") for a in (plain["quantize"], tuned["quantize"])]
    changed = [n for n, t in exported[0].items() if t.dtype.is_floating_point and not torch.equal(t, exported[1][n])]
    assert any(n.endswith("q_proj.weight") for n in changed), changed


@pytest.mark.slow
def test_nvfp4_qad_trains_through_the_cpu_backend_and_verify_replays_it(tiny_llama, real_store):
    result = runner.run(recipe(tiny_llama, "nvfp4", "finetune.method=qad", "finetune.steps=4", "finetune.lr=1e-4"),
                        real_store, until="verify")
    found = artifacts(result)
    assert found["finetune"].metadata["method"] == "qad"
    assert found["verify"].manifest["inputs"]["finetune"] == found["finetune"].key
    # verify compared the export with the fine-tuned model: its dequantized weights match that model closely
    assert found["verify"].metadata["parity"]["hf"] > 0.99


def test_the_fp4_backend_passes_gradients_straight_through():
    from pipeline import fp4

    inputs = torch.randn(4, 32, requires_grad=True)
    output = fp4.fake_quant(inputs, SimpleNamespace(block_sizes={-1: 16}, amax=None))
    output.sum().backward()
    assert torch.equal(output.detach(), fp4.nvfp4_qdq(inputs.detach(), 16, inputs.detach().abs().amax()))
    assert torch.equal(inputs.grad, torch.ones_like(inputs))


@pytest.mark.slow
def test_replay_applies_calibration_then_finetuning_whatever_order_the_inputs_come_in(tiny_llama, real_store):
    """AWQ's calibration rescales weights; the fine-tuned weights were trained on the rescaled model, so they must
    be put back after the calibration (the other order would rescale them a second time)."""
    from pipeline.modeling import load_model
    from pipeline.quant import restore_calibration
    from pipeline.state import restore_finetune

    found = artifacts(runner.run(recipe(tiny_llama, "int4_awq", "finetune.method=qat", "finetune.steps=2"),
                                 real_store, until="finetune"))
    assert found["calibrate"].metadata["rescaled_weights"] > 0
    trained = load_file(found["finetune"] / FINETUNED_FILE)
    model, _ = load_model(found["load"] / "model")
    replay(model, {"finetune": found["finetune"], "calibrate": found["calibrate"]})
    state = model.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in trained.items())
    wrong, _ = load_model(found["load"] / "model")
    restore_finetune(wrong, found["finetune"])
    restore_calibration(wrong, found["calibrate"])
    assert not all(torch.equal(wrong.state_dict()[name], tensor) for name, tensor in trained.items())


@pytest.mark.slow
def test_a_killed_finetune_resumes_from_its_checkpoint_to_identical_artifacts(tiny_llama, real_store, tmp_path):
    overrides = [*SMALL, f"model.source={tiny_llama}", "name=ft-kill", "finetune.method=qat", "finetune.steps=30"]
    args = ["fp8", *set_args(*overrides), "--until", "finetune"]
    expected = artifacts(runner.run(load_recipe("fp8", overrides), real_store, until="finetune"))["finetune"]
    cache = tmp_path / "cache"
    proc = quantpipe(args, cache)
    deadline = time.time() + 600
    scratch = ArtifactStore(cache).scratch_for("finetune", expected.key)
    while not (scratch / "checkpoint.pt").exists() and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (cache / "finetune" / expected.key).exists(), "the kill must land before the stage finished"
    rerun = quantpipe(args, cache)
    assert rerun.wait(timeout=600) == 0, rerun.stderr.read()
    resumed = ArtifactStore(cache).get("finetune", expected.key)
    assert resumed.metadata["resumed_from_step"] > 0
    assert fingerprint(ArtifactStore(cache))[f"finetune/{expected.key}"] == fingerprint(real_store)[
        f"finetune/{expected.key}"]
    assert not scratch.exists(), "the scratch checkpoints are removed once it is done"


@pytest.mark.parametrize("steps", [0, -3])
def test_steps_must_be_positive(steps):
    with pytest.raises(BadInput, match="finetune.steps"):
        load_recipe("fp8", ["finetune.method=qat", f"finetune.steps={steps}"])


def test_training_on_the_evaluation_text_is_refused_before_any_work(tmp_path):
    result = quantpipe_cli("run", "fp8", *set_args("finetune.method=qad", "finetune.dataset=eval"), cache=tmp_path)
    assert_one_line_error(result, 2, "evaluating on training text is not a measurement")
    assert not (tmp_path / "load").exists()


def test_finetune_runs_only_when_the_recipe_asks_for_it(tmp_path):
    store = ArtifactStore(tmp_path)
    plain = {s.stage.name: s.key for s in runner.plan(load_recipe("fp8"), store)}
    tuned = {s.stage.name: s.key for s in runner.plan(load_recipe("fp8", ["finetune.method=qat"]), store)}
    assert "finetune" not in plain and "finetune" in tuned
    assert tuned["calibrate"] == plain["calibrate"] and tuned["quantize"] != plain["quantize"]


def test_spellings_of_the_same_training_share_a_key(tmp_path):
    store = ArtifactStore(tmp_path)

    def key(*overrides):
        steps = runner.plan(load_recipe("fp8", ["finetune.method=qat", *overrides]), store)
        return next(s.key for s in steps if s.stage.name == "finetune")

    assert key() == key("finetune.dataset=calib") == key("finetune.checkpoint_every=3")
    assert key() != key("finetune.steps=7")

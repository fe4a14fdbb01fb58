"""Loader contracts (pipeline/contracts.py): every preset's HF checkpoint passes as exported, and each rule, broken
once in a copy of a real export of a tiny random-init model, is named with the tensor and the engines."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from pipeline import contracts, runner
from pipeline.files import write_json_atomic
from pipeline.recipe import presets
from pipeline.store import MANIFEST, ArtifactStore
from tests.test_architectures import _recipe, tiny_model, tokenizer_dir  # noqa: F401 (fixtures)

FAST = ("export.formats=[hf]", "build.backend=none")


@pytest.fixture(scope="session")
def tiny_export(tiny_model, real_store):  # noqa: F811
    """preset -> the tiny Llama's HF checkpoint exported with that preset."""
    def export(preset: str):
        result = runner.run(_recipe(tiny_model("llama"), preset, *FAST), real_store, until="export")
        return result.outcomes[-1].artifact.path / "hf"

    return export


@pytest.mark.parametrize("preset", presets())
def test_every_preset_exports_what_its_engines_load(tiny_export, preset):
    assert contracts.check(tiny_export(preset)) == []


def _tensors(folder, change):
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _json(folder, name, change):
    data = json.loads((folder / name).read_text())
    change(data)
    (folder / name).write_text(json.dumps(data))


L0 = "model.layers.0"
ALL = "TensorRT-LLM, vLLM, SGLang would refuse it"
BREAKS = {
    "missing input_scale": ("fp8", lambda f: _tensors(f, lambda t: t.pop(f"{L0}.self_attn.o_proj.input_scale")),
                            f"{L0}.self_attn.o_proj.input_scale: missing for FP8; {ALL}"),
    "missing weight_scale_2": ("nvfp4", lambda f: _tensors(f, lambda t: t.pop(f"{L0}.mlp.down_proj.weight_scale_2")),
                               f"{L0}.mlp.down_proj.weight_scale_2: missing for NVFP4; {ALL}"),
    "missing AWQ pre_quant_scale": ("int4_awq", lambda f: _tensors(
        f, lambda t: t.pop(f"{L0}.self_attn.o_proj.pre_quant_scale")),
        f"{L0}.self_attn.o_proj.pre_quant_scale: missing for W4A16_AWQ; TensorRT-LLM would refuse it"),
    "missing KV cache scale": ("nvfp4", lambda f: _tensors(f, lambda t: t.pop(f"{L0}.self_attn.v_proj.v_scale")),
                               f"{L0}.self_attn.v_proj.v_scale: missing for kv_cache_quant_algo FP8; {ALL}"),
    "fused input_scale": ("fp8", lambda f: _tensors(f, lambda t: t[f"{L0}.self_attn.k_proj.input_scale"].mul_(2)),
                          f"{L0}.self_attn.k_proj.input_scale: differs from {L0}.self_attn.q_proj.input_scale"),
    "fused weight_scale_2": ("nvfp4", lambda f: _tensors(f, lambda t: t[f"{L0}.mlp.up_proj.weight_scale_2"].mul_(2)),
                             f"{L0}.mlp.up_proj.weight_scale_2: differs from {L0}.mlp.gate_proj.weight_scale_2"),
    "fused pre_quant_scale": ("int8_sq", lambda f: _tensors(
        f, lambda t: t[f"{L0}.self_attn.v_proj.pre_quant_scale"].mul_(2)),
        f"{L0}.self_attn.v_proj.pre_quant_scale: differs from {L0}.self_attn.q_proj.pre_quant_scale"),
    "zero scale": ("int4_awq", lambda f: _tensors(f, lambda t: t[f"{L0}.mlp.down_proj.weight_scale"].zero_()),
                   f"{L0}.mlp.down_proj.weight_scale: zero, negative, NaN or infinite scale; TensorRT-LLM would"),
    "NaN scale": ("w4a8_awq", lambda f: _tensors(f, lambda t: t[f"{L0}.self_attn.o_proj.input_scale"].fill_(
        float("nan"))), f"{L0}.self_attn.o_proj.input_scale: zero, negative, NaN or infinite scale"),
    "config.json disagrees": ("fp8", lambda f: _json(f, "config.json", lambda c: c["quantization_config"].update(
        quant_algo="NVFP4")), "config.json: quantization_config.quant_algo 'NVFP4' differs"),
    "excluded but quantized": ("fp8", lambda f: _json(f, "hf_quant_config.json", lambda c: c["quantization"][
        "exclude_modules"].append(f"{L0}.mlp.*")),
        f"{L0}.mlp.down_proj.weight_scale: the module is in exclude_modules but quantized"),
    "unquantized but not excluded": ("fp8", lambda f: _json(f, "hf_quant_config.json", lambda c: c["quantization"][
        "exclude_modules"].remove("lm_head")), "lm_head.weight: unquantized (F16) but not in exclude_modules"),
}


@pytest.mark.parametrize("rule", list(BREAKS))
def test_each_broken_rule_names_the_tensor_and_the_engines(tiny_export, tmp_path, rule):
    preset, breaks, expected = BREAKS[rule]
    folder = tmp_path / "hf"
    shutil.copytree(tiny_export(preset), folder)
    breaks(folder)
    problems = contracts.check(folder)
    assert any(expected in p for p in problems), problems


def test_verify_fails_naming_the_tensor_and_engines_where_parity_cannot_see_it(tiny_model, tmp_path):  # noqa: F811
    """A fused sibling's input_scale changed: the dequantized weights (and so every parity check) are untouched,
    but vLLM, SGLang and TensorRT-LLM would refuse to fuse q/k/v. Verify fails (exit 5) naming both."""
    store = ArtifactStore(tmp_path / "store")
    recipe = _recipe(tiny_model("llama"), "fp8", *FAST)
    export = runner.run(recipe, store, until="export").outcomes[-1].artifact
    checkpoint = export / "hf" / "model.safetensors"
    tensors = load_file(checkpoint)
    tensors[f"{L0}.self_attn.k_proj.input_scale"] *= 2
    checkpoint.unlink()  # a hard link into the quantize artifact
    save_file(tensors, checkpoint, metadata={"format": "pt"})
    manifest = export.manifest  # an exporter bug, not damage: the manifest agrees with the bytes
    manifest["files"] = {k: v for k, v in ArtifactStore._inventory(export.path).items() if k != MANIFEST}
    write_json_atomic(export / MANIFEST, manifest)

    result = runner.run(recipe, store)
    assert result.failure, "a failed verify is what the CLI exits 5 for"
    assert (f"hf: loader contract: {L0}.self_attn.k_proj.input_scale: differs from {L0}.self_attn.q_proj.input_scale"
            in result.failure and ALL in result.failure), result.failure
    verify = result.outcomes[-1].artifact.metadata
    assert verify["parity"]["hf"] > 0.99 and verify["exports"]["hf"]["contract"]

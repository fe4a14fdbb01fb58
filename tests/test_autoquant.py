"""Mixed precision (quantization.format: auto): ModelOpt AutoQuantize's sensitivity scores cached as their own
artifact, a per-layer map within the budget, exported per layer and dequantized; bad input refused before work."""

import shutil

import pytest
from safetensors.torch import load_file, save_file

from pipeline import autoquant, contracts, runner
from pipeline.errors import BadInput, UnsupportedOnTarget
from pipeline.recipe import load_recipe
from pipeline.store import ArtifactStore
from pipeline.verify import dequant
from tests.test_architectures import _recipe, tiny_model, tokenizer_dir  # noqa: F401 (fixtures)

AUTO = ("quantization.format=auto", "quantization.auto.candidates=[nvfp4,fp8]", "target.gpu=blackwell",
        "export.formats=[hf,trtllm]", "build.backend=none")


def _run(tiny_model, store, bits: float, until="export"):  # noqa: F811
    recipe = _recipe(tiny_model("llama"), "default", *AUTO, f"quantization.auto.effective_bits={bits}")
    return {o.stage: o for o in runner.run(recipe, store, until=until).outcomes}


@pytest.mark.slow
def test_auto_picks_a_per_layer_map_within_budget_and_exports_it(tiny_model, tmp_path):  # noqa: F811
    store = ArtifactStore(tmp_path / "store")
    first = _run(tiny_model, store, 6.0)
    formats = first["calibrate"].artifact.metadata["layer_formats"]
    assert set(formats.values()) <= {"nvfp4", "fp8", "none"} and len(set(formats.values())) > 1
    shapes = {name: tuple(t.shape) for name, t in load_file(tiny_model("llama") / "model.safetensors").items()}
    sizes = {n: shapes[f"{n}.weight"][0] * shapes[f"{n}.weight"][1] for n in formats}
    assert autoquant.effective_bits(formats, sizes) <= 6.0
    original = load_file(tiny_model("llama") / "model.safetensors")
    for layout in ("hf", "trtllm"):
        folder = first["export"].artifact.path / layout
        info = dequant.read_config(folder)
        assert info["quant_algo"] == "MIXED_PRECISION"
        assert set(info["layer_algos"].values()) == {"NVFP4", "FP8"}
        weights, problems = dequant.effective_weights(folder, {n: shapes[f"{n}.weight"] for n in formats})
        assert problems == []
        for name, fmt in formats.items():
            error = (weights[f"{name}.weight"] - original[f"{name}.weight"]).norm() / original[f"{name}.weight"].norm()
            assert (error == 0) == (fmt == "none") and error < 0.2, (layout, name, fmt, error)
    assert contracts.check(first["export"].artifact.path / "hf") == []
    broken = shutil.copytree(first["export"].artifact.path / "hf", tmp_path / "broken")
    tensors = load_file(broken / "model.safetensors")
    fp8, nvfp4 = (next(n for n, f in formats.items() if f == fmt) for fmt in ("fp8", "nvfp4"))
    del tensors[f"{fp8}.input_scale"], tensors[f"{nvfp4}.weight_scale_2"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    assert {f"{fp8}.input_scale: missing for FP8", f"{nvfp4}.weight_scale_2: missing for NVFP4"} <= {
        p.split(";")[0] for p in contracts.check(broken)}
    hf_layers = dequant.read_config(first["export"].artifact.path / "hf")["layer_algos"]
    assert hf_layers == {n: {"nvfp4": "NVFP4", "fp8": "FP8"}[f] for n, f in formats.items() if f != "none"}

    # A second budget: the sensitivity artifact is a hit (no new backward pass), calibrate re-solves the map.
    second = _run(tiny_model, store, 4.5, until="calibrate")
    assert second["sensitivity"].status == "hit" and second["calibrate"].status == "built"
    assert second["calibrate"].artifact.metadata["layer_formats"] != formats


@pytest.mark.parametrize(("overrides", "error", "message"), [
    (("quantization.auto.effective_bits=4.2",), BadInput, "effective_bits 4.2 is outside what the candidates reach"),
    (("quantization.auto.effective_bits=16.5",), BadInput, "use 4.5 (all nvfp4) to 16"),
    (("quantization.auto.candidates=[int4_awq]",), BadInput, "'int4_awq' is not allowed"),
    (("quantization.auto.candidates=[]",), BadInput, "quantization.auto.candidates"),
    (("quantization.kv_cache=fp8",), BadInput, "kv_cache 'fp8' does not combine with format 'auto'"),
    (("target.gpu=ada",), UnsupportedOnTarget, "'nvfp4' does not run on ada"),
    (("target.gpu=blackwell-rtx", "build.backend=tensorrt-rtx"), UnsupportedOnTarget,
     "build.backend 'tensorrt-rtx' cannot build quantization.format 'auto'"),
    (("export.formats=[hf,onnx]",), UnsupportedOnTarget, "quantization.format 'auto' cannot be exported as onnx"),
])
def test_bad_input_is_refused_before_any_work(overrides, error, message, tmp_path):
    store = ArtifactStore(tmp_path / "store")
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        runner.plan(load_recipe("default", [*AUTO, *overrides]), store)
    assert not (store.root / "load").exists()


def test_auto_section_belongs_to_format_auto():
    with pytest.raises(BadInput, match="quantization.auto applies only to format auto"):
        load_recipe("fp8", ["quantization.auto.effective_bits=5"])
    assert load_recipe("default", list(AUTO)).quantization.auto.effective_bits == 6.0


def test_report_plots_and_lists_the_per_layer_formats():
    from pipeline.verify import report

    result = {"metrics": {"ppl_ratio": 1.1}, "thresholds": {"ppl_ratio": 1.6}, "eval_windows": {"count": 1, "length": 8},
              "sizes": {"hf": 10}, "fp16_bytes": 20, "layer_tolerance": 0.25,
              "layer_formats": {"model.layers.0.self_attn.q_proj": "fp8", "model.layers.0.mlp.down_proj": "nvfp4",
                                "model.layers.1.mlp.down_proj": "none"}}
    fig = report.figure(result, {})
    formats = fig.axes[2]
    assert formats.get_title() == "per-layer format chosen by AutoQuantize"
    assert [t.get_text() for t in formats.get_yticklabels()] == ["fp8", "nvfp4", "none"]

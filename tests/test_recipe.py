"""Recipes: presets, overrides, and one-line errors that name the field and the fix."""

import pytest

from pipeline.errors import BadInput
from pipeline.recipe import load_recipe, presets


@pytest.mark.parametrize("name", ["default", "fp8", "int4_awq", "int8_sq", "w4a8_awq", "nvfp4"])
def test_every_preset_loads(name):
    recipe = load_recipe(name)
    assert recipe.name == name


def test_presets_are_listed():
    assert {"fp8", "int4_awq", "int8_sq", "w4a8_awq", "nvfp4"} <= set(presets())


@pytest.mark.parametrize("spelling", ["int4-awq", "int4_awq", "INT4-AWQ"])
def test_formats_and_their_presets_have_one_printed_spelling(spelling):
    """Accept both spellings, print ModelOpt's: the preset, the format and everything named after them agree."""
    assert load_recipe(spelling).name == "int4_awq"
    assert load_recipe("fp8", [f"quantization.format={spelling}"]).quantization.format == "int4_awq"


def test_equal_work_has_equal_values_however_the_recipe_spells_it():
    """'auto' and absent defaults are filled in, so the default preset (algorithm auto) and the fp8 preset (max)
    describe identical calibration and share its cache key."""
    default, fp8 = load_recipe("default"), load_recipe("fp8")
    assert default.quantization == fp8.quantization
    assert (default.calibration, default.export, default.build) == (fp8.calibration, fp8.export, fp8.build)


def test_auto_backend_is_one_the_target_runs():
    assert load_recipe("fp8").build.backend == "tensorrt-rtx"
    assert load_recipe("fp8", ["target=hopper"]).build.backend == "none"  # checkpoints: TensorRT-LLM loads them
    assert load_recipe("nvfp4").build.backend == "tensorrt-rtx"
    assert load_recipe("w4a8_awq", ["target=ada"]).build.backend == "none"  # TensorRT-RTX has no W4A8 path
    assert load_recipe("fp8", ["target=hopper", "build.backend=tensorrt-rtx"]).build.backend == "tensorrt-rtx"


@pytest.mark.parametrize("name", ["default", "fp8", "int4_awq", "int8_sq", "w4a8_awq", "nvfp4"])
def test_export_formats_follow_the_runtimes(name):
    """The unified HF checkpoint always, the ONNX decoder when a TensorRT-RTX engine is built from it, and the
    legacy TensorRT-LLM checkpoint only when a recipe asks for it (directly or through build.backend: trtllm)."""
    recipe = load_recipe(name)
    assert recipe.export.formats == (("hf", "onnx") if recipe.build.backend == "tensorrt-rtx" else ("hf",))
    assert load_recipe(name, ["target=hopper"]).export.formats == ("hf",)
    assert load_recipe(name, ["target=hopper", "build.backend=trtllm"]).export.formats == ("hf", "trtllm")
    assert load_recipe(name, ["export.formats=[trtllm,hf]"]).export.formats == ("trtllm", "hf")


def test_the_legacy_trtllm_export_warns_and_is_refused_once_modelopt_dropped_it(monkeypatch, caplog):
    from pipeline import host
    from pipeline.errors import UnsupportedOnTarget
    from pipeline.stages.export import Export

    recipe = load_recipe("fp8", ["target=hopper", "export.formats=[trtllm,hf]"])
    monkeypatch.setattr(host, "version", lambda dist: "0.48.1")
    Export().preflight(recipe, {})
    assert "TensorRT-LLM 1.2.x and ModelOpt 0.48" in caplog.text
    monkeypatch.setattr(host, "version", lambda dist: "0.49.0")
    with pytest.raises(UnsupportedOnTarget, match="export format trtllm needs ModelOpt 0.48 or older"):
        Export().preflight(recipe, {})
    Export().preflight(load_recipe("fp8", ["target=hopper"]), {})  # the default export needs no legacy exporter


def test_overrides_are_typed_and_target_shorthand_expands():
    recipe = load_recipe("fp8", ["calibration.samples=64", "target=hopper", "export.formats=[hf]"])
    assert recipe.calibration.samples == 64
    assert recipe.target.gpu == "sm_90"
    assert recipe.export.formats == ("hf",)
    assert load_recipe("fp8", ["target.gpu=blackwell-rtx"]).target.gpu == "sm_120"


def test_auto_algorithm_and_block_size_follow_the_format():
    q = load_recipe("int4_awq", ["quantization.algorithm=auto", "quantization.block_size=null"]).quantization
    assert (q.algorithm, q.block_size) == ("awq_lite", 128)
    assert load_recipe("int8_sq", ["quantization.algorithm=auto"]).quantization.algorithm == "smoothquant"
    assert load_recipe("fp8").quantization.block_size is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["calibration.sampels=3"], "unknown key 'calibration.sampels' (did you mean 'samples'?)"),
        (["quantizaton.format=fp8"], "unknown key 'quantizaton' (did you mean 'quantization'?)"),
        (["quantization.format=fp9"], "quantization.format: 'fp9' is not allowed (did you mean 'fp8'?)"),
        (["calibration.samples=many"], "calibration.samples:"),
        (["calibration.samples=0"], "calibration.samples: Input should be greater than 0"),
        (["target=sm_70"], "target.gpu: unknown GPU 'sm_70'"),
        (["name=../../etc"], "name: String should match pattern"),
        (["calibration"], "must look like section.field=value"),
        (["build.also_for=[volta]"], "build.also_for: unknown GPU 'volta'"),
        (["build.backend=trtllm", "build.also_for=[ada]"], "only a tensorrt-rtx engine holds several"),
    ],
)
def test_bad_values_name_the_field(overrides, message):
    with pytest.raises(BadInput) as info:
        load_recipe("fp8", overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_yaml_file_errors(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("quantization:\n  format: [fp8\n")
    with pytest.raises(BadInput, match=r"broken.yaml: not valid YAML at line \d+"):
        load_recipe(str(broken))
    typo = tmp_path / "typo.yaml"
    typo.write_text("quantization:\n  fromat: fp8\n")
    with pytest.raises(BadInput, match="did you mean 'format'"):
        load_recipe(str(typo))
    with pytest.raises(BadInput, match="not found"):
        load_recipe(str(tmp_path / "missing.yaml"))
    with pytest.raises(BadInput, match="unknown preset 'fp9' \\(did you mean 'fp8'\\?\\)"):
        load_recipe("fp9")


def test_an_engine_for_several_gpus_is_checked_against_each():
    from pipeline.errors import UnsupportedOnTarget
    from pipeline.runner import check_target

    assert load_recipe("fp8", ["build.also_for=[blackwell-rtx, ada]"]).build.also_for == ("sm_120", "sm_89")
    with pytest.raises(UnsupportedOnTarget, match="'tensorrt-rtx' does not run on hopper"):
        check_target(load_recipe("fp8", ["build.also_for=[hopper]"]))


def test_verify_thresholds_are_keyed_by_metric_name_and_the_old_keys_still_read_with_a_warning(caplog):
    from pipeline.verify import metrics

    recipe = load_recipe("int4_awq", ["verify.thresholds={ppl_ratio: 1.4}"])
    thresholds = metrics.thresholds(recipe.quantization.format, recipe.verify.thresholds)
    assert thresholds == {"ppl_ratio": 1.4, "gen_agreement": 0.60, "parity_cosine": 0.95}, "the rest: int4_awq's"
    with caplog.at_level("WARNING", logger="pipeline.recipe"):
        old = load_recipe("int4_awq", ["verify.ppl_ratio_max=1.4"])
    assert old.verify.thresholds == recipe.verify.thresholds
    assert caplog.messages == ["verify.ppl_ratio_max is deprecated: write verify.thresholds: {ppl_ratio: 1.4}"]
    from pipeline.stages.verify import Verify

    with pytest.raises(BadInput, match=r"verify.thresholds: unknown metric 'ppl_ratio_max' \(did you mean "
                                       r"'ppl_ratio'\?\); metrics: ppl_ratio, gen_agreement, parity_cosine"):
        Verify().preflight(load_recipe("fp8", ["verify.thresholds={ppl_ratio_max: 1.1}"]), {})

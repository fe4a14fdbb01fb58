"""`quantpipe compare` and the lm-eval runner: bad input before any work, then (slow) a recipe and one library
baseline measured on the same held-out tokens of the real model, cached like stages, and the offline lm-eval task
run on the unquantized and the fake-quantized model with the same settings."""

import json
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner

from pipeline import cli, lmeval
from pipeline.compare.run import LIBRARY_BASELINES, RECIPE_BASELINES, check_libraries, compare
from pipeline.compare.spec import NAMES, CompareSpec
from pipeline.errors import BadInput, HostLacks
from pipeline.recipe import load_recipe
from tests.conftest import TINY

# A tiny comparison: the TINY recipe settings with 128 held-out tokens.
SMALL = [*TINY, "verify.tokens=128", "verify.seq_len=64"]


def invoke(*args, cache):
    return CliRunner().invoke(cli.main, [*args, "--cache-dir", str(cache)])


def test_unknown_baseline_exits_2_listing_the_valid_names(tmp_path):
    result = invoke("compare", "fp8", "--baselines", "nf4,awq-autoround", cache=tmp_path)
    assert result.exit_code == 2
    assert "unknown baseline awq-autoround; baselines are: gptq, nf4, llm-int8, ort-int8, ort-int4" in result.output
    assert not (tmp_path / "load").exists()


def test_every_baseline_name_has_one_registry_entry():
    assert sorted(NAMES) == sorted([*RECIPE_BASELINES, *LIBRARY_BASELINES])


def test_a_compare_section_is_checked_like_the_flag():
    assert CompareSpec(baselines=["llm_int8", "ort-int4"]).baselines == ["llm-int8", "ort-int4"]
    with pytest.raises(ValueError, match="unknown baseline q4k"):
        CompareSpec(baselines=["q4k"])


def test_a_missing_library_exits_4_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what an environment without it looks like to find_spec
    with pytest.raises(HostLacks, match=re.escape("baseline nf4 needs bitsandbytes: pip install 'quantpipe[compare]'")):
        check_libraries(["ort-int8", "nf4"])
    result = invoke("compare", "fp8", "--baselines", "ort-int8,nf4", cache=tmp_path)
    assert result.exit_code == 4 and "baseline nf4 needs bitsandbytes" in result.output
    assert not (tmp_path / "load").exists()


def test_an_unknown_lm_eval_task_is_bad_input():
    with pytest.raises(BadInput, match="unknown lm-eval task no_such_task"):
        lmeval.check_tasks([lmeval.LOCAL_TASK, "no_such_task"])


@pytest.mark.slow
def test_compare_measures_the_recipe_and_a_baseline_on_the_same_tokens(real_store, tmp_path):
    recipe = load_recipe("fp8", SMALL)
    rows = {r.name: r for r in compare([recipe], ["nf4"], real_store)}
    assert list(rows) == ["unquantized", "fp8", "nf4"]
    reference, fp8, nf4 = rows["unquantized"].metrics, rows["fp8"].metrics, rows["nf4"].metrics
    assert reference["eval_tokens"] == fp8["eval_tokens"] == nf4["eval_tokens"] == 128
    assert reference["tokens_per_second"] > 0 and nf4["tokens_per_second"] > 0
    assert fp8["tokens_per_second"] is None  # fake-quantized here; claims no CPU speed
    assert 0.9 < fp8["ppl_ratio"] < 1.1 and fp8["size_vs_fp16"] == pytest.approx(0.6, abs=0.05)
    # NF4 weights: 4 bits plus block scales for the linears; embeddings stay fp16 (tied with lm_head).
    assert nf4["size_vs_fp16"] < 0.5 and nf4["ppl_ratio"] > fp8["ppl_ratio"]
    assert 0.0 < nf4["agreement"] <= 1.0 and nf4["settings"]["bnb_4bit_quant_type"] == "nf4"
    again = {r.name: r for r in compare([recipe], ["nf4"], real_store)}
    assert {n: r.key for n, r in again.items()} == {n: r.key for n, r in rows.items()}
    assert again["nf4"].metrics == nf4  # cached: the same measurement, not a new one

    result = subprocess.run([sys.executable, "-m", "pipeline", "compare", "fp8", *(a for s in SMALL for a in ("--set", s)),
                             "--baselines", "nf4", "--json", "--out", str(tmp_path / "report"), "--cache-dir",
                             str(real_store.root)], capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    assert [r["name"] for r in json.loads(result.stdout)["rows"]] == ["unquantized", "fp8", "nf4"]
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| nf4 | bitsandbytes NF4 |" in report and "--baselines=nf4" in report
    assert (tmp_path / "report" / "plot.png").stat().st_size > 0


@pytest.mark.slow
def test_verify_runs_the_local_lm_eval_task_on_both_models_and_reports_the_delta(run_preset):
    result = run_preset("fp8", "verify.tasks=[quantpipe_eval]", "verify.task_limit=1", "verify.task_seed=3",
                        "verify.task_thresholds={quantpipe_eval: 0.10}", until="verify")
    report = json.loads((result.outcomes[-1].artifact / "report.json").read_text())
    assert report["lm_eval"]["settings"] | {"lm_eval": None} == {
        "batch_size": 1, "num_fewshot": 0, "seed": 3, "limit": 1, "dataset": "eval", "lm_eval": None}
    rows = {row["metric"]: row for row in report["lm_eval"]["rows"]}
    assert set(rows) == {"token_perplexity", "word_perplexity", "bits_per_byte"}
    token = rows["token_perplexity"]
    assert token["original"] > 1 and token["quantized"] > 1
    assert token["delta"] == pytest.approx(token["quantized"] - token["original"])
    assert token["threshold"] == 0.10 and token["passed"] == (token["worse_by"] <= 0.10)
    assert abs(token["worse_by"]) < 0.10 and token["passed"]  # FP8 with 4 x 64 calibration tokens: 5.8% here
    assert "## lm-evaluation-harness" in (result.outcomes[-1].artifact / "report.md").read_text()


def test_task_deltas_fail_a_task_worse_than_its_threshold():
    def scores(ppl):
        return {"scores": {"t": {"token_perplexity": ppl}}, "higher_is_better": {"t": {"token_perplexity": False}},
                "settings": {"seed": 0}}

    rows, failures = lmeval.task_deltas(scores(10.0), scores(10.4), {"t": 0.05})
    assert rows[0]["worse_by"] == pytest.approx(0.04) and rows[0]["passed"] and not failures
    _, strict = lmeval.task_deltas(scores(10.0), scores(10.4), {"t": 0.03})
    assert strict == ["lm-eval t token_perplexity 10.4 vs 10 unquantized: 4.0% worse > 3%"]

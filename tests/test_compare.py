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
def test_local_lm_eval_task_scores_both_models_with_the_same_settings(real_store, run_preset):
    from pipeline.modeling import load_model
    from pipeline.quant import restore_calibration

    outcomes = {o.stage: o.artifact for o in run_preset("fp8", until="calibrate").outcomes}
    original, tokenizer = load_model(outcomes["load"] / "model")
    quantized, _ = load_model(outcomes["load"] / "model")
    restore_calibration(quantized, outcomes["calibrate"].path)

    before = lmeval.run_tasks(original, tokenizer, [lmeval.LOCAL_TASK], limit=1, seed=3)
    after = lmeval.run_tasks(quantized, tokenizer, [lmeval.LOCAL_TASK], limit=1, seed=3)
    assert before["settings"] == after["settings"]
    assert before["settings"] | {"lm_eval": None} == {"batch_size": 1, "num_fewshot": 0, "seed": 3, "limit": 1,
                                                       "dataset": "eval", "lm_eval": None}
    scores = before["scores"][lmeval.LOCAL_TASK]
    assert set(scores) == {"token_perplexity", "word_perplexity", "bits_per_byte"}
    assert scores["word_perplexity"] > scores["token_perplexity"] > 1  # more tokens than words

    rows, failures = lmeval.task_deltas(before, after, {lmeval.LOCAL_TASK: 0.10})
    token = next(r for r in rows if r["metric"] == "token_perplexity")
    assert token["delta"] == pytest.approx(token["quantized"] - token["original"])
    assert abs(token["worse_by"]) < 0.10 and token["passed"] and not failures  # FP8 is within noise here
    _, strict = lmeval.task_deltas(before, after, {lmeval.LOCAL_TASK: token["worse_by"] - 0.01})
    assert any("token_perplexity" in f for f in strict)

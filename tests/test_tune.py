"""`quantpipe tune`: a 2-candidate search on a tiny random-init Llama picks the smaller passing candidate and
publishes it with the search in its card; a rerun builds nothing; an unreachable bar exits 5 naming the closest
candidate; bars out of range exit 2. The measures (frontier, bits) are checked on plain values."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pipeline import tune
from pipeline.errors import BadInput
from pipeline.recipe import load_recipe
from tests.test_architectures import CALIBRATION, tiny_model, tokenizer_dir  # noqa: F401 (fixtures)

# Ampere runs exactly two formats (int8_sq, int4_awq): the search has two candidates.
SMALL = ("target=ampere", "build.backend=none", "export.formats=[hf]", *CALIBRATION)


def quantpipe(*args, cache, engines):
    return subprocess.run([sys.executable, "-m", "pipeline", *args, "--cache-dir", str(cache), "--engines-dir",
                           str(engines)], capture_output=True, text=True, timeout=600, check=False)


@pytest.fixture(scope="module")
def tiny_tune(tiny_model, tmp_path_factory):  # noqa: F811
    """`tune` on the tiny Llama with the given options, in one store and engines folder for the module."""
    cache, engines = tmp_path_factory.mktemp("tune-cache"), tmp_path_factory.mktemp("tune-engines")
    sets = [f"--set={o}" for o in (*SMALL, f"model.source={tiny_model('llama')}")]

    def run(*options):
        return quantpipe("tune", "fp8", *sets, *options, cache=cache, engines=engines)

    return run


@pytest.mark.slow
def test_tune_publishes_the_smaller_passing_candidate_and_a_rerun_builds_nothing(tiny_tune):
    first = tiny_tune("--max-ppl-ratio", "1.05", "--json")
    assert first.returncode == 0, first.stderr
    search = json.loads(first.stdout)
    assert set(search) >= {"recipe", "target", "bar", "objective", "chosen", "chosen_recipe", "frontier",
                           "candidates", "report", "published"}
    candidates = {c["candidate"]: c for c in search["candidates"]}
    assert set(candidates) == {"int8_sq", "int4_awq"} and search["target"] == "sm_80"
    assert all(c["passed"] and c["ran"] and c["built_stages"] > 0 for c in candidates.values())
    assert candidates["int4_awq"]["bytes"] < candidates["int8_sq"]["bytes"]
    assert search["chosen"] == "int4_awq"
    published = search["published"]
    card = Path(published, "hf", "README.md").read_text()
    assert "## How it was chosen" in card and "| int4_awq | **chosen** |" in card
    report = Path(search["report"]).parent
    assert json.loads((report / tune.TUNE_JSON).read_text())["chosen"] == "int4_awq"
    assert (report / tune.PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again = tiny_tune("--max-ppl-ratio", "1.05", "--json")
    assert again.returncode == 0, again.stderr
    assert [c["built_stages"] for c in json.loads(again.stdout)["candidates"]] == [0, 0]


@pytest.mark.slow
def test_the_autoquantize_ladder_stops_at_the_first_passing_budget_below_fp8(tiny_tune):
    """On Blackwell at 99% agreement the tiny Llama's NVFP4 fails (75%) and FP8 passes: the ladder over fp8+nvfp4
    tries 5 bits (fails), then 6 (passes, smaller than FP8), and never 7. (4.5 bits would be all NVFP4, as AutoQuantize
    counts it: the ladder starts above the smallest candidate.)"""
    result = tiny_tune("--set=target=blackwell", "--max-ppl-ratio", "1.05", "--min-agreement", "0.99",
                       "--formats", "fp8,nvfp4", "--budgets", "4.5,5,6,7", "--exclude-steps", "none", "--json")
    assert result.returncode == 0, result.stderr
    search = json.loads(result.stdout)
    candidates = {c["candidate"]: c for c in search["candidates"]}
    assert list(candidates) == ["fp8", "nvfp4", "auto-5", "auto-6"]
    assert [candidates[c]["passed"] for c in candidates] == [True, False, False, True]
    assert search["chosen"] == "auto-6" and candidates["auto-6"]["bytes"] < candidates["fp8"]["bytes"]
    assert candidates["auto-6"]["quantization"]["auto"] == {"candidates": ["fp8", "nvfp4"], "effective_bits": 6.0}


@pytest.mark.slow
def test_an_unreachable_bar_exits_5_naming_the_closest_candidate(tiny_tune):
    result = tiny_tune("--max-ppl-ratio", "1.05", "--min-agreement", "1.0", "--formats", "int4_awq",
                       "--exclude-steps", "none")
    assert result.returncode == 5, result.stderr
    assert "no candidate meets ppl ratio <= 1.05 and agreement >= 100%; closest: int4_awq" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("quantpipe: error:")
    assert "FAIL" in result.stdout  # the table is printed before the error


@pytest.mark.parametrize("args", [("--max-ppl-ratio", "0.9"), ("--max-ppl-ratio", "1.05", "--min-agreement", "1.5"),
                                  ("--max-ppl-ratio", "1.05", "--exclude-steps", "-3"),
                                  ("--max-ppl-ratio", "1.05", "--formats", "nvfp4")])
def test_bars_and_options_out_of_range_exit_2_in_one_line(tmp_path, args):
    result = quantpipe("tune", "fp8", *args, cache=tmp_path / "cache", engines=tmp_path / "engines")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr


def test_candidates_are_the_formats_every_target_gpu_runs():
    assert [c.slug for c in tune.format_candidates(load_recipe("fp8", ["target=ampere"]))] == ["int8_sq", "int4_awq"]
    blackwell = [c.slug for c in tune.format_candidates(load_recipe("nvfp4", ["target=blackwell"]))]
    assert {"fp8", "nvfp4", "w4a8_awq"} <= set(blackwell)
    with pytest.raises(BadInput, match="nvfp4 not among the formats sm_89 runs"):
        tune.format_candidates(load_recipe("fp8"), ["nvfp4"])


def _result(slug: str, size: int, ratio: float, passed: bool = True) -> tune.Result:
    return tune.Result(tune.Candidate(slug, "format", {"format": slug, "exclude": []}), slug, ran=True,
                       passed=passed, ppl_ratio=ratio, agreement=0.9, bytes=size, fp16_bytes=100, bits=size / 10)


def test_the_frontier_keeps_only_candidates_no_other_beats_on_both_size_and_ratio():
    results = [_result("a", 50, 1.30, False), _result("b", 60, 1.40, False), _result("c", 70, 1.04),
               _result("d", 80, 1.02), _result("e", 90, 1.03)]
    assert [r.candidate.slug for r in tune.frontier(results)] == ["a", "c", "d"]


def test_exclusion_leaves_the_layers_with_the_largest_weight_error_unquantized():
    source = _result("int4_awq", 50, 1.3, False)
    source.layers = [{"layer": f"model.layers.{i}.mlp.down_proj", "relative_error": e}
                     for i, e in enumerate((0.1, 0.4, 0.2))]
    candidate = tune.exclusion_candidate(source, 2)
    assert candidate.quantization["exclude"] == ["model.layers.1.mlp.down_proj.*", "model.layers.2.mlp.down_proj.*"]
    assert candidate.slug == "int4_awq-x2"


def test_bits_count_weights_and_scales_outside_the_input_and_output_embeddings(tmp_path):
    save_file({"model.embed_tokens.weight": torch.zeros(1000, 64, dtype=torch.float16),
               "lm_head.weight": torch.zeros(1000, 64, dtype=torch.float16),
               "model.layers.0.mlp.up_proj.weight": torch.zeros(128, 64, dtype=torch.float8_e4m3fn),
               "model.layers.0.mlp.up_proj.weight_scale": torch.zeros((), dtype=torch.float32),
               "model.layers.0.mlp.down_proj.weight": torch.zeros(64, 64, dtype=torch.uint8),  # packed 4-bit
               "model.norm.weight": torch.zeros(64, dtype=torch.float16)}, tmp_path / "model.safetensors")
    params = 128 * 64 + 64 * 128 + 64
    stored_bits = 8 * (128 * 64 + 4 + 64 * 64 + 2 * 64)
    assert tune.checkpoint_bits(tmp_path) == pytest.approx(stored_bits / params)

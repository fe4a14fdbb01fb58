"""A metric is data: one `register` call (this file only) and verify computes it, applies its default threshold or
the recipe's (by name), and the summary and report show it. On a tiny random-init Llama, in seconds."""

import pytest

from pipeline import runner
from pipeline.stages import by_name
from pipeline.verify import metrics
from pipeline.verify.report import REPORT_MD
from tests.test_architectures import _recipe, tiny_model, tokenizer_dir  # noqa: F401 (fixtures)

TOY = metrics.Metric("toy_ppl", "toy: the quantized model's own perplexity", "max", lambda m: m["ppl_quantized"],
                     display=".2f", default=1e9)
FAST = ("export.formats=[hf]", "build.backend=none")


@pytest.fixture
def toy_metric():
    metrics.register(TOY)
    yield TOY
    metrics.METRICS.pop(TOY.name)


def _verify(recipe, store):
    result = runner.run(recipe, store)
    return result, result.outcomes[-1].artifact


def test_a_registered_metric_is_computed_checked_and_reported(toy_metric, tiny_model, real_store):  # noqa: F811
    recipe = _recipe(tiny_model("llama"), "fp8", *FAST)
    _, verify = _verify(recipe, real_store)
    report = verify.metadata
    assert report["metrics"]["toy_ppl"] == pytest.approx(report["ppl_quantized"])
    assert report["thresholds"]["toy_ppl"] == 1e9, "the metric's own default: fp8's defaults do not name it"
    assert not any("toy" in f for f in report["failures"])
    assert f"toy_ppl {report['ppl_quantized']:.2f}" in by_name("verify").summary(verify.facts)
    row = f"| toy: the quantized model's own perplexity (`toy_ppl`) | {report['ppl_quantized']:.2f} | <= 1000000000.0 |"
    assert row in (verify / REPORT_MD).read_text()

    strict = _recipe(tiny_model("llama"), "fp8", *FAST, "verify.thresholds={toy_ppl: 1.0}")
    result, failed = _verify(strict, real_store)
    assert f"toy: the quantized model's own perplexity {report['ppl_quantized']:.2f} > 1.0" in result.failure
    assert failed.metadata["metrics"] == report["metrics"], "the same measurements, another threshold"
    assert f"- toy: the quantized model's own perplexity {report['ppl_quantized']:.2f} > 1.0" in (
        failed / REPORT_MD).read_text()

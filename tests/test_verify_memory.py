"""verify's memory by design, on a tiny model through the real stages: the verify stage loads one model and never
has a second one alive (parity runs the calibrated model itself as a plain one holding each export's weights), and
it records each sub-step's seconds and resident memory in steps.json."""

import gc
import json

import pytest

from pipeline import runner
from pipeline.store import ArtifactStore
from tests.test_architectures import _recipe, tiny_model, tokenizer_dir  # noqa: F401 (fixtures)


def _live_models() -> int:
    from transformers import PreTrainedModel

    gc.collect()
    return sum(isinstance(o, PreTrainedModel) for o in gc.get_objects())


def test_verify_holds_one_model_at_a_time(tiny_model, tmp_path, monkeypatch):  # noqa: F811
    from pipeline import modeling
    from pipeline.verify import checkpoint

    store = ArtifactStore(tmp_path / "store")
    recipe = _recipe(tiny_model("llama"), "fp8", "export.formats=[hf,trtllm,onnx]", "build.backend=none")
    runner.run(recipe, store, until="export")
    assert _live_models() == 0
    loads, alive = [], []
    load_model = modeling.load_model
    monkeypatch.setattr(modeling, "load_model", lambda *a, **k: loads.append(a) or load_model(*a, **k))
    holding = checkpoint.holding

    def counted(*args, **kwargs):
        alive.append(_live_models())
        return holding(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "holding", counted)
    result = runner.run(recipe, store)
    verify = result.outcomes[-1]
    assert verify.stage == "verify" and verify.status == "built"
    assert len(loads) == 1, "verify loads the calibrated model once, and no skeleton"
    assert alive and set(alive) == {1}, "one model alive while each export's weights are held"
    facts = verify.artifact.metadata
    assert set(facts["parity"]) == {"hf", "trtllm"} and min(facts["parity"].values()) > 0.99
    onnx = facts["exports"]["onnx"]
    assert onnx["kv_cache_steps_match"] == 1.0 and onnx["tokens_per_second"] > 0 and onnx["cosine"] > 0.99
    steps = json.loads((verify.artifact.path / "steps.json").read_text())
    assert {"perplexity, quantized (and onnxruntime's prefills)", "hf: dequantized export vs calibrated"} <= {
        s["step"] for s in steps}
    assert all(s["rss_peak"] >= s["rss_before"] > 0 and s["seconds"] >= 0 for s in steps)

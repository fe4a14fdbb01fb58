"""verify's memory by design, on a tiny model through the real stages: the verify stage loads one model and never
has a second one alive (parity runs the calibrated model itself as a plain one holding each export's weights), and
it records each sub-step's seconds and resident memory in steps.json."""

import gc
import inspect
import json

from pipeline import runner
from pipeline.store import ArtifactStore
from tests.test_architectures import _recipe, tiny_model, tokenizer_dir  # noqa: F401 (fixtures)


def _live_model_bytes() -> int:
    """Bytes of the distinct parameter storages of every transformers model alive in this process."""
    from transformers import PreTrainedModel

    gc.collect()
    storages = {}
    for o in gc.get_objects():
        if isinstance(o, PreTrainedModel):
            for p in o.parameters():
                storages[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
    return sum(storages.values())


def test_verify_holds_one_model_at_a_time(tiny_model, tmp_path, monkeypatch):  # noqa: F811
    from pipeline import modeling
    from pipeline.verify import checkpoint
    from pipeline.verify.steps import Steps

    store = ArtifactStore(tmp_path / "store")
    recipe = _recipe(tiny_model("llama"), "fp8", "export.formats=[hf,trtllm,onnx]", "build.backend=none")
    loads, alive = [], []
    load_model = modeling.load_model

    def counted_load(*args, **kwargs):  # the loads the verify stage makes (the reference stage runs here too)
        if any(frame.filename.endswith("stages/verify.py") for frame in inspect.stack()):
            loads.append(args)
        return load_model(*args, **kwargs)

    monkeypatch.setattr(modeling, "load_model", counted_load)
    holding = checkpoint.holding

    def counted(*args, **kwargs):
        alive.append(_live_model_bytes())
        return holding(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "holding", counted)
    started, steps_init = [], Steps.__init__

    def starting(self, report):  # what earlier stages left alive in this process is not verify's
        started.append(_live_model_bytes())
        steps_init(self, report)

    monkeypatch.setattr(Steps, "__init__", starting)
    exported = runner.run(recipe, store, until="export")
    model_bytes = exported.outcomes[0].artifact.metadata["parameters"] * 4  # stored in fp32
    result = runner.run(recipe, store)
    verify = result.outcomes[-1]
    assert verify.stage == "verify" and verify.status == "built"
    assert len(loads) == 1, "verify loads the calibrated model once, and no skeleton"
    assert len(alive) == 2 and all(0 < b - started[0] <= 1.05 * model_bytes for b in alive), (
        "one model's weights alive while each export's weights are held", alive, started, model_bytes)
    facts = verify.artifact.metadata
    assert set(facts["parity"]) == {"hf", "trtllm"} and min(facts["parity"].values()) > 0.99
    onnx = facts["exports"]["onnx"]
    assert onnx["kv_cache_steps_match"] == 1.0 and onnx["tokens_per_second"] > 0 and onnx["cosine"] > 0.99
    steps = json.loads((verify.artifact.path / "steps.json").read_text())
    assert {"perplexity, quantized (and onnxruntime's prefills)", "hf: dequantized export vs calibrated"} <= {
        s["step"] for s in steps}
    assert all(s["rss_peak"] >= s["rss_before"] > 0 and s["seconds"] >= 0 for s in steps)

"""A model larger than its memory budget: quantize loads it through the placement plan (disk offload, read in place
from the model's shards), replays the calibration as each offloaded weight is read, and writes the unified
checkpoint with ModelOpt's streaming exporter, layer by layer, to the same tensors as a resident run."""

import json
import shutil

import pytest

from pipeline import runner
from pipeline.errors import BadInput
from pipeline.modeling import INDEX_FILE
from pipeline.store import ArtifactStore
from tests.test_scale import _recipe, sharded_bf16  # noqa: F401


class Events(runner.Reporter):
    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []

    def stage_progress(self, stage: str, event: dict) -> None:
        self.events.append((stage, event))


def _tensors(folder):
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@pytest.mark.parametrize("fmt", ["fp8", "int4_awq"])
def test_quantize_under_a_memory_cap_smaller_than_the_weights_writes_the_resident_tensors(
        sharded_bf16, tmp_path, fmt):  # noqa: F811
    import torch

    weights = json.loads((sharded_bf16 / INDEX_FILE).read_text())["metadata"]["total_size"]
    overrides = [f"quantization.format={fmt}", "quantization.algorithm=" + ("awq_lite" if "awq" in fmt else "max"),
                 "quantization.block_size_policy=fallback", "export.max_shard_size=50KB"]
    resident = runner.run(_recipe(sharded_bf16, *overrides), ArtifactStore(tmp_path / "resident"),
                          until="quantize").outcomes[-1].artifact
    events = Events()
    capped = runner.run(_recipe(sharded_bf16, *overrides, f"model.max_memory={{cpu: {weights // 3}}}"),
                        ArtifactStore(tmp_path / "capped"), until="quantize", reporter=events).outcomes[-1].artifact
    quantize = [event for stage, event in events.events if stage == "quantize"]
    assert quantize[0]["placement"]["layers"].get("disk"), "the cap sent layers to disk"
    assert [e["layer"] for e in quantize if "layer" in e] == [1, 2], "one event per exported layer"
    assert all("remaining_s" in e and "elapsed_s" in e for e in quantize if "layer" in e)
    a, b = resident.path / "checkpoint", capped.path / "checkpoint"
    assert (b / INDEX_FILE).is_file() and len(list(b.glob("model-*.safetensors"))) > 1, "sharded with an index"
    expected, written = _tensors(a), _tensors(b)
    assert sorted(written) == sorted(expected)
    assert [name for name in expected if not torch.equal(expected[name], written[name])] == []
    assert json.loads((b / "hf_quant_config.json").read_text()) == json.loads((a / "hf_quant_config.json").read_text())
    assert not list((tmp_path / "capped" / "quantize").glob(".offload-*")), "the offload scratch went"


def test_a_config_without_architectures_is_one_line_naming_the_fix(sharded_bf16, tmp_path):  # noqa: F811
    model = tmp_path / "no-architectures"
    shutil.copytree(sharded_bf16, model)
    config = json.loads((model / "config.json").read_text())
    config.pop("architectures", None)
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(BadInput, match=r'no "architectures".*add "architectures": \["LlamaForCausalLM"\]') as error:
        runner.run(_recipe(model), ArtifactStore(tmp_path / "store"), until="quantize")
    assert "\n" not in str(error.value)


def test_a_trtllm_export_of_a_model_that_spills_stops_with_exit_4_before_loading(sharded_bf16, tmp_path):  # noqa: F811
    from pipeline.errors import HostLacks

    weights = json.loads((sharded_bf16 / INDEX_FILE).read_text())["metadata"]["total_size"]
    recipe = _recipe(sharded_bf16, "export.formats=[trtllm]", f"model.max_memory={{cpu: {weights // 3}}}")
    with pytest.raises(HostLacks, match="export format trtllm needs the whole model in CPU memory"):
        runner.run(recipe, ArtifactStore(tmp_path / "store"), until="export")

"""Checkpoint layouts and native dtype: a tiny random Llama saved in bf16 as shards with an index runs load ->
calibrate -> quantize -> export in bf16 and comes out sharded at export.max_shard_size; damaged shard sets are
refused at load with one line naming the file (exit 2). No real model: a byte-level tokenizer trained in a second."""

import json
from pathlib import Path

import pytest

from pipeline import runner
from pipeline.errors import BadInput
from pipeline.modeling import INDEX_FILE
from pipeline.recipe import load_recipe
from pipeline.store import ArtifactStore
from pipeline.verify.dequant import effective_weights

CALIB = Path(__file__).resolve().parents[1] / "calib_data" / "calib.txt"
TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=False)
FAST = ["calibration.samples=2", "calibration.seq_len=32", "calibration.batch_size=2", "export.formats=[hf]",
        "build.backend=none"]


@pytest.fixture(scope="module")
def sharded_bf16(tmp_path_factory) -> Path:
    """Tiny Llama, bf16, in shards of at most 100 KB (model-0000x-of-0000N.safetensors + the index)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("sharded-bf16")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator([CALIB.read_text()[:200_000]], trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>").save_pretrained(folder)
    config = AutoConfig.for_model("llama", vocab_size=tokenizer.get_vocab_size(), **TINY_LLAMA)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="100KB")
    return folder


def _recipe(model: Path, *overrides: str):
    return load_recipe("fp8", [*FAST, f"model.source={model}", f"name=tiny-{model.name}", *overrides])


def test_a_sharded_bf16_model_runs_to_export_in_bf16_and_exports_sharded(sharded_bf16, tmp_path):
    shards = sorted(sharded_bf16.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and (sharded_bf16 / INDEX_FILE).is_file()
    result = runner.run(_recipe(sharded_bf16, "export.max_shard_size=50KB"), ArtifactStore(tmp_path / "store"),
                        until="export")
    assert result.failure is None, result.failure
    meta = {o.stage: o.artifact.metadata for o in result.outcomes}
    assert meta["load"]["dtype"] == "BF16"
    assert meta["calibrate"]["model_dtype"] == meta["quantize"]["model_dtype"] == "bfloat16"

    checkpoint = next(o.artifact.path for o in result.outcomes if o.stage == "export") / "hf"
    index = json.loads((checkpoint / INDEX_FILE).read_text())
    files = sorted(p.name for p in checkpoint.glob("*.safetensors"))
    assert len(files) > 2 and sorted(set(index["weight_map"].values())) == files
    assert max((checkpoint / f).stat().st_size for f in files) <= 50_000 + 70_000  # one tensor may exceed a shard
    shapes = _linear_shapes(sharded_bf16)
    weights, problems = effective_weights(checkpoint, shapes)  # verify's reader takes the shards
    assert not problems and all(f"{m}.weight" in weights for m in shapes)


def _linear_shapes(folder: Path) -> dict[str, tuple[int, int]]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    return {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _damaged(source: Path, tmp_path: Path, damage) -> Path:
    folder = tmp_path / "damaged"
    folder.mkdir()
    for file in source.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    damage(folder)
    return folder


def _drop_last_shard(folder: Path) -> str:
    shard = max(folder.glob("model-*.safetensors"))
    shard.unlink()
    return f"lists {shard.name}, which is missing"


def _index_names_a_ghost(folder: Path) -> str:
    index = json.loads((folder / INDEX_FILE).read_text())
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = next(iter(index["weight_map"].values()))
    (folder / INDEX_FILE).write_text(json.dumps(index))
    return "names 1 tensors no shard holds (e.g. model.layers.9.mlp.up_proj.weight)"


def _truncate_first_shard(folder: Path) -> str:
    shard = min(folder.glob("model-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-1000])
    return f"{shard.name} is damaged or truncated"


@pytest.mark.parametrize("damage", [_drop_last_shard, _index_names_a_ghost, _truncate_first_shard])
def test_a_damaged_shard_set_is_refused_at_load_naming_the_file(sharded_bf16, tmp_path, damage):
    expected = []
    folder = _damaged(sharded_bf16, tmp_path, lambda f: expected.append(damage(f)))
    store = ArtifactStore(tmp_path / "store")
    with pytest.raises(BadInput) as caught:
        runner.run(_recipe(folder), store, until="load")
    message = str(caught.value)
    assert caught.value.exit_code == 2 and expected[0] in message and "\n" not in message
    assert not list(store.artifacts())

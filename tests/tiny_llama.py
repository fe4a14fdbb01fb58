"""A tiny random-init Llama with a word-level tokenizer built on the spot: a real transformers model directory that
the pipeline loads in a second, with no download and no real model."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

VOCAB = 512


def make(folder: Path, layers: int = 4) -> Path:
    """Save the model and its tokenizer into `folder` (created); the same folder content for the same arguments."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from pipeline.data import load_documents

    common = Counter(" ".join(load_documents("calib")).split()).most_common(VOCAB - 1)
    vocab = {"<unk>": 0, **{word: i + 1 for i, (word, _) in enumerate(common)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    folder.mkdir(parents=True, exist_ok=True)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>").save_pretrained(folder)
    config = LlamaConfig(num_hidden_layers=layers, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


SETTINGS = ["calibration.samples=4", "calibration.seq_len=32", "calibration.batch_size=2"]


def recipe_args(folder: Path, *overrides: str) -> list[str]:
    """The preset's `--set` arguments for a quick calibration of the tiny model in `folder`."""
    return [arg for item in [f"model.source={folder}", *SETTINGS, *overrides] for arg in ("--set", item)]


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make(tmp_path_factory.mktemp("tiny-llama"), layers=6)

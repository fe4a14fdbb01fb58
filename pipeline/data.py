"""Calibration and evaluation text: shipped sets, local files, or Hugging Face datasets, cut into token windows."""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import BadInput
from pipeline.store import ArtifactStore

SHIPPED_DIR = Path(os.environ.get("QUANTPIPE_DATA") or Path(__file__).resolve().parents[1] / "calib_data")
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?$")


@dataclass(frozen=True)
class DatasetRef:
    kind: str  # "file" or "hub"
    location: str
    config: str | None = None


def resolve(ref: str) -> DatasetRef:
    """A shipped name ('calib', 'eval'), a local .txt/.jsonl/.parquet file, or a hub id ('org/name[:config]')."""
    shipped = SHIPPED_DIR / f"{ref}.txt"
    if shipped.is_file():
        return DatasetRef("file", str(shipped))
    path = Path(ref).expanduser()
    if path.suffix in LOCAL_SUFFIXES:
        if not path.is_file():
            raise BadInput(f"dataset file {ref} not found; fix the path or use a shipped set ({_shipped()})")
        return DatasetRef("file", str(path.absolute()))
    if HUB_ID.match(ref):
        name, _, config = ref.partition(":")
        return DatasetRef("hub", name, config or None)
    raise BadInput(f"dataset '{ref}' is not a shipped set ({_shipped()}), a .txt/.jsonl/.parquet file, or a hub id "
                   "such as abisee/cnn_dailymail:3.0.0")


def _shipped() -> str:
    return ", ".join(sorted(p.stem for p in SHIPPED_DIR.glob("*.txt"))) or "none found"


def fingerprint(ref: str, store: ArtifactStore) -> str:
    """Content hash for a file; id and config for a hub dataset (its revision is resolved by `datasets`)."""
    dataset = resolve(ref)
    if dataset.kind == "file":
        return store.digest(Path(dataset.location))
    return f"hub:{dataset.location}:{dataset.config or ''}"


def load_documents(ref: str) -> list[str]:
    """The dataset as a list of non-empty documents (paragraphs for plain text)."""
    dataset = resolve(ref)
    if dataset.kind == "hub":
        docs = _hub_documents(dataset)
    else:
        path = Path(dataset.location)
        if path.suffix == ".txt":
            docs = re.split(r"\n\s*\n", path.read_text(encoding="utf-8", errors="replace"))
        elif path.suffix == ".jsonl":
            docs = [_text_field(json.loads(line), ref) for line in path.read_text().splitlines() if line.strip()]
        else:
            import pyarrow.parquet as pq

            docs = [_text_field(row, ref) for row in pq.read_table(path).to_pylist()]
    docs = [d.strip() for d in docs if d and d.strip()]
    if not docs:
        raise BadInput(f"dataset {ref} holds no text; give it non-empty documents")
    return docs


def _text_field(row: dict, ref: str) -> str:
    if isinstance(row.get("text"), str):
        return row["text"]
    for value in row.values():
        if isinstance(value, str):
            return value
    raise BadInput(f"dataset {ref} rows have no text field; give each row a 'text' string")


def _hub_documents(dataset: DatasetRef) -> list[str]:
    import datasets

    try:
        rows = datasets.load_dataset(dataset.location, dataset.config, split="train")
    except Exception as exc:  # network, auth, missing config: all mean "cannot get it"
        raise BadInput(f"cannot load hub dataset {dataset.location} ({type(exc).__name__}); check the id and the "
                       "network, or save it as .jsonl/.parquet and pass the file") from None
    return [_text_field(row, dataset.location) for row in rows]


def token_windows(tokenizer, ref: str, samples: int, seq_len: int, seed: int):
    """`samples` non-overlapping windows of `seq_len` tokens, drawn with a seeded RNG: a [samples, seq_len] tensor."""
    import torch

    ids = encode(tokenizer, load_documents(ref))
    body = text_length(tokenizer, seq_len)
    available = len(ids) // body
    if available < samples:
        raise BadInput(
            f"dataset {ref} has {len(ids)} tokens: {available} windows of {seq_len}, but {samples} were asked; "
            "lower the sample count or sequence length, or use a larger dataset"
        )
    starts = sorted(random.Random(seed).sample(range(available), samples))
    return frame(tokenizer, torch.stack([ids[s * body:(s + 1) * body] for s in starts]))


def encode(tokenizer, docs: list[str]):
    """The documents as one run of token ids, without special tokens (windows add them, see special_ids)."""
    return tokenizer("\n\n".join(docs), return_tensors="pt", add_special_tokens=False).input_ids[0]


def special_ids(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer itself puts before and after a text (BOS for Llama or Gemma, nothing for Qwen):
    every calibration and evaluation window is framed the same way, since some families degrade badly without
    their BOS."""
    plain = tokenizer("Hello", add_special_tokens=False).input_ids
    full = tokenizer("Hello").input_ids
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start], full[start + len(plain):]
    return [], []


def text_length(tokenizer, seq_len: int) -> int:
    """Text tokens in a window of `seq_len` once the tokenizer's special tokens frame it."""
    return seq_len - sum(map(len, special_ids(tokenizer)))


def frame(tokenizer, chunks):
    """[n, text_length] token ids -> [n, seq_len] windows, framed by the tokenizer's own special tokens."""
    import torch

    def column(ids: list[int]):
        return torch.tensor(ids, dtype=chunks.dtype).expand(len(chunks), len(ids))

    prefix, suffix = special_ids(tokenizer)
    return torch.cat([column(prefix), chunks, column(suffix)], dim=1)


def shared_paragraphs(first: str, second: str, min_chars: int = 80) -> int:
    """How many substantial paragraphs two datasets share (evaluation must not overlap calibration)."""
    def paragraphs(ref: str) -> set[str]:
        return {" ".join(d.split()) for d in load_documents(ref) if len(d) >= min_chars}

    return len(paragraphs(first) & paragraphs(second))

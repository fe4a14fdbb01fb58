"""The unquantized model's evaluation results, measured once per model and evaluation settings (the `reference`
stage) and read by every verify of that model: per-token losses and top-1 tokens of every window, and the greedy
continuation of every prompt. No logits are kept: every logit check (export parity, ONNX, engine) compares with the
calibrated model, not with the unquantized one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.verify import evaluate

TENSORS_FILE = "reference.safetensors"


@dataclass(frozen=True)
class Reference:
    losses: torch.Tensor  # [windows, seq_len - 1] next-token losses, float32
    top1: torch.Tensor  # [windows, seq_len] greedy next-token predictions
    generations: list[list[int]]  # greedy continuation of each prompt

    @property
    def perplexity(self) -> float:
        return evaluate.perplexity_of(self.losses)

    def write(self, out: Path) -> None:
        from safetensors.torch import save_file

        lengths = torch.tensor([len(g) for g in self.generations], dtype=torch.int32)
        flat = torch.tensor([t for g in self.generations for t in g], dtype=torch.int64)
        save_file({"losses": self.losses.float().contiguous(), "top1": self.top1.to(torch.int32).contiguous(),
                   "generation_lengths": lengths, "generation_tokens": flat}, out / TENSORS_FILE)

    @classmethod
    def read(cls, folder: Path) -> Reference:
        from safetensors.torch import load_file

        t = load_file(folder / TENSORS_FILE)
        generations = [g.tolist() for g in t["generation_tokens"].split(t["generation_lengths"].tolist())]
        return cls(t["losses"], t["top1"].long(), generations)


def measure(model, tokenizer, windows: torch.Tensor, prompts: list[torch.Tensor], max_new_tokens: int,
            track) -> Reference:
    on = evaluate.describe_windows(windows)
    scored = evaluate.score(evaluate.model_logits(model), evaluate.tracked(
        track, evaluate.batches(windows), f"perplexity, unquantized: {on}"))
    generations = evaluate.generate(model, tokenizer, evaluate.tracked(
        track, prompts, f"greedy generation, unquantized: {len(prompts)} prompts x {max_new_tokens} new tokens"),
        max_new_tokens)
    return Reference(scored["losses"], scored["top1"], generations)

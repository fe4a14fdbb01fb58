"""Quality measurements shared by verify and the benchmarks: perplexity, greedy generation, agreement, parity.
Evaluation windows go through the models in batches (one forward per batch, not per window)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from pipeline.data import encode, frame, text_length

# Tokens per forward: a batch's logits are batch x seq_len x vocab floats (200 MB at 1024 tokens of a 49k vocab),
# so the batch shrinks as windows grow.
BATCH_TOKENS = 1024


def eval_windows(tokenizer, text_docs: list[str], tokens: int, seq_len: int) -> torch.Tensor:
    """The first `tokens` tokens of the evaluation text as [n, seq_len] windows (deterministic, no sampling), each
    framed by the tokenizer's own special tokens (BOS) as calibration windows are."""
    ids = encode(tokenizer, text_docs)
    body = text_length(tokenizer, seq_len)
    n = max(1, min(tokens, len(ids)) // seq_len)
    return frame(tokenizer, ids[: n * body].reshape(n, body))


def batches(windows: torch.Tensor, batch_tokens: int = BATCH_TOKENS) -> list[torch.Tensor]:
    """[n, seq_len] windows as [b, seq_len] batches of at most `batch_tokens` tokens (at least one window each)."""
    return list(windows.split(max(1, batch_tokens // windows.shape[1])))


def tracked(track, items: Iterable, description: str) -> Iterable:
    """`items` through a stage's progress display (StageContext.track), with their count as its total."""
    items = list(items)
    return track(items, total=len(items), description=description)


def describe_windows(windows: torch.Tensor) -> str:
    """How a perplexity was measured, stated next to every perplexity: windows are scored independently, so a
    figure from short windows (little context per token) is not comparable with one from long windows."""
    count, length = windows.shape
    return f"{count} window{'s' if count > 1 else ''} x {length} tokens"


def token_losses(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """Next-token negative log-likelihoods [b, len - 1] of a batch from its [b, len, vocab] logits."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), batch[:, 1:], reduction="none")


def model_logits(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """[b, len] ids -> [b, len, vocab] logits of a transformers model."""
    return lambda batch: model(batch).logits


@torch.no_grad()
def score(logits_of: Callable[[torch.Tensor], torch.Tensor], batches_: Iterable[torch.Tensor]) -> dict:
    """Per-token losses [n, len - 1] and top-1 predictions [n, len] over all windows (a tracked iterable of
    batches is fine): all that perplexity and top-1 agreement need, without keeping any logits."""
    losses, top1 = [], []
    for batch in batches_:
        logits = logits_of(batch)
        losses.append(token_losses(logits, batch))
        top1.append(logits.argmax(-1))
    return {"losses": torch.cat(losses), "top1": torch.cat(top1)}


def perplexity_of(losses: torch.Tensor) -> float:
    return math.exp(losses.double().mean().item())


def perplexity(model, windows: torch.Tensor) -> float:
    """Perplexity over [n, seq_len] windows scored independently."""
    return perplexity_of(score(model_logits(model), batches(windows))["losses"])


def uses_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    """A prompt as [1, n] ids: an instruct model's prompt goes through its chat template with the assistant turn
    opened (add_generation_prompt); a base model's (no template) stays raw text."""
    if uses_chat_template(tokenizer):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)["input_ids"]
    return tokenizer(prompt, return_tensors="pt").input_ids


@torch.no_grad()
def generate(model, tokenizer, prompts: Iterable[torch.Tensor], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations (token ids) of each prompt."""
    outputs = []
    for ids in prompts:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.eos_token_id)
        outputs.append(out[0, ids.shape[1]:].tolist())
    return outputs


@torch.no_grad()
def agreement(model, prompts: Iterable[torch.Tensor], reference: list[list[int]]) -> float:
    """Teacher-forced token agreement: how often the model's next-token choice equals the reference model's
    greedy token, fed the reference continuation (free-running texts diverge after one different token)."""
    matches = total = 0
    for ids, continuation in zip(prompts, reference):
        if not continuation:
            continue
        full = torch.cat([ids[0], torch.tensor(continuation)])[None]
        predicted = model(full).logits[0, ids.shape[1] - 1:-1].argmax(-1)
        matches += int((predicted == full[0, ids.shape[1]:]).sum())
        total += len(continuation)
    return matches / total if total else 1.0


class Comparison:
    """Logits of an export or a runtime against the reference model's, accumulated batch by batch (all logits at
    once would take gigabytes) and window by window within a batch (a batch's temporaries would take several
    times its logits): top-1 agreement, logit cosine, largest difference, and the perplexity of the compared
    logits on those windows."""

    def __init__(self) -> None:
        self.dot = self.norm_ours = self.norm_reference = 0.0
        self.largest, self.matches, self.tokens, self.losses = 0.0, 0, 0, []

    @torch.no_grad()
    def add(self, ours: torch.Tensor, theirs: torch.Tensor, batch: torch.Tensor) -> None:
        """[b, len, vocab] logits of both on a [b, len] batch."""
        for mine, reference, window in zip(ours, theirs, batch):
            self.dot += (mine * reference).sum(dtype=torch.float64).item()
            self.norm_ours += mine.square().sum(dtype=torch.float64).item()
            self.norm_reference += reference.square().sum(dtype=torch.float64).item()
            self.largest = max(self.largest, (mine - reference).abs().max().item())
            self.matches += int((mine.argmax(-1) == reference.argmax(-1)).sum())
            self.tokens += window.numel()
            self.losses.append(token_losses(mine[None], window[None]))

    def result(self) -> dict:
        return {"agreement": round(self.matches / self.tokens, 4), "max_abs_error": round(self.largest, 5),
                "cosine": round(self.dot / math.sqrt(self.norm_ours * self.norm_reference), 6),
                "ppl": round(perplexity_of(torch.cat(self.losses)), 4)}


@torch.no_grad()
def compare_on_windows(logits_of: Callable[[torch.Tensor], torch.Tensor], reference,
                       batches_: Iterable[torch.Tensor]) -> dict:
    """Logits from `logits_of(batch)` ([b, len, vocab]: an export, a runtime) against the `reference` model on every
    batch of windows (see Comparison)."""
    comparison = Comparison()
    for batch in batches_:
        ours = logits_of(batch).float()
        comparison.add(ours, reference(batch).logits.float(), batch)
    return comparison.result()

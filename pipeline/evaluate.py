"""Quality measurements shared by verify and the benchmarks: perplexity, greedy generation, agreement, parity."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from pipeline.data import encode, frame, text_length


def eval_windows(tokenizer, text_docs: list[str], tokens: int, seq_len: int) -> torch.Tensor:
    """The first `tokens` tokens of the evaluation text as [n, seq_len] windows (deterministic, no sampling), each
    framed by the tokenizer's own special tokens (BOS) as calibration windows are."""
    ids = encode(tokenizer, text_docs)
    body = text_length(tokenizer, seq_len)
    n = max(1, min(tokens, len(ids)) // seq_len)
    return frame(tokenizer, ids[: n * body].reshape(n, body))


def describe_windows(windows: torch.Tensor) -> str:
    """How a perplexity was measured, stated next to every perplexity: windows are scored independently, so a
    figure from short windows (little context per token) is not comparable with one from long windows."""
    count, length = windows.shape
    return f"{count} window{'s' if count > 1 else ''} x {length} tokens"


def nll_sum(logits: torch.Tensor, window: torch.Tensor) -> float:
    """Summed next-token negative log-likelihood of one window from its [len, vocab] logits (len - 1 predictions)."""
    return torch.nn.functional.cross_entropy(logits[:-1].float(), window[1:], reduction="sum").item()


@torch.no_grad()
def perplexity(model, windows: Iterable[torch.Tensor]) -> float:
    """Perplexity over windows scored independently (each a [seq_len] tensor; a tracked iterable is fine)."""
    total, count = 0.0, 0
    for window in windows:
        total += nll_sum(model(window[None]).logits[0], window)
        count += window.numel() - 1
    return math.exp(total / count)


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


@torch.no_grad()
def compare_on_windows(logits_of: Callable[[torch.Tensor], torch.Tensor], reference, windows: Iterable[torch.Tensor],
                       ) -> dict:
    """Logits from `logits_of(window)` ([len, vocab]: an export, a runtime) against the `reference` model on every
    window: top-1 agreement, logit cosine and largest difference over all windows' logits, and the perplexity of
    `logits_of` on those windows (accumulated window by window: all logits at once would take gigabytes)."""
    dot = norm_ours = norm_reference = nll = 0.0
    largest, matches, tokens, predicted = 0.0, 0, 0, 0
    for window in windows:
        ours, theirs = logits_of(window).double(), reference(window[None]).logits[0].double()
        dot += (ours * theirs).sum().item()
        norm_ours += ours.square().sum().item()
        norm_reference += theirs.square().sum().item()
        largest = max(largest, (ours - theirs).abs().max().item())
        matches += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
        tokens, predicted = tokens + len(window), predicted + len(window) - 1
        nll += nll_sum(ours, window)
    return {"agreement": round(matches / tokens, 4), "max_abs_error": round(largest, 5),
            "cosine": round(dot / math.sqrt(norm_ours * norm_reference), 6), "ppl": round(math.exp(nll / predicted), 4)}

"""Quality measurements shared by verify and the benchmarks: perplexity, greedy generation, agreement, parity."""

from __future__ import annotations

import math

import torch

from pipeline.data import encode, frame, text_length


def eval_windows(tokenizer, text_docs: list[str], tokens: int, seq_len: int) -> torch.Tensor:
    """The first `tokens` tokens of the evaluation text as [n, seq_len] windows (deterministic, no sampling), each
    framed by the tokenizer's own special tokens (BOS) as calibration windows are."""
    ids = encode(tokenizer, text_docs)
    body = text_length(tokenizer, seq_len)
    n = max(1, min(tokens, len(ids)) // seq_len)
    return frame(tokenizer, ids[: n * body].reshape(n, body))


@torch.no_grad()
def perplexity(model, windows: torch.Tensor) -> float:
    total, count = 0.0, 0
    for window in windows:
        logits = model(window[None]).logits[0, :-1].float()
        total += torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum").item()
        count += window.numel() - 1
    return math.exp(total / count)


def prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    """A prompt as [1, n] ids, through the chat template when the tokenizer has one."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)["input_ids"]
    return tokenizer(prompt, return_tensors="pt").input_ids


@torch.no_grad()
def generate(model, tokenizer, prompts: list[torch.Tensor], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations (token ids) of each prompt."""
    outputs = []
    for ids in prompts:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.eos_token_id)
        outputs.append(out[0, ids.shape[1]:].tolist())
    return outputs


@torch.no_grad()
def agreement(model, prompts: list[torch.Tensor], reference: list[list[int]]) -> float:
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
def logit_parity(model_a, model_b, window: torch.Tensor) -> dict:
    return compare_logits(model_a(window[None]).logits, model_b(window[None]).logits)


def compare_logits(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Largest absolute difference and cosine similarity of two sets of logits."""
    a, b = a.double().flatten(), b.double().flatten()
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
    return {"max_abs_error": round((a - b).abs().max().item(), 5), "cosine": round(cosine, 6)}

"""What every row of a comparison is measured with, on the same held-out tokens: perplexity ratio and
teacher-forced agreement against the unquantized model (pipeline.verify.evaluate's helpers, as verify uses them), weight
bytes against fp16, and greedy decoding speed on this CPU where the result runs here as deployed."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from pipeline import data
from pipeline.recipe import Recipe
from pipeline.verify import evaluate

DECODE_STEPS = 32  # greedy tokens timed after the first verify prompt


@dataclass
class Candidate:
    """A quantized model as its own runtime runs it."""

    model: Callable  # ids [1, n] -> an object with .logits [1, n, vocab], as a transformers model returns
    weight_bytes: int
    runtime: str
    # Greedy decoding of `steps` tokens after a prompt; None where the result does not run on CPU as deployed.
    decode: Callable[[torch.Tensor, int], object] | None


@dataclass
class Heldout:
    windows: torch.Tensor
    prompts: list[torch.Tensor]
    max_new_tokens: int


def heldout(recipe: Recipe, tokenizer) -> Heldout:
    spec = recipe.verify
    windows = evaluate.eval_windows(tokenizer, data.load_documents(spec.dataset), spec.tokens, spec.seq_len)
    return Heldout(windows, [evaluate.prompt_ids(tokenizer, p) for p in spec.prompts], spec.max_new_tokens)


def torch_decode(model, tokenizer) -> Callable[[torch.Tensor, int], object]:
    def decode(prompt: torch.Tensor, steps: int):
        with torch.no_grad():
            return model.generate(prompt, attention_mask=torch.ones_like(prompt), min_new_tokens=steps,
                                  max_new_tokens=steps, do_sample=False, pad_token_id=tokenizer.eos_token_id)

    return decode


def logits_of(run: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    """A transformers-like callable (`.logits`) around a function from ids [1, n] to logits [1, n, vocab]."""
    return lambda ids: SimpleNamespace(logits=run(ids))


def weight_bytes(model) -> int:
    """Bytes of a PyTorch model's weights as deployed: floating-point parameters at fp16, everything a quantizer
    stored (packed integers, scales, quantization maps) at its own size; tied tensors once."""
    parameters = {p.data_ptr() for p in model.parameters() if p.is_floating_point()}
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * (2 if tensor.data_ptr() in parameters else tensor.element_size())
    return total


def measure(candidate: Candidate, held: Heldout, reference: dict | None, fp16_bytes: int) -> dict:
    """The row's numbers; `reference` (the unquantized row) gives the ratio and the tokens to agree with."""
    ppl = evaluate.perplexity(candidate.model, held.windows)
    result = {"runtime": candidate.runtime, "eval_tokens": int(held.windows.numel()), "ppl": round(ppl, 4),
              "weight_bytes": candidate.weight_bytes, "size_vs_fp16": round(candidate.weight_bytes / fp16_bytes, 4),
              "tokens_per_second": None}
    if candidate.decode is not None:
        prompt = held.prompts[0]
        started = time.perf_counter()
        candidate.decode(prompt, DECODE_STEPS)
        result["tokens_per_second"] = round(DECODE_STEPS / (time.perf_counter() - started), 2)
    if reference is not None:
        result["ppl_ratio"] = round(ppl / reference["ppl"], 4)
        result["agreement"] = round(evaluate.agreement(candidate.model, held.prompts, reference["generations"]), 4)
    return result

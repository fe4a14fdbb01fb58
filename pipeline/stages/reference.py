"""reference: the unquantized model's evaluation results (pipeline/verify/reference.py), keyed on the load artifact
and the evaluation settings only, so every format, target and export of a model shares one."""

from __future__ import annotations

from pipeline import data
from pipeline.facts import Facts
from pipeline.recipe import Recipe
from pipeline.stages.base import Stage, StageContext
from pipeline.store import ArtifactStore

EVAL_FIELDS = ("verify.dataset", "verify.tokens", "verify.seq_len", "verify.prompts", "verify.max_new_tokens")


class ReferenceFacts(Facts):
    ppl: float  # the unquantized model's perplexity on the evaluation windows
    generations: int
    eval_windows: dict[str, int]  # count, length


class Reference(Stage):
    name = "reference"
    version = "1"
    inputs = ("load",)
    fields = EVAL_FIELDS
    libraries = ("torch", "transformers")
    Facts = ReferenceFacts

    def params(self, recipe: Recipe, store: ArtifactStore) -> dict:
        return {**super().params(recipe, store), "data": data.fingerprint(recipe.verify.dataset, store)}

    def summary(self, facts: ReferenceFacts) -> str:
        w = facts.eval_windows
        return (f"unquantized ppl {facts.ppl:.3f} on {w['count']} x {w['length']} tokens; "
                f"{facts.generations} greedy generations")

    def run(self, ctx: StageContext) -> ReferenceFacts:
        from pipeline.modeling import load_model
        from pipeline.verify import evaluate, reference

        spec = ctx.recipe.verify
        model, tokenizer = load_model(ctx.input("load") / "model")
        windows = evaluate.eval_windows(tokenizer, data.load_documents(spec.dataset), spec.tokens, spec.seq_len)
        prompts = [evaluate.prompt_ids(tokenizer, p) for p in spec.prompts]
        measured = reference.measure(model, tokenizer, windows, prompts, spec.max_new_tokens, ctx.track)
        measured.write(ctx.out)
        return ReferenceFacts(ppl=round(measured.perplexity, 4), generations=len(measured.generations),
                              eval_windows={"count": windows.shape[0], "length": windows.shape[1]})

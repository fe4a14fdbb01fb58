"""sensitivity: ModelOpt AutoQuantize's per-layer sensitivity scores for `quantization.format: auto`. Keyed on the
model, the candidates, the exclusions and the calibration data, not on the budget: calibrate re-solves the per-layer
map for any effective_bits from this artifact without a single new backward pass."""

from __future__ import annotations

import json
import time

from pipeline import data
from pipeline.facts import Facts
from pipeline.recipe import Recipe
from pipeline.stages.base import Stage, StageContext
from pipeline.store import ArtifactStore

SCORES = "scores.json"


class SensitivityFacts(Facts):
    candidates: list[str]
    groups: int  # layer groups AutoQuantize scored (fused q/k/v and gate/up are one group)
    tokens: int
    seconds: float


class Sensitivity(Stage):
    name = "sensitivity"
    version = "1"
    inputs = ("load",)
    fields = ("quantization.auto.candidates", "quantization.exclude", "calibration")
    libraries = ("torch", "transformers", "nvidia-modelopt")
    Facts = SensitivityFacts

    def applies(self, recipe: Recipe) -> bool:
        return recipe.quantization.format == "auto"

    def params(self, recipe: Recipe, store: ArtifactStore) -> dict:
        return {**super().params(recipe, store), "data": data.fingerprint(recipe.calibration.dataset, store)}

    def summary(self, facts: SensitivityFacts) -> str:
        return (f"{facts.groups} layer groups x {len(facts.candidates)} candidates scored on {facts.tokens} tokens "
                f"in {facts.seconds:.0f} s")

    def run(self, ctx: StageContext) -> SensitivityFacts:
        import torch

        from pipeline import autoquant
        from pipeline.modeling import load_model

        spec, calib = ctx.recipe.quantization, ctx.recipe.calibration
        model, tokenizer = load_model(ctx.input("load") / "model")
        windows = data.token_windows(tokenizer, calib.dataset, calib.samples, calib.seq_len, calib.seed)
        started = time.time()
        scores = autoquant.score(model, spec, list(torch.split(windows, calib.batch_size)), ctx.out)
        seconds = time.time() - started
        (ctx.out / SCORES).write_text(json.dumps(scores, indent=2))
        return SensitivityFacts(candidates=list(spec.auto.candidates), groups=len(scores),
                                tokens=int(windows.numel()), seconds=round(seconds, 2))

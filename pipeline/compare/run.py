"""Running a comparison: the registry of baselines and one runner.run per row."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pipeline import host, runner
from pipeline.compare.bnb import LlmInt8, Nf4
from pipeline.compare.ort import OrtInt4, OrtInt8
from pipeline.compare.spec import check_names
from pipeline.compare.stages import Baseline, RecipeRow, Reference
from pipeline.errors import BadInput, HostLacks, QuantpipeError
from pipeline.recipe import Recipe
from pipeline.stages import by_name
from pipeline.store import ArtifactStore

log = logging.getLogger(__name__)

# Baselines that are stages of their own: another library quantizes the load artifact.
LIBRARY_BASELINES: dict[str, type[Baseline]] = {
    "nf4": Nf4, "llm-int8": LlmInt8, "ort-int8": OrtInt8, "ort-int4": OrtInt4,
}
# Baselines that are the pipeline's own stages with other settings: ModelOpt's methods a recipe can also choose.
RECIPE_BASELINES: dict[str, tuple[str, dict]] = {
    "gptq": ("ModelOpt GPTQ (INT4 weights)", {"format": "int4_awq", "algorithm": "gptq", "kv_cache": "none",
                                             "block_size": None}),
}
PIPELINE_STAGES = ("load", "calibrate", "quantize")


@dataclass
class CompareRow:
    name: str
    method: str
    metrics: dict = field(default_factory=dict)
    not_run: str | None = None  # why there are no numbers
    key: str | None = None

    def to_json(self) -> dict:
        return {"name": self.name, "method": self.method, "not_run": self.not_run, "key": self.key, **self.metrics}


def check_libraries(names: list[str]) -> None:
    """HostLacks naming the pyproject extra when a baseline's library is not installed (before any work)."""
    for name in names:
        stage = LIBRARY_BASELINES.get(name)
        missing = [m for m in stage.modules if not host.has_module(m)] if stage else []
        if missing:
            raise HostLacks(f"baseline {name} needs {', '.join(missing)}: pip install 'quantpipe[{stage.extra}]'")


def compare(recipes: list[Recipe], names: list[str], store: ArtifactStore,
            reporter: runner.Reporter | None = None) -> list[CompareRow]:
    """The unquantized reference, each recipe, then each baseline (on the first recipe's model and data)."""
    names = check_names(names)
    check_libraries(names)
    base = recipes[0]
    for other in recipes[1:]:
        if (other.model, other.verify) != (base.model, base.verify):
            raise BadInput(f"recipes {base.name} and {other.name} differ in model or verify settings; compare "
                           "recipes of one model measured on the same held-out text")
    recipe_row = (*(by_name(n) for n in PIPELINE_STAGES), Reference(), RecipeRow())

    def row(name: str, method: str, recipe: Recipe, stages: tuple) -> CompareRow:
        return _row(name, method, recipe, stages, store, reporter)

    rows = [row("unquantized", "PyTorch fp32", base, (by_name("load"), Reference()))]
    rows += [row(r.name, f"quantpipe {r.quantization.format} ({r.quantization.algorithm})", r, recipe_row)
             for r in recipes]
    for name in names:
        if name in RECIPE_BASELINES:
            title, quantization = RECIPE_BASELINES[name]
            rows.append(row(name, title, _with_quantization(base, quantization), recipe_row))
        else:
            stage = LIBRARY_BASELINES[name]()
            rows.append(row(name, stage.title, base, (by_name("load"), Reference(), *stage.upstream, stage)))
    return rows


def _with_quantization(recipe: Recipe, quantization: dict) -> Recipe:
    data = recipe.model_dump(mode="json")
    return Recipe.model_validate({**data, "quantization": {**data["quantization"], **quantization}})


def _row(name: str, method: str, recipe: Recipe, stages: tuple, store: ArtifactStore,
         reporter: runner.Reporter | None) -> CompareRow:
    """Run one row's stages; a library failing on this host makes a 'not run' row with its reason."""
    renamed = recipe.model_copy(update={"name": f"{recipe.name}-compare-{name}"})  # its own run records
    try:
        result = runner.run(renamed, store, stages=stages, reporter=reporter)
    except QuantpipeError:
        raise
    except Exception as exc:  # the library's own refusal or failure here: reported, not faked
        log.debug("baseline %s failed", name, exc_info=True)
        return CompareRow(name, method, not_run=runner.one_line(exc))
    outcome = result.outcomes[-1]
    log.info("%s: %s (%s)", name, outcome.status, outcome.key[:12])
    return CompareRow(name, method, outcome.artifact.metadata, key=outcome.key)

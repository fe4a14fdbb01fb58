"""`quantpipe tune`: the smallest artifact for a recipe's target that meets a quality bar.

Candidates are small typed values, each turned into an ordinary recipe and run by the ordinary runner (so an
interrupted search resumes from the cache and a rerun builds nothing), judged by verify on the held-out text with the
bar as its thresholds. The search tries every single format the target runs, then, below the best passing size, the
failing formats with their most sensitive layers (largest weight quantization error, quantize's layers.json) left
unquantized, then AutoQuantize (`format: auto`) over the formats it mixes at a ladder of effective-bits budgets.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline import runner, targets
from pipeline.errors import BadInput, UnsupportedOnTarget, VerificationFailed
from pipeline.recipe import CANDIDATE_BITS, Format, Recipe, canonical_format, load_recipe
from pipeline.store import ArtifactStore

log = logging.getLogger(__name__)

EXCLUDE_STEPS = (8, 32)  # most sensitive layers left unquantized, tried in this order until one passes
BUDGETS = (4.5, 5.0, 6.0, 7.0)  # AutoQuantize effective bits, tried upwards until one passes
MAX_PPL_RATIO = 10.0  # beyond this a perplexity ratio is no quality bar
OBJECTIVES = ("size", "bits")
TUNE_JSON, REPORT_MD, PLOT = "tune.json", "report.md", "plot.png"


@dataclass(frozen=True)
class Bar:
    """The quality a candidate must reach on the held-out text; it becomes each candidate's verify thresholds."""

    max_ppl_ratio: float
    min_agreement: float | None = None

    def __post_init__(self) -> None:
        if not 1.0 < self.max_ppl_ratio <= MAX_PPL_RATIO:
            raise BadInput(f"--max-ppl-ratio {self.max_ppl_ratio} is out of range; give a ratio above 1.0 and at "
                           f"most {MAX_PPL_RATIO}, e.g. 1.05")
        if self.min_agreement is not None and not 0.0 < self.min_agreement <= 1.0:
            raise BadInput(f"--min-agreement {self.min_agreement} is out of range; give a fraction in (0, 1], "
                           "e.g. 0.85")

    def overrides(self) -> list[str]:
        # no agreement bar: any agreement
        return [f"verify.thresholds={{ppl_ratio: {self.max_ppl_ratio}, gen_agreement: {self.min_agreement or 0.0}}}"]

    def describe(self) -> str:
        agreement = f" and agreement >= {self.min_agreement:.0%}" if self.min_agreement else ""
        return f"ppl ratio <= {self.max_ppl_ratio}{agreement}"


@dataclass(frozen=True)
class Candidate:
    """One point of the search: a quantization section laid over the recipe's."""

    slug: str  # part of the candidate recipe's name: int4_awq, int4_awq-x8, auto-5.0
    kind: str  # format, exclude, auto
    quantization: dict

    @property
    def label(self) -> str:
        q = self.quantization
        if self.kind == "exclude":
            return f"{q['format']}, {len(q['exclude']) - len(self.base_exclude)} most sensitive layers unquantized"
        if self.kind == "auto":
            return f"AutoQuantize {'+'.join(q['auto']['candidates'])} at {q['auto']['effective_bits']:g} bits"
        return q["format"]

    @property
    def base_exclude(self) -> tuple[str, ...]:
        return tuple(p for p in self.quantization["exclude"] if not p.endswith(".*"))


@dataclass
class Result:
    candidate: Candidate
    recipe: str
    ran: bool = False
    passed: bool = False
    error: str | None = None  # why it did not run (unsupported, bad block size...)
    failures: list[str] = field(default_factory=list)
    ppl_ratio: float | None = None
    agreement: float | None = None
    bytes: int | None = None
    fp16_bytes: int | None = None
    bits: float | None = None
    built: int = 0  # stages built (not cache hits) for this candidate in this search
    layers: list[dict] = field(default_factory=list)  # quantize's per-layer weight errors, for exclusions

    def measure(self, objective: str) -> float:
        return self.bytes if objective == "size" else self.bits

    def to_json(self) -> dict:
        return {"candidate": self.candidate.slug, "label": self.candidate.label, "kind": self.candidate.kind,
                "quantization": self.candidate.quantization, "recipe": self.recipe, "ran": self.ran,
                "passed": self.passed, "error": self.error, "failures": self.failures, "ppl_ratio": self.ppl_ratio,
                "agreement": self.agreement, "bytes": self.bytes, "fp16_bytes": self.fp16_bytes,
                "size_vs_fp16": round(self.bytes / self.fp16_bytes, 4) if self.bytes else None,
                "bits": self.bits, "built_stages": self.built}


@dataclass
class Search:
    recipe: str
    target: str
    bar: Bar
    objective: str
    results: list[Result]
    chosen: Result | None
    frontier: list[Result]

    def closest(self) -> Result | None:
        """The candidate nearest the bar: the smallest relative shortfall on either measure."""
        ran = [r for r in self.results if r.ran]
        return min(ran, key=lambda r: _shortfall(r, self.bar), default=None)

    def to_json(self) -> dict:
        return {"recipe": self.recipe, "target": self.target, "bar": asdict(self.bar), "objective": self.objective,
                "chosen": self.chosen.candidate.slug if self.chosen else None,
                "chosen_recipe": self.chosen.recipe if self.chosen else None,
                "frontier": [r.candidate.slug for r in self.frontier],
                "candidates": [r.to_json() for r in self.results]}


def _shortfall(result: Result, bar: Bar) -> float:
    short = result.ppl_ratio / bar.max_ppl_ratio - 1
    if bar.min_agreement:
        short = max(short, 1 - result.agreement / bar.min_agreement)
    return short


def parse_numbers(text: str, option: str, kind: type = int) -> tuple:
    """`--exclude-steps 8,32` or `--budgets 4.5,6`: positive numbers, or none."""
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        values = tuple(kind(part) for part in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) <= 0:
        raise BadInput(f"{option} '{text}' must be positive {kind.__name__} values separated by commas, or none")
    return values


def format_candidates(base: Recipe, formats: Iterable[str] | None = None) -> list[Candidate]:
    """Every single format that runs on all of the recipe's GPUs (or those asked for), with the format's own
    algorithm and block size and the recipe's KV cache and exclusions."""
    archs = targets.format_archs()  # format auto is the AutoQuantize ladder's, not a single format
    runnable = [f for f in Format.__args__ if f != "auto" and all(targets.resolve(gpu).sm in archs[f]
                                                                  for gpu in base.gpus)]
    if formats is None:
        return [_format_candidate(base, f) for f in runnable]
    chosen = [canonical_format(f) for f in formats]
    unknown = [f for f in chosen if f not in runnable]
    if unknown:
        raise BadInput(f"--formats: {', '.join(unknown)} not among the formats {', '.join(base.gpus)} runs "
                       f"({', '.join(runnable)})")
    return [_format_candidate(base, f) for f in chosen]


def _format_candidate(base: Recipe, fmt: str) -> Candidate:
    section = {**base.quantization.model_dump(mode="json"), "format": fmt, "algorithm": "auto", "block_size": None}
    return Candidate(fmt, "format", section)


def exclusion_candidate(source: Result, count: int) -> Candidate:
    """`source`'s format with its `count` layers of largest weight quantization error left unquantized."""
    worst = sorted(source.layers, key=lambda row: row["relative_error"], reverse=True)[:count]
    q = source.candidate.quantization
    section = {**q, "exclude": [*q["exclude"], *(f"{row['layer']}.*" for row in worst)]}
    return Candidate(f"{q['format']}-x{len(worst)}", "exclude", section)


def auto_candidates(formats: list[str], budgets: Iterable[float], base: Recipe) -> list[Candidate]:
    """AutoQuantize mixing those of `formats` it can mix (a layer may also stay unquantized), at each budget above
    the smallest candidate's bits, smallest budget first."""
    mixable = [f for f in formats if f in CANDIDATE_BITS]
    if not mixable:
        return []
    floor = min(CANDIDATE_BITS[f] for f in mixable)
    return [Candidate(f"auto-{bits:g}", "auto", {"format": "auto", "exclude": list(base.quantization.exclude),
                                                 "auto": {"candidates": mixable, "effective_bits": bits}})
            for bits in sorted(budgets) if floor < bits <= 16]


def search(ref: str | None, overrides: list[str], bar: Bar, store: ArtifactStore, *, objective: str = "size",
           formats: Iterable[str] | None = None, exclude_steps: Iterable[int] = EXCLUDE_STEPS,
           budgets: Iterable[float] = BUDGETS,
           reporter_for: Callable[[Recipe], runner.Reporter] = lambda recipe: runner.Reporter(),
           on_result: Callable[[Result], None] = lambda result: None) -> Search:
    """Run the candidates smallest-first where it matters: all single formats, then refinements below the best
    passing size. Nothing is published here (see `publish_winner`)."""
    base = load_recipe(ref, overrides)
    results: list[Result] = []

    def evaluate(candidate: Candidate) -> Result:
        result = _evaluate(ref, overrides, bar, base, candidate, store, reporter_for)
        results.append(result)
        on_result(result)
        return result

    singles = [evaluate(c) for c in format_candidates(base, formats)]
    best = _best(results, objective)
    for failed in sorted((r for r in singles if r.ran and not r.passed and _below(r, best, objective)),
                         key=lambda r: r.measure(objective)):
        for count in sorted(set(exclude_steps)):
            if count <= 0 or not failed.layers:
                continue
            if evaluate(exclusion_candidate(failed, count)).passed:
                break
    best = _best(results, objective)
    ceiling = best.bits if best else 16.0  # a budget at or above the best passing bits cannot make it smaller
    for candidate in auto_candidates([r.candidate.quantization["format"] for r in singles if r.ran],
                                     [b for b in budgets if b < ceiling], base):
        if evaluate(candidate).passed:
            break  # a larger budget only makes a larger artifact
    return Search(base.name, base.target.gpu, bar, objective, results, _best(results, objective),
                  frontier(results))


def _below(result: Result, best: Result | None, objective: str) -> bool:
    return best is None or result.measure(objective) < best.measure(objective)


def _best(results: list[Result], objective: str) -> Result | None:
    """The smallest passing candidate by the objective; equal sizes go to the lower perplexity ratio."""
    return min((r for r in results if r.passed), key=lambda r: (r.measure(objective), r.ppl_ratio), default=None)


def frontier(results: list[Result]) -> list[Result]:
    """The Pareto frontier of size against perplexity ratio among the candidates that ran, smallest first."""
    ran = sorted((r for r in results if r.ran), key=lambda r: (r.bytes, r.ppl_ratio))
    front, best_ratio = [], float("inf")
    for r in ran:
        if r.ppl_ratio < best_ratio:
            front.append(r)
            best_ratio = r.ppl_ratio
    return front


def candidate_recipe(ref: str | None, overrides: list[str], bar: Bar, base: Recipe, candidate: Candidate) -> Recipe:
    """The recipe a candidate runs as: the user's, its quantization section replaced, the bar as verify's
    thresholds, and a name of its own (run records and published folders are per recipe name)."""
    return load_recipe(ref, [*overrides, *bar.overrides(), f"quantization={json.dumps(candidate.quantization)}",
                             f"name={candidate_name(base, candidate)}"])


def candidate_name(base: Recipe, candidate: Candidate) -> str:
    return f"{base.name[:40]}-tune-{candidate.slug}"


def _evaluate(ref: str | None, overrides: list[str], bar: Bar, base: Recipe, candidate: Candidate,
              store: ArtifactStore, reporter_for: Callable[[Recipe], runner.Reporter]) -> Result:
    try:
        recipe = candidate_recipe(ref, overrides, bar, base, candidate)
        run = runner.run(recipe, store, reporter=reporter_for(recipe))
    except (BadInput, UnsupportedOnTarget) as exc:  # this candidate cannot be made; the others still can
        log.warning("tune: %s not run: %s", candidate.label, exc)
        return Result(candidate, candidate_name(base, candidate), error=runner.one_line(exc))
    result = Result(candidate, recipe.name)
    artifacts = {o.stage: o.artifact for o in run.outcomes}
    verify, quantize = artifacts["verify"].facts, artifacts["quantize"]
    result.ran, result.passed, result.failures = True, verify.passed, verify.failures
    result.ppl_ratio, result.agreement = verify.metrics["ppl_ratio"], verify.metrics["gen_agreement"]
    result.bytes, result.fp16_bytes = quantize.facts.checkpoint_bytes, quantize.facts.fp16_bytes
    result.bits = round(checkpoint_bits(quantize.path / "checkpoint"), 3)
    result.layers = json.loads((quantize.path / "layers.json").read_text())
    result.built = sum(o.status != "hit" for o in run.outcomes)
    return result


def checkpoint_bits(folder: Path) -> float:
    """Bits per parameter of the checkpoint's weights outside the input and output embeddings (the layers the
    formats quantize), scales included, from the safetensors headers: what AutoQuantize's budget counts, plus
    the scales' cost."""
    stored = params = 0
    for path in folder.glob("*.safetensors"):
        for name, info in _safetensors_header(path).items():
            if name == "__metadata__" or "embed_tokens" in name or name.startswith("lm_head."):
                continue
            start, end = info["data_offsets"]
            stored += end - start
            if not name.endswith(("_scale", "_scale_2", "amax")):  # scales cost bits but are not parameters
                count = 1
                for dim in info["shape"]:
                    count *= dim
                packed = info["dtype"] == "U8" and name.endswith(".weight")  # two 4-bit values per byte
                params += count * (2 if packed else 1)
    return 8 * stored / max(params, 1)


def _safetensors_header(path: Path) -> dict:
    with path.open("rb") as fh:
        return json.loads(fh.read(int.from_bytes(fh.read(8), "little")))


def publish_winner(search_result: Search, ref: str | None, overrides: list[str], store: ArtifactStore,
                   engines_dir: Path) -> Path:
    """Publish the chosen candidate (all cache hits by now) with the search record in its card."""
    from pipeline.publish import publish

    chosen = search_result.chosen
    base = load_recipe(ref, overrides)
    recipe = candidate_recipe(ref, overrides, search_result.bar, base, chosen.candidate)
    run = runner.run(recipe, store)
    return publish(engines_dir, recipe, {o.stage: o.artifact for o in run.outcomes}, store,
                   search=card_record(search_result))


def card_record(search_result: Search) -> dict:
    """What a published card says about the search that chose it."""
    return {"bar": search_result.bar.describe(), "objective": search_result.objective,
            "candidates": [{"label": r.candidate.label, "passed": r.passed, "ppl_ratio": r.ppl_ratio,
                            "agreement": r.agreement, "bytes": r.bytes, "fp16_bytes": r.fp16_bytes, "bits": r.bits,
                            "error": r.error, "chosen": r is search_result.chosen}
                           for r in search_result.results]}


def fail_unless_chosen(search_result: Search) -> None:
    """Exit 5 when nothing met the bar, naming the closest candidate."""
    if search_result.chosen is not None:
        return
    closest = search_result.closest()
    if closest is None:
        raise VerificationFailed(f"no candidate for {search_result.target} could be run; see the table for why")
    agreement = f", agreement {closest.agreement:.0%}" if search_result.bar.min_agreement else ""
    raise VerificationFailed(
        f"no candidate meets {search_result.bar.describe()}; closest: {closest.candidate.label} (ppl ratio "
        f"{closest.ppl_ratio:.3f}{agreement}, {closest.bytes / closest.fp16_bytes:.2f}x of fp16); loosen the bar "
        "or calibrate on more text")


def write_report(folder: Path, search_result: Search, command: str) -> None:
    """tune.json, report.md (the candidates) and plot.png (size against perplexity ratio, frontier and choice)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / TUNE_JSON).write_text(json.dumps({"command": command, **search_result.to_json()}, indent=2))
    (folder / REPORT_MD).write_text(markdown(search_result, command))
    plot(folder / PLOT, search_result)


COLUMNS = ("candidate", "result", "ppl ratio", "agreement", "size vs fp16", "bits", "note")


def cells(result: Result, search_result: Search | None = None) -> list[str]:
    """A candidate's table row; `search_result` marks the chosen one and the frontier."""
    if not result.ran:
        return [result.candidate.label, "not run", "", "", "", "", result.error or ""]
    notes = [n for n, on in (("chosen", search_result and result is search_result.chosen),
                             ("frontier", search_result and result in search_result.frontier)) if on]
    return [result.candidate.label, "pass" if result.passed else "FAIL", f"{result.ppl_ratio:.3f}",
            f"{result.agreement:.1%}", f"{result.bytes / result.fp16_bytes:.3f}x", f"{result.bits:.2f}",
            ", ".join(notes) or "; ".join(result.failures)[:80]]


def markdown(search_result: Search, command: str) -> str:
    lines = [f"# quantpipe tune: {search_result.recipe} for {search_result.target}", "", f"`{command}`", "",
             (f"Bar: {search_result.bar.describe()} on the held-out text; objective: smallest "
              f"{search_result.objective}."), "", "| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in cells(r, search_result)) + " |"
              for r in search_result.results]
    return "\n".join([*lines, "", f"![size against perplexity ratio]({PLOT})", ""])


def plot(path: Path, search_result: Search) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(figsize=(7, 4.5), layout="constrained")
    ran = [r for r in search_result.results if r.ran]
    for r in ran:
        axes.scatter(r.bytes / r.fp16_bytes, r.ppl_ratio, color="tab:blue" if r.passed else "tab:grey")
        axes.annotate(r.candidate.slug, (r.bytes / r.fp16_bytes, r.ppl_ratio), fontsize="small",
                      textcoords="offset points", xytext=(4, 4))
    front = search_result.frontier
    axes.plot([r.bytes / r.fp16_bytes for r in front], [r.ppl_ratio for r in front], color="tab:blue",
              drawstyle="steps-post", marker="o", markersize=12, markerfacecolor="none", label="Pareto frontier")
    axes.axhline(search_result.bar.max_ppl_ratio, color="tab:red", linestyle="--",
                 label=f"bar: ppl ratio {search_result.bar.max_ppl_ratio}")
    if search_result.chosen:
        c = search_result.chosen
        axes.scatter(c.bytes / c.fp16_bytes, c.ppl_ratio, marker="*", s=250, color="tab:orange", zorder=3,
                     label=f"chosen: {c.candidate.slug}")
    axes.set_xlabel("checkpoint size / fp16")
    axes.set_ylabel("perplexity ratio vs unquantized (held-out text)")
    axes.set_title(f"tune {search_result.recipe} for {search_result.target}")
    axes.legend(fontsize="small")
    fig.savefig(path, dpi=80)
    plt.close(fig)

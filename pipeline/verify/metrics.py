"""Verification metrics as data: each declares its name, how it is computed from verify's measurements, its
direction and its default threshold. Recipes set thresholds by name (`verify.thresholds: {ppl_ratio: 1.1}`); report,
card, publish and the CLI read values by name. Adding a metric is one `register` call."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Metric:
    name: str
    label: str  # what it measures, for reports and failure messages
    direction: Literal["max", "min"]  # "max": the threshold is the largest value allowed; "min": the smallest
    compute: Callable[[dict], float | None]  # verify's measurements -> the value (None: nothing to measure)
    display: str = ".4f"  # format spec for the value
    on_windows: bool = False  # measured on the evaluation windows (reports then say which)
    default: float | None = None  # threshold for formats whose defaults do not name this metric

    def passes(self, value: float, threshold: float) -> bool:
        return value <= threshold if self.direction == "max" else value >= threshold

    def bound(self, threshold: float) -> str:
        """What passing means, e.g. '<= 1.05'."""
        return f"{'<=' if self.direction == 'max' else '>='} {threshold}"

    def missed(self, value: float, threshold: float) -> str:
        """One failure line, e.g. 'perplexity ratio, quantized / unquantized 1.0712 > 1.05'."""
        return f"{self.label} {value:{self.display}} {'>' if self.direction == 'max' else '<'} {threshold}"


METRICS: dict[str, Metric] = {}


def register(metric: Metric) -> Metric:
    METRICS[metric.name] = metric
    return metric


def unknown(names) -> str | None:
    """A one-line problem for the first name that is no metric (recipe thresholds), else None."""
    from difflib import get_close_matches

    for name in sorted(set(names) - METRICS.keys()):
        close = get_close_matches(name, list(METRICS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"verify.thresholds: unknown metric '{name}'{hint}; metrics: {', '.join(METRICS)}"
    return None


def format_defaults(fmt: str) -> dict[str, float]:
    """The format's default thresholds by metric name (pipeline/formats/)."""
    from pipeline import formats

    return dict(formats.get(fmt).thresholds)


def thresholds(fmt: str, overrides: dict[str, float]) -> dict[str, float]:
    """Every metric's threshold for a format: the recipe's where it sets one, else the format's, else the
    metric's own default; metrics with none of these are reported but not checked."""
    defaults = format_defaults(fmt)
    chosen = {name: overrides.get(name, defaults.get(name, metric.default)) for name, metric in METRICS.items()}
    return {name: value for name, value in chosen.items() if value is not None}


def evaluate(measured: dict, limits: dict[str, float]) -> tuple[dict[str, float], list[str]]:
    """(every metric's value, a failure line per missed threshold)."""
    values, failures = {}, []
    for name, metric in METRICS.items():
        value = metric.compute(measured)
        if value is None:
            continue
        values[name] = round(value, 6)
        if name in limits and not metric.passes(value, limits[name]):
            failures.append(metric.missed(value, limits[name]))
    return values, failures


def describe(values: dict[str, float]) -> str:
    """Metric values in one phrase, e.g. 'ppl_ratio 1.0220, gen_agreement 0.88' (for summaries and tables)."""
    return ", ".join(f"{name} {value:{METRICS[name].display if name in METRICS else '.4g'}}"
                     for name, value in values.items())


def shown(name: str, value: float, threshold: float | None, windows: str = "") -> tuple[str, str, str]:
    """(label, value, bound) of a metric by name, for people: the label says which `windows` a metric measured on
    them was measured on; a metric this code no longer registers (an older report) shows its name."""
    metric = METRICS.get(name)
    if metric is None:
        return name, f"{value:.4g}", "not checked" if threshold is None else f"threshold {threshold}"
    label = f"{metric.label} ({windows})" if metric.on_windows and windows else metric.label
    return label, f"{value:{metric.display}}", "not checked" if threshold is None else metric.bound(threshold)


def _worst_parity(measured: dict) -> float | None:
    return min(measured["parity"].values(), default=None)


register(Metric("ppl_ratio", "perplexity ratio, quantized / unquantized", "max",
                lambda m: m["ppl_quantized"] / m["ppl_original"], on_windows=True))
register(Metric("gen_agreement", "greedy generation agreement", "min", lambda m: m["agreement"], display=".2f"))
register(Metric("parity_cosine", "worst export logit cosine vs the calibrated model", "min", _worst_parity,
                on_windows=True))
# No threshold by default: reported beside the others, checked only where a recipe sets one.
register(Metric("top1_agreement", "top-1 agreement with the unquantized model on the evaluation windows", "min",
                lambda m: m["top1_agreement"], display=".2f", on_windows=True))

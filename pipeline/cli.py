"""The `quantpipe` command. The only place that maps errors to exit codes and prints for people or machines."""

from __future__ import annotations

import functools
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import click
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from pipeline import generate as gen
from pipeline import host, runner, runs, targets
from pipeline.errors import BadInput, CellsFailed, QuantpipeError, VerificationFailed
from pipeline.files import write_json_atomic
from pipeline.fmt import human_bytes, parse_age, parse_size
from pipeline.publish import published_keys
from pipeline.recipe import load_recipe, presets
from pipeline.stages import NAMES, by_name
from pipeline.store import ArtifactStore, gc


class ReaderSafeStdout:
    """stdout that outlives its reader: when a pipe's reader goes away (`quantpipe run --json | head`), further
    output is dropped with one warning and the run goes on to finish, publish and write its record."""

    def __init__(self, stream) -> None:
        self.stream, self.reader_gone = stream, False

    def write(self, text: str) -> int:
        self._guard(self.stream.write, text)
        return len(text)

    def flush(self) -> None:
        self._guard(self.stream.flush)

    def _guard(self, call: Callable, *args) -> None:
        if self.reader_gone:
            return
        try:
            call(*args)
        except BrokenPipeError:
            self.reader_gone = True
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())  # the interpreter's last flush too
            logging.getLogger("pipeline").warning("standard output was closed by its reader; the run goes on "
                                                  "and its record is written, further output is dropped")

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


# Wide tables when output goes to a log file, not wrapped at 80 columns.
out = Console(file=ReaderSafeStdout(sys.stdout), highlight=False, soft_wrap=True,
              width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, soft_wrap=True)
LIBRARIES = ("torch", "transformers", "nvidia-modelopt", "datasets", "safetensors", "onnx", "onnxruntime", "gguf",
             "tensorrt-rtx", "tensorrt-llm", "ray")


def _emit(as_json: bool, data: object, render: Callable[[], None]) -> None:
    if as_json:
        out.print_json(json.dumps(data, default=str))
    else:
        render()


def _event(data: dict) -> None:
    """One JSON object per line on stdout: the event stream of `run --json` and `matrix --json`."""
    out.file.write(json.dumps(data, default=str, separators=(",", ":")) + "\n")
    out.file.flush()


def default_engines_dir() -> Path:
    return Path(os.environ.get("QUANTPIPE_ENGINES") or "engines")


def _fail(exc: QuantpipeError) -> None:
    err.print(f"[bold red]quantpipe: error:[/] {escape(str(exc))}", markup=True, highlight=False)
    sys.exit(exc.exit_code)


STATUS_FACTS = "quantpipe.status"  # click context meta key: what a command adds to the --status-file record
ERROR_EVENT_SENT = "quantpipe.error_event_sent"  # the command already ended its --json stream with an error event


def _status_facts(**facts) -> None:
    click.get_current_context().meta.setdefault(STATUS_FACTS, {}).update(facts)


def _write_status(path: Path | None, command: str, code: int, error: BaseException | None, **facts) -> None:
    """The exit code and error where a scheduler reads them: `make` turns every failure into its own exit 2."""
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(path), {"command": command, "exit_code": code, "ok": code == 0,
                                       "error": runner.one_line(error) if error else None, **facts})


def _configure_logging(verbose: int) -> None:
    """Our warnings always show, other libraries' errors only (all of it at -vv): quiet on success. Off a
    terminal every record is one line."""
    ours = (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    theirs = logging.DEBUG if verbose >= 2 else logging.ERROR
    handler = RichHandler(console=err, show_path=False) if err.is_terminal else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s" if err.is_terminal
                                           else "quantpipe: %(levelname)s: %(message)s"))
    handler.addFilter(lambda r: r.levelno >= (ours if r.name.startswith("pipeline") else theirs))
    logging.basicConfig(level=logging.DEBUG, handlers=[handler], force=True)
    logging.captureWarnings(True)  # libraries' warnings.warn calls obey the same filter


def common(func: Callable) -> Callable:
    """Options every command takes, plus the error handling that gives stable exit codes."""

    @click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
                  help="Artifact store root (default: $QUANTPIPE_CACHE or ~/.cache/quantpipe).")
    @click.option("--remote", default=None, metavar="URL",
                  help="Shared store tier on an fsspec URL (file://, s3://, ...; default: $QUANTPIPE_REMOTE).")
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
    @click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
    @click.option("--status-file", type=click.Path(path_type=Path), default=None,
                  help="Also write the exit code, error and run record path here as JSON (for make and schedulers; "
                       "default: $QUANTPIPE_STATUS_FILE).")
    @functools.wraps(func)
    def wrapper(cache_dir: Path | None, remote: str | None, as_json: bool, verbose: int, status_file: Path | None,
                **kwargs):
        _configure_logging(verbose)
        status_file = status_file or os.environ.get("QUANTPIPE_STATUS_FILE") or None
        context = click.get_current_context()
        facts = context.meta.setdefault(STATUS_FACTS, {})
        try:
            store = ArtifactStore(cache_dir or ArtifactStore.default_root(),
                                  remote=remote or os.environ.get("QUANTPIPE_REMOTE") or None)
            func(store=store, as_json=as_json, **kwargs)
        except BaseException as exc:
            code = runner.exit_code(exc)
            _write_status(status_file, context.info_name, code, exc, **facts)
            if as_json and not context.meta.get(ERROR_EVENT_SENT):
                _event({"event": "error", "ok": False, "error": runner.one_line(exc), "exit_code": code})
            if isinstance(exc, QuantpipeError):
                _fail(exc)
            if isinstance(exc, KeyboardInterrupt):
                err.print("quantpipe: interrupted; nothing half-written was kept, rerun to resume")
                sys.exit(130)
            raise  # a bug: the traceback is what a report needs
        _write_status(status_file, context.info_name, 0, None, **facts)

    return wrapper


recipe_argument = click.argument("recipe", required=False)
set_option = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                          help="Override a recipe field, e.g. --set calibration.samples=64 (repeatable).")
until_option = click.option("--until", type=click.Choice(NAMES), help="Stop after this stage.")
force_option = click.option("--force", multiple=True, type=click.Choice([*NAMES]),
                            help="Rebuild this stage and everything after it (repeatable).")


class OneLineErrors(click.Group):
    """Usage errors (an unknown option or stage name) as one line with exit code 2, like every other bad input."""

    def main(self, *args, **kwargs):
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.UsageError as exc:
            _fail(BadInput(f"{exc.format_message()} (see quantpipe {exc.ctx.info_name if exc.ctx else ''} --help)"))
        except click.exceptions.Abort:
            sys.exit(130)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="quantpipe")
def main() -> None:
    """quantpipe: Hugging Face LLM -> calibrated, quantized, exported, built and verified TensorRT artifacts.

    RECIPE is a preset name (see `quantpipe targets` and pipeline/recipes/) or a YAML file; default: the
    `default` preset (bundled SmolLM2-135M-Instruct, FP8, Ada).
    Exit codes: 0 ok, 1 bug, 2 bad input, 3 unsupported on the target GPU, 4 host lacks what a stage needs,
    5 verification below threshold.
    """


class ConsoleReporter(runner.Reporter):
    """How a run shows itself: progress bars on an interactive terminal; off a terminal (make, cron) one line per
    stage start and end on stderr; with `events`, JSON lines on stdout. `-q` silences all but errors."""

    def __init__(self, progress: bool, events: bool = False, lines: bool = False, recipe: str = "") -> None:
        self.events, self.lines, self.recipe = events, lines, recipe
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(), console=err,
                                 transient=True, disable=not progress)
        self.task = None

    def stage_started(self, step: runner.Step) -> None:
        if not step.hit:
            self.task = self.progress.add_task(f"{step.stage.name}", total=None)
            if self.lines:
                err.print(f"quantpipe: {self.recipe}: {step.stage.name}: running ({'; '.join(step.reasons)})")
        if self.events:
            _event({"event": "stage_start", "recipe": self.recipe, "stage": step.stage.name, "key": step.key,
                    "status": "hit" if step.hit else "miss", "reasons": step.reasons})

    def stage_finished(self, outcome: runner.Outcome) -> None:
        if self.events:
            _event({"event": "stage_end", "recipe": self.recipe, **outcome.to_json()})
        if self.lines and outcome.status != "hit":
            peak = outcome.artifact.manifest.get("peak_rss_bytes")
            err.print(f"quantpipe: {self.recipe}: {outcome.stage}: {outcome.status} in {outcome.seconds:.1f} s, "
                      f"{human_bytes(outcome.artifact.size)}{f', peak RSS {human_bytes(peak)}' if peak else ''}: "
                      f"{by_name(outcome.stage).summary(outcome.artifact.facts)}")
        if self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None

    def stage_progress(self, stage: str, event: dict) -> None:
        if self.events:
            _event({"event": "stage_progress", "recipe": self.recipe, "stage": stage, **event})
        per_layer = "layer" in event  # on a terminal the bar shows those
        if "message" in event and (self.lines or (not per_layer and not self.progress.disable)):
            err.print(f"quantpipe: {self.recipe}: {stage}: {event['message']}")

    def track(self, items: Iterable, total: int | None = None, description: str = "") -> Iterable:
        """Items with a bar of their own, removed once they are done: a finished phase leaves no row behind."""
        if total is None and hasattr(items, "__len__"):
            total = len(items)
        task = self.progress.add_task(f"  {description}", total=total)
        for item in items:
            yield item
            self.progress.advance(task)
        self.progress.remove_task(task)


def _summary_table(outcomes: list[runner.Outcome], seconds: float) -> Table:
    table = Table(title=f"quantpipe run ({seconds:.1f} s)", title_justify="left")
    for column in ("stage", "result", "key", "time", "size", "peak RSS", "detail"):
        table.add_column(column, justify="right" if column in ("time", "size", "peak RSS") else "left")
    for o in outcomes:
        style = {"hit": "green", "built": "cyan", "shared": "cyan"}[o.status]
        peak = o.artifact.manifest.get("peak_rss_bytes")  # measured when the artifact was built
        table.add_row(o.stage, f"[{style}]{o.status}[/]", o.key[:12], f"{o.seconds:.1f} s",
                      human_bytes(o.artifact.size), human_bytes(peak) if peak else "-",
                      by_name(o.stage).summary(o.artifact.facts))
    return table


@main.command()
@recipe_argument
@set_option
@until_option
@force_option
@click.option("-q", "--quiet", is_flag=True, help="Print nothing on success.")
@click.option("--engines-dir", type=click.Path(path_type=Path), default=None,
              help="Where complete, verified runs are published (default: $QUANTPIPE_ENGINES or ./engines).")
@common
def run(store: ArtifactStore, as_json: bool, recipe: str | None, overrides: tuple[str, ...], until: str | None,
        force: tuple[str, ...], quiet: bool, engines_dir: Path | None) -> None:
    """Run the pipeline; stages whose artifact is cached are skipped."""
    parsed = load_recipe(recipe, list(overrides))
    _status_facts(recipe=parsed.name, run_record=str(runs.latest_path(store, parsed.name)))
    started = time.time()
    reporter = ConsoleReporter(progress=err.is_terminal and not as_json and not quiet, events=as_json,
                               lines=not err.is_terminal and not as_json and not quiet, recipe=parsed.name)
    try:
        with reporter.progress:
            result = runner.run(parsed, store, until=until, force=force, reporter=reporter,
                                engines_dir=engines_dir or default_engines_dir())
    except BaseException as exc:
        _end_run_events(as_json, {"ok": False, "recipe": parsed.name, "seconds": round(time.time() - started, 3)},
                        exc)
        raise
    seconds = time.time() - started
    _status_facts(run_record=str(result.record), published=str(result.published) if result.published else None)
    failure = VerificationFailed(result.failure) if result.failure else None
    summary = {"ok": failure is None, "recipe": parsed.name, "seconds": round(seconds, 3), "cache": str(store.root),
               "published": str(result.published) if result.published else None, "record": str(result.record),
               "stages": [o.to_json() for o in result.outcomes]}
    _end_run_events(as_json, summary, failure)
    if not as_json and (not quiet or failure):
        out.print(_summary_table(result.outcomes, seconds))
        if result.published:
            out.print(f"published {result.published}")
    if failure:
        raise failure


def _end_run_events(as_json: bool, summary: dict, error: BaseException | None) -> None:
    """End the --json stream the same way whatever happened: an error event when the run failed, then run_end."""
    if not as_json:
        return
    if error is not None:
        code, line = runner.exit_code(error), runner.one_line(error)
        _event({"event": "error", "ok": False, "error": line, "exit_code": code})
        summary = {**summary, "ok": False, "error": line, "exit_code": code}
        click.get_current_context().meta[ERROR_EVENT_SENT] = True
    _event({"event": "run_end", **summary})


@main.command()
@recipe_argument
@set_option
@until_option
@force_option
@common
def plan(store: ArtifactStore, as_json: bool, recipe: str | None, overrides: tuple[str, ...], until: str | None,
         force: tuple[str, ...]) -> None:
    """Show what `run` would do: each stage as hit or miss, and why it misses."""
    parsed = load_recipe(recipe, list(overrides))
    steps = runner.plan(parsed, store, until=until, force=force)
    rows = [{"stage": s.stage.name, "status": "hit" if s.hit else "miss", "key": s.key, "reasons": s.reasons}
            for s in steps]

    def render() -> None:
        table = Table(title=f"plan for {parsed.name} (cache {store.root})", title_justify="left")
        for column in ("stage", "status", "key", "why"):
            table.add_column(column)
        for row in rows:
            status = "[green]hit[/]" if row["status"] == "hit" else "[yellow]miss[/]"
            table.add_row(row["stage"], status, row["key"][:12], "; ".join(row["reasons"]))
        out.print(table)

    _emit(as_json, {"recipe": parsed.name, "stages": rows}, render)


@main.command()
@common
def status(store: ArtifactStore, as_json: bool) -> None:
    """The cache: where it is, what it holds, and the last run of each recipe, failed runs with their reason."""
    artifacts = list(store.artifacts())
    last_runs = [{"recipe": r["recipe"]["name"], "started": r["started"], "seconds": r["seconds"],
                  "ok": r.get("ok", True), "exit_code": r.get("exit_code", 0), "error": r.get("error"),
                  "failed_stage": r.get("failed_stage"),
                  "stages": {o["stage"]: o["status"] for o in r.get("outcomes", [])}}
                 for r in runs.latest_records(store) if "recipe" in r]  # matrix summaries have cells instead
    data = {"cache": str(store.root), "artifacts": len(artifacts), "bytes": sum(a.size for a in artifacts),
            "stale_temporaries": len(store.stale_temporaries()) if store.root.is_dir() else 0,
            "last_runs": last_runs}

    def render() -> None:
        out.print(f"cache {data['cache']}: {data['artifacts']} artifacts, {human_bytes(data['bytes'])}")
        table = Table(title="last runs", title_justify="left")
        for column in ("recipe", "started", "time", "result", "stages"):
            table.add_column(column)
        for r in last_runs:
            result = "[green]ok[/]" if r["ok"] else (f"[red]exit {r['exit_code']}[/] "
                                                      f"{r['failed_stage'] or 'before any stage'}: {r['error']}")
            table.add_row(r["recipe"], r["started"], f"{r['seconds']:.1f} s", result,
                          " ".join(f"{k}:{v}" for k, v in r["stages"].items()))
        out.print(table)

    _emit(as_json, data, render)


@main.command(name="ls")
@click.option("--stage", type=click.Choice(NAMES), help="Only this stage's artifacts.")
@common
def ls_command(store: ArtifactStore, as_json: bool, stage: str | None) -> None:
    """List the artifacts in the store."""
    rows = [{"stage": a.stage, "key": a.key, "bytes": a.size, "created": a.manifest.get("created"),
             "path": str(a.path), "intact": bool(a.manifest)}
            for a in store.artifacts(stage)]

    def render() -> None:
        table = Table(title=f"artifacts in {store.root}", title_justify="left")
        for column in ("stage", "key", "size", "created"):
            table.add_column(column)
        for r in rows:
            table.add_row(r["stage"], r["key"][:12], human_bytes(r["bytes"]), r["created"] or "[red]damaged[/]")
        out.print(table)

    _emit(as_json, rows, render)


@main.command(name="gc")
@click.option("--older-than", help="Remove artifacts unused for this long (e.g. 7d, 12h).")
@click.option("--max-size", help="Then remove least recently used artifacts until the store fits (e.g. 20G).")
@click.option("--keep-published/--no-keep-published", default=True, show_default=True,
              help="Keep every artifact a build.json under --engines-dir references (and what it was built from).")
@click.option("--engines-dir", type=click.Path(path_type=Path), default=None,
              help="The published artifacts to keep (default: $QUANTPIPE_ENGINES or ./engines).")
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
@common
def gc_command(store: ArtifactStore, as_json: bool, older_than: str | None, max_size: str | None,
               keep_published: bool, engines_dir: Path, dry_run: bool) -> None:
    """Trim the local store by age or size, by default never touching what engines/ publishes."""
    if older_than is None and max_size is None:
        raise BadInput("gc needs --older-than (e.g. 7d) or --max-size (e.g. 20G)")
    keep = published_keys(engines_dir or default_engines_dir()) if keep_published else set()
    removed = gc(store, older_than_s=parse_age(older_than) if older_than else None,
                 max_bytes=parse_size(max_size) if max_size else None, keep=keep, dry_run=dry_run)
    rows = [{"stage": a.stage, "key": a.key, "bytes": a.size} for a in removed]
    verb = "would remove" if dry_run else "removed"
    _emit(as_json, {"dry_run": dry_run, "removed": rows},
          lambda: out.print(f"{verb} {len(rows)} artifacts, {human_bytes(sum(r['bytes'] for r in rows))}"))


@main.command()
@common
def doctor(store: ArtifactStore, as_json: bool) -> None:
    """This host: Python, library versions, GPUs and their architecture."""
    data = {**host.describe(), "cache": str(store.root), "versions": host.versions(LIBRARIES),
            "gpus": [{"name": g.name, "sm": f"sm_{g.sm}", "memory_mib": g.memory_mib} for g in host.gpus()]}

    def render() -> None:
        out.print(f"python {data['python']} on {data['platform']}; cache {data['cache']}")
        for lib, ver in data["versions"].items():
            out.print(f"  {lib:<16} {ver or '[dim]not installed[/]'}")
        gpus = ", ".join(f"{g['name']} ({g['sm']})" for g in data["gpus"]) or "none"
        out.print(f"GPUs: {gpus}")

    _emit(as_json, data, render)


@main.command(name="targets")
@common
def targets_command(store: ArtifactStore, as_json: bool) -> None:
    """The support matrix: what each GPU architecture runs natively, and the presets."""
    rows = targets.matrix()

    def render() -> None:
        table = Table(title="targets", title_justify="left")
        for column in ("sm", "family", "products", "formats", "kv cache", "build backends"):
            table.add_column(column)
        for r in rows:
            table.add_row(r["sm"], r["family"], r["products"], ", ".join(r["formats"]), ", ".join(r["kv_cache"]),
                          ", ".join(r["backends"]))
        out.print(table)
        out.print(f"presets: {', '.join(presets())}")

    _emit(as_json, {"targets": rows, "presets": presets()}, render)


@main.command(name="tune")
@recipe_argument
@set_option
@click.option("--max-ppl-ratio", type=float, required=True,
              help="Largest perplexity ratio against the unquantized model on the held-out text, e.g. 1.05.")
@click.option("--min-agreement", type=float, default=None,
              help="Smallest teacher-forced token agreement, e.g. 0.85 (default: no agreement bar).")
@click.option("--objective", type=click.Choice(["size", "bits"]), default="size", show_default=True,
              help="size: checkpoint bytes; bits: bits per weight outside the embeddings and lm_head.")
@click.option("--formats", default=None, metavar="LIST",
              help="Comma-separated single formats to try (default: every format the target runs).")
@click.option("--exclude-steps", default="8,32", show_default=True, metavar="COUNTS",
              help="How many of a failing format's most sensitive layers to leave unquantized, in turn; none: off.")
@click.option("--budgets", default="4.5,5,6,7", show_default=True, metavar="BITS",
              help="AutoQuantize effective bits (format auto over the formats it mixes), upwards until one passes; "
                   "none: off.")
@click.option("--out", "report_dir", type=click.Path(path_type=Path), default=None,
              help="Where report.md, plot.png and tune.json go (default: <engines>/<model>/tune-<recipe>).")
@click.option("--engines-dir", type=click.Path(path_type=Path), default=None,
              help="Where the chosen candidate is published (default: $QUANTPIPE_ENGINES or ./engines).")
@common
def tune_command(store: ArtifactStore, as_json: bool, recipe: str | None, overrides: tuple[str, ...],
                 max_ppl_ratio: float, min_agreement: float | None, objective: str, formats: str | None,
                 exclude_steps: str, budgets: str, report_dir: Path | None, engines_dir: Path | None) -> None:
    """The smallest artifact for RECIPE's target that meets the bar: every format the target runs, failing ones
    with their most sensitive layers unquantized, AutoQuantize budgets; each candidate an ordinary cached run.
    The winner is published with the search in its card. Exit code 5 when nothing meets the bar."""
    from pipeline import tune
    from pipeline.stages.load import resolve_source

    bar = tune.Bar(max_ppl_ratio, min_agreement)
    store.ensure_writable()
    def candidate_done(result: tune.Result) -> None:
        if not as_json:
            err.print(f"quantpipe: tune: {' | '.join(tune.cells(result))}", markup=False)

    result = tune.search(
        recipe, list(overrides), bar, store, objective=objective,
        formats=formats.split(",") if formats else None,
        exclude_steps=tune.parse_numbers(exclude_steps, "--exclude-steps"),
        budgets=tune.parse_numbers(budgets, "--budgets", float),
        reporter_for=lambda r: ConsoleReporter(progress=False, lines=not as_json, recipe=r.name),
        on_result=candidate_done)
    engines = engines_dir or default_engines_dir()
    folder = report_dir or engines / resolve_source(load_recipe(recipe, list(overrides))).name / \
        f"tune-{result.recipe}"
    tune.write_report(folder, result, shlex.join(["quantpipe", *sys.argv[1:]]))
    published = tune.publish_winner(result, recipe, list(overrides), store, engines) if result.chosen else None
    _status_facts(report=str(folder / tune.REPORT_MD), published=str(published) if published else None)

    def render() -> None:
        table = Table(title=f"quantpipe tune {result.recipe} for {result.target}: {bar.describe()} "
                            f"({folder / tune.REPORT_MD})", title_justify="left")
        for column in tune.COLUMNS:
            table.add_column(column)
        for r in result.results:
            table.add_row(*(escape(c) for c in tune.cells(r, result)))
        out.print(table)
        if published:
            out.print(f"published {published}")

    _emit(as_json, {**result.to_json(), "report": str(folder / tune.REPORT_MD),
                    "published": str(published) if published else None}, render)
    tune.fail_unless_chosen(result)


@main.command(name="report")
@click.argument("names", nargs=-1, metavar="RUNS")
@common
def report_command(store: ArtifactStore, as_json: bool, names: tuple[str, ...]) -> None:
    """Verification results of several runs side by side. RUNS are recipe names or run record files
    (default: the latest run of every recipe in the cache)."""
    records = [_read_record(Path(r) if Path(r).is_file() else runs.latest_path(store, r)) for r in names]
    records = records or runs.latest_records(store)
    rows = []
    for record in records:
        verify = next((o["metadata"] for o in record.get("outcomes", []) if o["stage"] == "verify"), None)
        if verify is None:
            continue
        rows.append({"recipe": record["recipe"]["name"], "target": record["recipe"]["target"]["gpu"],
                     "format": verify["format"], "passed": verify["passed"],
                     "metrics": verify.get("metrics", {}),  # by name; verify before version 6 kept none
                     "size_vs_fp16": {f: round(b / verify["fp16_bytes"], 3) for f, b in verify["sizes"].items()},
                     "started": record["started"]})

    def render() -> None:
        table = Table(title="verification reports", title_justify="left")
        names = list(dict.fromkeys(name for r in rows for name in r["metrics"]))  # every metric any row has
        for column in ("recipe", "format", "target", "result", *names, "size/fp16"):
            table.add_column(column)
        for r in rows:
            table.add_row(r["recipe"], r["format"], r["target"], "pass" if r["passed"] else "[red]FAIL[/]",
                          *(f"{r['metrics'][n]:.4g}" if n in r["metrics"] else "" for n in names),
                          " ".join(f"{k} {v:.2f}" for k, v in r["size_vs_fp16"].items()))
        out.print(table)

    _emit(as_json, rows, render)


def _read_record(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise BadInput(f"no run record {path}; run the recipe first or pass a runs/*.json file") from None


@main.command(name="matrix")
@click.argument("matrix_file", type=click.Path(path_type=Path))
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: cells in order in this process; ray: each distinct stage as a Ray task.")
@click.option("--address", default=None, help="Ray cluster address (default: start a private local cluster).")
@click.option("--plan", "plan_only", is_flag=True, help="Only show each cell's stages as hit or miss.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing on success.")
@click.option("--engines-dir", type=click.Path(path_type=Path), default=None,
              help="Where complete, verified cells are published (default: $QUANTPIPE_ENGINES or ./engines).")
@common
def matrix_command(store: ArtifactStore, as_json: bool, matrix_file: Path, executor: str, address: str | None,
                   plan_only: bool, quiet: bool, engines_dir: Path | None) -> None:
    """Build every cell of MATRIX_FILE (a base recipe times models, formats, targets and variants); stages the
    cells share are built once. Exit code: 0 when every cell passed, else the first failed cell's code."""
    from pipeline import matrix

    spec = matrix.load_matrix(matrix_file)
    cells = matrix.expand(spec)
    if plan_only:
        _matrix_plan(matrix.plan(cells, store), as_json)
        return
    store.ensure_writable()
    engines = engines_dir or default_engines_dir()
    emit = _event if as_json else (lambda data: None)
    started = time.time()
    if executor == "ray":
        from pipeline.ray_executor import run_ray

        results = run_ray(cells, spec, store, engines, emit, address)
    else:
        reporters = {c.name: ConsoleReporter(progress=False, events=as_json, lines=not as_json and not quiet
                                             and not err.is_terminal, recipe=c.name) for c in cells}
        results = matrix.run_local(cells, store, engines, emit, reporter_for=lambda c: reporters[c.name])
    summary_file = matrix.write_summary(store, spec, executor, results, started)
    _status_facts(matrix=spec.name, run_record=str(summary_file))
    failed = [r for r in results if not r.ok]
    if as_json:
        _event({"event": "matrix_end", "ok": not failed, "matrix": spec.name, "executor": executor,
                "seconds": round(time.time() - started, 3), "summary": str(summary_file),
                "cells": [{"cell": r.cell.name, "ok": r.ok, "exit_code": r.exit_code} for r in results]})
    elif not quiet or failed:
        out.print(_matrix_table(results, time.time() - started, executor))
    if failed:
        raise CellsFailed(f"{len(failed)} of {len(results)} cells failed; first: {failed[0].cell.name}: "
                          f"{failed[0].error} (summary: {summary_file})", failed[0].exit_code)


def _matrix_table(results: list, seconds: float, executor: str) -> Table:
    table = Table(title=f"quantpipe matrix ({executor}, {seconds:.1f} s)", title_justify="left")
    for column in ("cell", "result", "stages", "detail"):
        table.add_column(column)
    for r in results:
        stages = " ".join(f"{s['stage']}:{s['status']}" for s in r.stages)
        verify = next((s for s in r.stages if s["stage"] == "verify"), None)
        detail = by_name("verify").summary(verify["metadata"]) if verify else (r.error or "")
        table.add_row(r.cell.name, "[green]ok[/]" if r.ok else f"[red]exit {r.exit_code}[/]", stages, detail)
    return table


def _matrix_plan(plans: dict[str, list[runner.Step]], as_json: bool) -> None:
    rows = [{"cell": cell, "stages": [{"stage": s.stage.name, "key": s.key, "status": "hit" if s.hit else "miss"}
                                      for s in steps]} for cell, steps in plans.items()]
    distinct = {(s["stage"], s["key"]) for row in rows for s in row["stages"] if s["status"] == "miss"}

    def render() -> None:
        table = Table(title=f"matrix plan: {len(rows)} cells, {len(distinct)} distinct stages to build",
                      title_justify="left")
        table.add_column("cell")
        table.add_column("stages (key prefix)")
        for row in rows:
            table.add_row(row["cell"], " ".join(f"{s['stage']}:{'[green]hit[/]' if s['status'] == 'hit' else 'miss'}"
                                                f"({s['key'][:8]})" for s in row["stages"]))
        out.print(table)

    _emit(as_json, {"cells": rows, "to_build": len(distinct)}, render)


def _republish_hint(folder: Path) -> str:
    from pipeline.publish import provenance

    recipe = provenance(folder).get("recipe", {}).get("name", "<its recipe>")
    return f"remove {folder} and run recipe {recipe} again"


@main.command(name="verify-published")
@click.argument("folder", type=click.Path(path_type=Path))
@common
def verify_published_command(store: ArtifactStore, as_json: bool, folder: Path) -> None:
    """Check every file of a published FOLDER against the size and sha256 its build.json records.
    Exit code 0 when all match, 5 when any differs (one line each)."""
    from pipeline.publish import check_published

    problems = check_published(folder)
    _emit(as_json, {"folder": str(folder), "ok": not problems, "problems": problems},
          lambda: out.print("\n".join(problems) or f"{folder}: every file matches its build.json", markup=False))
    if problems:
        raise VerificationFailed(f"{len(problems)} files of the published folder differ from its build.json; "
                                 f"to republish, {_republish_hint(folder)}")


@main.command(name="fsck")
@click.option("--repair", is_flag=True, help="Discard damaged cache artifacts (the next run rebuilds them).")
@click.option("--engines-dir", type=click.Path(path_type=Path), default=None,
              help="The published folders to check (default: $QUANTPIPE_ENGINES or ./engines).")
@common
def fsck_command(store: ArtifactStore, as_json: bool, repair: bool, engines_dir: Path | None) -> None:
    """Re-hash every cache artifact against its manifest and every published folder against its build.json.
    Exit code 0 when all is intact, 5 when anything differs (one line each)."""
    from pipeline.publish import check_published, published_folders

    damaged = store.fsck(repair=repair)
    folders = published_folders(engines_dir or default_engines_dir())
    published = {str(folder): problems for folder in folders if (problems := check_published(folder))}
    rows = [{"stage": a.stage, "key": a.key, "path": str(a.path), "problem": problem, "discarded": repair}
            for a, problem in damaged]
    lines = [f"cache {r['stage']}/{r['key'][:12]}: {r['problem']}{' (discarded)' if repair else ''}" for r in rows]
    lines += [line for problems in published.values() for line in problems]
    lines += [f"to republish, {_republish_hint(Path(folder))}" for folder in published] if repair else []
    _emit(as_json, {"cache": str(store.root), "ok": not lines, "artifacts": rows, "published": published},
          lambda: out.print("\n".join(lines) or f"intact: cache {store.root} and {len(folders)} published folders",
                            markup=False))
    if lines:
        fixes = []
        if rows:
            fixes.append("the damaged artifacts were discarded: the next run rebuilds them" if repair
                         else "quantpipe fsck --repair discards the damaged artifacts (the next run rebuilds them)")
        if published:
            fixes.append("remove each damaged published folder and run its recipe again")
        raise VerificationFailed(f"{len(rows)} damaged cache artifacts, {len(published)} damaged published folders; "
                                 + "; ".join(fixes))


deployment_argument = click.argument("target", metavar="PATH_OR_RECIPE")
runtime_option = click.option("--runtime", type=click.Choice(["auto", *gen.RUNTIMES]), default="auto",
                              show_default=True,
                              help="auto: the best this host has (TensorRT-RTX engine on its RTX GPU, TensorRT-LLM, "
                                   "ONNX Runtime GenAI on CPU); pytorch: the fake-quantized model from the cache.")
max_new_tokens_option = click.option("--max-new-tokens", type=click.IntRange(1), default=64, show_default=True)


def _stream(conversation, ids: list[int], max_new_tokens: int, show: bool):
    """Print the answer as it is generated (unless `show` is off); return the finished Answer."""
    answer = []
    for piece in conversation.stream(ids, max_new_tokens, answer):
        if show:
            out.file.write(piece)
            out.file.flush()
    if show:
        out.file.write("\n")
        out.file.flush()
    return answer[0]


@main.command()
@deployment_argument
@set_option
@click.option("--prompt", required=True, help="The text to continue.")
@max_new_tokens_option
@runtime_option
@click.option("--compare", is_flag=True, help="Also print the unquantized model's answer (from the cache).")
@common
def generate(store: ArtifactStore, as_json: bool, target: str, overrides: tuple[str, ...], prompt: str,
             max_new_tokens: int, runtime: str, compare: bool) -> None:
    """Continue PROMPT with a published folder (engines/<model>/<format>-<target>) or a recipe whose run is cached,
    streaming tokens; --json prints text, token count and tokens per second."""
    deployment = gen.resolve(target, list(overrides), store)
    name, generator = gen.pick(deployment, runtime)
    conversation = gen.Conversation(deployment, generator)
    ids = conversation.prompt_ids(prompt)
    if compare and not as_json:
        out.print(f"[bold]quantized ({name}):[/]", end=" ")
    answer = _stream(conversation, ids, max_new_tokens, show=not as_json)
    result = {"artifact": deployment.name, "runtime": name, "prompt": prompt, **answer.to_json()}
    if compare:
        reference = gen.Conversation(deployment, gen.unquantized(deployment))
        if not as_json:
            out.print("[bold]unquantized (pytorch):[/]", end=" ")
        result["compare"] = {"runtime": "pytorch", **_stream(reference, ids, max_new_tokens, not as_json).to_json()}
    _emit(as_json, result, lambda: err.print(f"[dim]{name}: {answer.tokens} tokens, "
                                             f"{result['tokens_per_second']} tokens/s[/]"))


@main.command()
@deployment_argument
@set_option
@click.option("--system", default=None, help="A system message to start the conversation with.")
@max_new_tokens_option
@runtime_option
@common
def chat(store: ArtifactStore, as_json: bool, target: str, overrides: tuple[str, ...], system: str | None,
         max_new_tokens: int, runtime: str) -> None:
    """Talk to a published folder or a cached recipe's build with the model's chat template, one line per turn;
    an empty line or end of input ends it. --json prints one JSON object per answer."""
    deployment = gen.resolve(target, list(overrides), store)
    name, generator = gen.pick(deployment, runtime)
    conversation = gen.Conversation(deployment, generator)
    messages = [{"role": "system", "content": system}] if system else []
    if not as_json:
        err.print(f"[dim]{deployment.name} on {name}; an empty line ends the chat[/]")
    while line := _read_turn():
        messages.append({"role": "user", "content": line})
        answer = _stream(conversation, conversation.chat_ids(messages), max_new_tokens, show=not as_json)
        messages.append({"role": "assistant", "content": answer.text})
        if as_json:
            _event({"runtime": name, "user": line, **answer.to_json()})


def _read_turn() -> str:
    try:
        return click.prompt("", prompt_suffix="> ", default="", show_default=False, err=True).strip()
    except click.exceptions.Abort:  # end of input
        return ""


@main.command(name="compare")
@click.argument("recipes", nargs=-1)
@set_option
@click.option("--baselines", default=None, metavar="NAMES",
              help="Comma-separated: gptq, nf4, llm-int8, ort-int8, ort-int4 (default: the recipe's compare.baselines).")
@click.option("--out", "report_dir", type=click.Path(path_type=Path), default=None,
              help="Where report.md, plot.png and compare.json go (default: <engines>/<model>/compare-<recipe>).")
@common
def compare_command(store: ArtifactStore, as_json: bool, recipes: tuple[str, ...], overrides: tuple[str, ...],
                    baselines: str | None, report_dir: Path | None) -> None:
    """RECIPES (default: the default preset) side by side with other libraries' quantization of the same model:
    perplexity ratio, agreement, size, time to quantize and CPU speed, on the same held-out tokens."""
    from pipeline.compare import report, run
    from pipeline.compare.spec import CompareSpec, check_names
    from pipeline.stages.load import resolve_source

    parsed = [load_recipe(r, list(overrides)) for r in recipes or (None,)]
    # A recipe's `compare:` section (compare.CompareSpec) gives the default baselines.
    spec = getattr(parsed[0], "compare", None) or CompareSpec()
    names = check_names(baselines.split(",")) if baselines is not None else spec.baselines
    # No per-stage lines: ConsoleReporter describes the pipeline's own stages only (rows are logged at -v).
    reporter = ConsoleReporter(progress=err.is_terminal and not as_json, recipe="compare")
    with reporter.progress:
        rows = [r.to_json() for r in run.compare(parsed, names, store, reporter)]
    folder = report_dir or default_engines_dir() / resolve_source(parsed[0]).name / f"compare-{parsed[0].name}"
    command = shlex.join(["quantpipe", "compare", *recipes, *(f"--set={o}" for o in overrides),
                          f"--baselines={','.join(names)}"])
    report.write(folder, rows, command)
    _status_facts(report=str(folder / report.REPORT_MD))

    def render() -> None:
        table = Table(title=f"quantpipe compare ({folder / report.REPORT_MD})", title_justify="left")
        for column in report.COLUMNS:
            table.add_column(column)
        for row in rows:
            table.add_row(*report.cells(row))
        out.print(table)

    _emit(as_json, {"report": str(folder / report.REPORT_MD), "rows": rows}, render)

"""Peak RSS of each sub-step of the ONNX export and of the TensorRT-RTX engine build, in one process, from a cache
whose quantize (for export) or export (for build) artifact is already there (e.g. made by bench/memory.py).

    python bench/substeps.py export --cache-dir DIR [--format fp8]
    python bench/substeps.py build --cache-dir DIR [--format fp8]

A thread samples VmRSS from /proc every 5 ms; each sub-step is one function of the exporter or builder wrapped so
that its start and end are marked. Prints one line per sub-step: RSS before, peak inside, RSS after (MiB). Sub-steps
nest (a peak inside an emitter is also inside `emitters`).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import sys
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))


def rss() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


class Sampler:
    """The peak RSS since the last `mark`, sampled by a thread."""

    def __init__(self, interval: float = 0.005) -> None:
        self.peak, self.rows, self.interval = rss(), [], interval
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, rss())
            time.sleep(self.interval)

    @contextlib.contextmanager
    def step(self, name: str):
        before, outer, self.peak = rss(), self.peak, rss()
        started = time.perf_counter()
        try:
            yield
        finally:
            inner = max(self.peak, rss())
            self.rows.append((name, before, inner, rss(), time.perf_counter() - started))
            self.peak = max(outer, inner)

    def wrap(self, owner, attribute: str, name: str | None = None) -> None:
        original = getattr(owner, attribute)

        @functools.wraps(original)
        def wrapped(*args, **kwargs):
            with self.step(name or attribute):
                return original(*args, **kwargs)

        setattr(owner, attribute, wrapped)

    def report(self) -> str:
        mib = 1 << 20
        lines = [f"{'sub-step':<40} {'before':>8} {'peak':>8} {'after':>8} {'peak-before':>11} {'s':>7}"]
        for name, before, peak, after, seconds in self.rows:
            lines.append(f"{name:<40} {before / mib:8.0f} {peak / mib:8.0f} {after / mib:8.0f} "
                         f"{(peak - before) / mib:11.0f} {seconds:7.1f}")
        return "\n".join(lines)


def artifact(cache: Path, stage: str) -> Path:
    """The newest committed artifact of `stage` in the cache."""
    found = [p for p in (cache / stage).iterdir() if (p / "manifest.json").is_file()]
    if not found:
        raise SystemExit(f"no {stage} artifact in {cache / stage}")
    return max(found, key=lambda p: (p / "manifest.json").stat().st_mtime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("export", "build"))
    parser.add_argument("--cache-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("/tmp/quantpipe-substeps"))
    options = parser.parse_args()
    sampler = Sampler()
    import shutil

    import onnx
    import torch

    from pipeline import onnx_export, state
    from pipeline.stages import export as export_stage

    shutil.rmtree(options.out, ignore_errors=True)
    print(f"after imports: {rss() / (1 << 20):.0f} MiB")
    cache = options.cache_dir
    if options.what == "export":
        import modelopt.torch.quantization  # noqa: F401
        import onnx_graphsurgeon as gs
        from modelopt.onnx.export import FP8QuantExporter

        for owner, names in ((state, ["restore_model"]), (torch.onnx, ["export"]), (gs, ["import_onnx", "export_onnx"]),
                             (gs.Graph, ["fold_constants"]),
                             (FP8QuantExporter, ["compress_weights", "post_process"]),
                             (onnx_export, [n for n in dir(onnx_export) if n.startswith(("_half", "_fp8", "_int8",
                                                                                          "_float", "_static",
                                                                                          "_stream", "_write"))]),
                             (onnx, ["load", "save_model", "load_model"])):
            for name in names:
                sampler.wrap(owner, name, f"{owner.__name__.rsplit('.', 1)[-1]}.{name}")
        for kind, emitter in list(onnx_export.EMITTERS.items()):
            wrapped = type(sampler)  # noqa: F841
            original = emitter.process

            def process(graph, model, _original=original, _kind=kind):
                with sampler.step(f"emit {_kind}"):
                    return _original(graph, model)

            onnx_export.EMITTERS[kind] = type(emitter)(emitter.detect, process, emitter.ir_version)
        inputs = {stage: artifact(cache, stage) for stage in ("load", "calibrate", "quantize")}
        with sampler.step("export._export_onnx (all)"):
            export_stage._export_onnx(inputs, options.out)
    else:
        import tensorrt_rtx as trt

        from pipeline.backends import tensorrt_rtx as rtx
        from pipeline.recipe import Recipe  # noqa: F401

        for owner, names in ((rtx, ["_quantize_layers"]), (trt.Builder, ["build_serialized_network"]),
                             (trt.OnnxParser, ["parse_from_file", "parse"])):
            for name in names:
                with contextlib.suppress(AttributeError, TypeError):
                    sampler.wrap(owner, name, f"{getattr(owner, '__name__', owner)}.{name}")
        from transformers import AutoConfig

        from pipeline.recipe import load_recipe

        recipe = load_recipe("fp8", ["target=ada", "build.backend=tensorrt-rtx"])
        config = AutoConfig.from_pretrained(artifact(cache, "load") / "model")
        graph = artifact(cache, "export") / "onnx" / "model.onnx"
        options.out.mkdir(parents=True, exist_ok=True)
        with sampler.step("compile_engine (all)"):
            if "engine_path" in inspect.signature(rtx.compile_engine).parameters:
                rtx.compile_engine(graph, config, recipe.build, [89], options.out / "model.engine")
            else:  # before the engine was written by compile_engine
                engine, _ = rtx.compile_engine(graph, config, recipe.build, [89])
                (options.out / "model.engine").write_bytes(engine)
                del engine
    print(sampler.report())
    print(f"process peak (VmHWM): {next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]} kB")


if __name__ == "__main__":
    main()

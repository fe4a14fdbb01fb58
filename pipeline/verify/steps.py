"""Verify's sub-steps measured while they run: wall seconds and resident memory (VmRSS sampled by a thread, since
tracemalloc does not see torch's allocations) before, at the peak of and after each step, kept in `steps.json` and sent
as progress events; and per-layer progress (elapsed, time left) for the steps that push windows through the model."""

from __future__ import annotations

import contextlib
import itertools
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

SAMPLE_SECONDS = 0.02
_RSS = re.compile(r"VmRSS:\s+(\d+) kB")


def rss() -> int:
    """This process's resident memory now, in bytes (0 where /proc is missing)."""
    try:
        return int(_RSS.search(Path("/proc/self/status").read_text()).group(1)) * 1024
    except (OSError, AttributeError):
        return 0


class Steps:
    """`with steps.step("perplexity, quantized"):` records the step's seconds and its RSS before, peak and after."""

    def __init__(self, report: Callable[[dict], None]) -> None:
        self.report = report
        self.rows: list[dict] = []
        self._peak = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True, name="verify-rss")
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            now = rss()
            with self._lock:
                self._peak = max(self._peak, now)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        from pipeline.host import release_memory

        release_memory()  # the last step's garbage is not this step's peak
        before = rss()
        with self._lock:
            self._peak = before
        started = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - started
            after = rss()
            with self._lock:
                peak = max(self._peak, after)
            row = {"step": name, "seconds": round(seconds, 2), "rss_before": before, "rss_peak": peak,
                   "rss_after": after}
            self.rows.append(row)
            self.report({"verify_step": row, "message": f"{name}: {seconds:.1f} s, peak RSS {peak / 2**20:.0f} MiB "
                                                        f"(+{(peak - before) / 2**20:.0f} MiB)"})

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def decoder_layers(model) -> list:
    """The model's repeated decoder blocks (transformers names them in `_no_split_modules`)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if m.__class__.__name__ in names]


@contextlib.contextmanager
def layer_progress(ctx, model, forwards: int, description: str) -> Iterator[None]:
    """Per-layer progress while `model` runs `forwards` forward passes (batches times passes per batch): a bar in
    layer forwards and an event per finished layer with elapsed seconds and an estimate of the time left, at most
    one every half second (and the last)."""
    layers = decoder_layers(model)
    total = len(layers) * forwards
    if not total:
        yield
        return
    ticks = iter(ctx.track(itertools.repeat(None, total), total=total, description=description))
    started, state = time.time(), {"done": 0, "sent": 0.0}

    def finished(*_) -> None:
        next(ticks, None)
        state["done"] += 1
        now = time.time()
        if now - state["sent"] < 0.5 and state["done"] < total:
            return
        state["sent"] = now
        elapsed = now - started
        remaining = elapsed / state["done"] * (total - state["done"])
        ctx.report({"step": description, "layer_forwards": state["done"], "total": total,
                    "elapsed_s": round(elapsed, 2), "remaining_s": round(remaining, 2),
                    "message": f"{description}: {state['done']}/{total} layer forwards, {elapsed:.0f} s elapsed, "
                               f"about {remaining:.0f} s left"})

    handles = [layer.register_forward_hook(finished) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for _ in ticks:  # ends the bar
            pass

"""AutoQuantize (format auto) against the single formats on the bundled model, and the cost of a second budget.

    python bench/autoquant.py [--budgets 7.0 5.0] [--formats nvfp4 fp8] [--samples 16] [--tokens 2048]
                              [--cache-dir DIR]

Every run goes through the ordinary cached pipeline (load, sensitivity, calibrate) for a Blackwell target;
perplexity is measured here on the same held-out tokens (windows of 512) for every run: the unquantized model and
each calibrated model with its weights folded. Size is bits per weight of the quantizable layers as AutoQuantize
counts them. The first budget pays for the sensitivity scores, every later one only for its own calibration.
Prints each row as it is measured (stderr), then a JSON document and a Markdown table.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import autoquant, data, evaluate, runner  # noqa: E402
from pipeline.recipe import (
    CANDIDATE_BITS,  # noqa: E402  (bits per weight of each single format)
    load_recipe,  # noqa: E402
)
from pipeline.store import ArtifactStore  # noqa: E402


def perplexity(load_path: Path, calibrate_path: Path | None, tokens: int) -> float:
    from pipeline.modeling import load_model
    from pipeline.quant import fold_weight_quantization, restore_calibration

    model, tokenizer = load_model(load_path / "model")
    if calibrate_path is not None:
        restore_calibration(model, calibrate_path)
        fold_weight_quantization(model)
    windows = evaluate.eval_windows(tokenizer, data.load_documents("eval"), tokens, 512)
    return evaluate.perplexity(model, windows)


def run(store: ArtifactStore, settings: list[str], tokens: int) -> dict:
    recipe = load_recipe("default", ["target.gpu=blackwell", "export.formats=[hf]", "build.backend=none",
                                     *settings])
    started = time.time()
    outcomes = {o.stage: o for o in runner.run(recipe, store, until="calibrate").outcomes}
    row = {"seconds": {s: round(o.seconds, 1) for s, o in outcomes.items() if o.status != "hit"},
           "wall_seconds": round(time.time() - started, 1),
           "hits": [s for s, o in outcomes.items() if o.status == "hit"],
           "ppl": perplexity(outcomes["load"].artifact.path, outcomes["calibrate"].artifact.path, tokens)}
    formats = outcomes["calibrate"].artifact.metadata.get("layer_formats")
    if formats:
        from safetensors import safe_open

        with safe_open(outcomes["load"].artifact.path / "model" / "model.safetensors", "pt") as weights:
            sizes = {n: weights.get_slice(f"{n}.weight").get_shape() for n in formats}
        row["effective_bits"] = round(autoquant.effective_bits(formats, {n: a * b for n, (a, b) in sizes.items()}), 3)
        row["layers"] = {fmt: sum(f == fmt for f in formats.values()) for fmt in sorted(set(formats.values()))}
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budgets", type=float, nargs="+", default=[7.0, 5.0])
    parser.add_argument("--formats", nargs="*", default=list(CANDIDATE_BITS))
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "quantpipe")
    args = parser.parse_args()
    store = ArtifactStore(args.cache_dir)
    calibration = [f"calibration.samples={args.samples}", "calibration.seq_len=256"]
    base = runner.run(load_recipe("default", []), store, until="load").outcomes[0].artifact.path
    ppl_fp32 = perplexity(base, None, args.tokens)
    runs = {fmt: [f"quantization.format={fmt}"] for fmt in args.formats}
    runs.update({f"auto@{bits}": ["quantization.format=auto", "quantization.auto.candidates=[nvfp4,fp8]",
                                  f"quantization.auto.effective_bits={bits}"] for bits in args.budgets})
    rows = {}
    for name, settings in runs.items():
        rows[name] = run(store, [*settings, *calibration], args.tokens)
        rows[name]["ppl_ratio"] = round(rows[name]["ppl"] / ppl_fp32, 4)
        print(json.dumps({name: rows[name]}), file=sys.stderr, flush=True)  # each row as soon as it is measured
    first, *later = [rows[f"auto@{b}"] for b in args.budgets]
    # what a budget costs: every stage it built (the first also builds the sensitivity scores)
    cost_ratios = [round(sum(r["seconds"].values()) / sum(first["seconds"].values()), 3) for r in later]
    print(json.dumps({"ppl_fp32": ppl_fp32, "rows": rows, "second_budget_cost_ratio": cost_ratios}, indent=2))
    print("\n| run | bits per weight | layers | ppl ratio | sensitivity s | calibrate s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, row in rows.items():
        layers = ", ".join(f"{n} {fmt}" for fmt, n in row.get("layers", {}).items())
        print(f"| {name} | {row.get('effective_bits', CANDIDATE_BITS.get(name))} | {layers} | {row['ppl_ratio']} | "
              f"{row['seconds'].get('sensitivity', 'hit' if name.startswith('auto') else '')} | "
              f"{row['seconds'].get('calibrate', 'hit')} |")


if __name__ == "__main__":
    main()

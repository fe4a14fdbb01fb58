"""AutoQuantize (format auto) against the single formats on the bundled model, and the cost of a second budget.

    python bench/autoquant.py [--budgets 5.0 6.0 7.0] [--samples 16] [--cache-dir DIR]

Every run goes through the ordinary cached pipeline (load, sensitivity, calibrate, quantize) for a Blackwell target;
perplexity is measured here on the same 2048 held-out tokens (4 x 512) for every run: the unquantized model and
each calibrated model with its weights folded. The first budget pays for the sensitivity scores, every later one
only for its own calibration and quantization. Prints a JSON document and a Markdown table.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import autoquant, data, evaluate, runner  # noqa: E402
from pipeline.recipe import load_recipe  # noqa: E402
from pipeline.store import ArtifactStore  # noqa: E402

SINGLE = {"nvfp4": 4.0, "fp8": 8.0}  # single formats and their bits per weight as AutoQuantize counts them


def perplexity(load_path: Path, calibrate_path: Path | None) -> float:
    from pipeline.modeling import load_model
    from pipeline.quant import fold_weight_quantization, restore_calibration

    model, tokenizer = load_model(load_path / "model")
    if calibrate_path is not None:
        restore_calibration(model, calibrate_path)
        fold_weight_quantization(model)
    windows = evaluate.eval_windows(tokenizer, data.load_documents("eval"), 2048, 512)
    return evaluate.perplexity(model, windows)


def run(store: ArtifactStore, settings: list[str]) -> dict:
    recipe = load_recipe("default", ["target.gpu=blackwell", "export.formats=[hf]", "build.backend=none",
                                     *settings])
    started = time.time()
    outcomes = {o.stage: o for o in runner.run(recipe, store, until="quantize").outcomes}
    row = {"seconds": {s: round(o.seconds, 1) for s, o in outcomes.items() if o.status != "hit"},
           "wall_seconds": round(time.time() - started, 1),
           "hits": [s for s, o in outcomes.items() if o.status == "hit"],
           "size_ratio_fp16": round(outcomes["quantize"].artifact.metadata["size_ratio_fp16"], 4),
           "ppl": perplexity(outcomes["load"].artifact.path, outcomes["calibrate"].artifact.path)}
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
    parser.add_argument("--budgets", type=float, nargs="+", default=[6.0, 5.0, 7.0])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "quantpipe")
    args = parser.parse_args()
    store = ArtifactStore(args.cache_dir)
    calibration = [f"calibration.samples={args.samples}", "calibration.seq_len=256"]
    base = runner.run(load_recipe("default", []), store, until="load").outcomes[0].artifact.path
    ppl_fp32 = perplexity(base, None)
    rows = {fmt: run(store, [f"quantization.format={fmt}", *calibration]) for fmt in SINGLE}
    for bits in args.budgets:
        rows[f"auto@{bits}"] = run(store, ["quantization.format=auto", "quantization.auto.candidates=[nvfp4,fp8]",
                                           f"quantization.auto.effective_bits={bits}", *calibration])
    for row in rows.values():
        row["ppl_ratio"] = round(row["ppl"] / ppl_fp32, 4)
    first, *later = [rows[f"auto@{b}"] for b in args.budgets]
    # what a budget costs: every stage it built (the first also builds the sensitivity scores)
    cost_ratios = [round(sum(r["seconds"].values()) / sum(first["seconds"].values()), 3) for r in later]
    print(json.dumps({"ppl_fp32": ppl_fp32, "rows": rows, "second_budget_cost_ratio": cost_ratios}, indent=2))
    print("\n| run | effective bits | layers | size / fp16 | ppl ratio | sensitivity s | calibrate s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, row in rows.items():
        layers = ", ".join(f"{n} {fmt}" for fmt, n in row.get("layers", {}).items())
        print(f"| {name} | {row.get('effective_bits', SINGLE.get(name))} | {layers} | {row['size_ratio_fp16']} | "
              f"{row['ppl_ratio']} | {row['seconds'].get('sensitivity', 'hit' if name.startswith('auto') else '')} | "
              f"{row['seconds'].get('calibrate', 'hit')} |")


if __name__ == "__main__":
    main()

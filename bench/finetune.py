"""Quantization-aware fine-tuning against the same recipe without it, side by side in one run on the bundled model:
perplexity ratio against the unquantized model on held-out text (verify's own measurement), steps and CPU time.

    python bench/finetune.py [--cells nvfp4:qad,int4_awq:qad] [--steps 40] [--lr 1e-5] [--samples 32] [--seq-len 256]
                             [--cache-dir DIR]

Prints a markdown table (the section of bench/RESULTS.md). Both sides share the load and calibrate artifacts; only
the HF checkpoint is exported and verified (no ONNX or engine), which is where the ratio is measured.
"""

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import runner
from pipeline.recipe import load_recipe
from pipeline.store import ArtifactStore


def measure(preset: str, overrides: list[str], store: ArtifactStore) -> dict:
    started = time.time()
    result = runner.run(load_recipe(preset, overrides), store)
    stages = {o.stage: o.artifact.metadata for o in result.outcomes}
    return {"verify": stages["verify"], "finetune": stages.get("finetune"), "seconds": time.time() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default="nvfp4:qad,int4_awq:qad", help="preset:method pairs")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--train-seq-len", type=int, default=256)
    parser.add_argument("--samples", type=int, default=32, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=256, help="calibration window length")
    parser.add_argument("--tokens", type=int, default=2048, help="held-out evaluation tokens")
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")  # fine-tuning steps, losses
    store = ArtifactStore(args.cache_dir or ArtifactStore.default_root())
    common = [f"calibration.samples={args.samples}", f"calibration.seq_len={args.seq_len}",
              f"verify.tokens={args.tokens}", "export.formats=[hf]", "build.backend=none"]
    print("| recipe | fine-tuning | ppl ratio | agreement | steps x tokens | fine-tune wall / CPU s | training loss |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for cell in args.cells.split(","):
        preset, method = cell.split(":")
        tuning = [f"finetune.method={method}", f"finetune.steps={args.steps}", f"finetune.lr={args.lr}",
                  f"finetune.batch_size={args.batch_size}", f"finetune.seq_len={args.train_seq_len}"]
        for label, extra in (("none", []), (f"{method}, lr {args.lr:g}", tuning)):
            row = measure(preset, [*common, f"name=bench-ft-{preset}-{'ft' if extra else 'base'}", *extra], store)
            verify, tuned = row["verify"], row["finetune"]
            steps = f"{tuned['steps']} x {args.batch_size * args.train_seq_len}" if tuned else "-"
            timing = f"{tuned['seconds']:.0f} / {tuned['cpu_seconds']:.0f}" if tuned else "-"
            loss = f"{tuned['first_loss']:.4f} -> {tuned['last_loss']:.4f}" if tuned else "-"
            print(f"| {preset} | {label} | {verify['ppl_ratio']:.3f} | {verify['agreement']:.0%} | {steps} | {timing} "
                  f"| {loss} |", flush=True)


if __name__ == "__main__":
    main()

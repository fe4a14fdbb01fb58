"""A model larger than this machine's memory: a synthetic Llama-architecture model of about 13B parameters (bf16
weights about 26 GB on a 24 GiB machine), quantized to FP8 (max calibration) and INT4-AWQ unified HF checkpoints on
the CPU, with weights spilled to disk (read in place from the model's own shards). Each stage runs in its own process;
peak RSS from the OS (GNU time). Goal (issue 13): every stage's peak below 0.5x the bf16 weights.

    python bench/bigmodel.py --root /work/bigmodel [--formats fp8,int4_awq] [--layers 40] [--set ...] [--keep]

The model is written under ROOT/llama-synthetic shard by shard (one ~1 GB shard in memory at a time), the cache under
ROOT/cache. Without --keep, ROOT is removed at the end (model, cache and checkpoints: tens of GB). The structure and
parity checks read the exported checkpoint one tensor at a time: every quantized linear has its low-precision weight
and scales, and a sample of layers dequantizes to within the format's tolerance of the original bf16 weights.
"""

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from results import append  # noqa: E402 (bench/, the script's own folder)

from bench.memory import peak_rss  # noqa: E402
from bench.scale import tokenizer, write_model  # noqa: E402
from pipeline.fmt import human_bytes  # noqa: E402

STAGES = ("load", "calibrate", "quantize", "export")
# Llama-2-13B's widths: 40 layers of 5120/13824 with a 32000-token vocabulary make 13.0B parameters.
WIDTHS = dict(hidden_size=5120, intermediate_size=13824, num_attention_heads=40, num_key_value_heads=40,
              max_position_embeddings=4096, tie_word_embeddings=False)
# CPU memory for weights capped well below the model: the rest is read from the model's shards when a layer runs.
SETTINGS = ("model.max_memory={cpu: 4GiB}", "calibration.samples=4", "calibration.seq_len=64",
            "calibration.batch_size=1", "export.formats=[hf]", "export.dtype=bfloat16", "build.backend=none",
            "export.max_shard_size=2GB")


def parity(checkpoint: Path, model: Path, fmt: str, sample: int = 3) -> dict:
    """Structure (every quantized linear has weight + scale, the index covers every shard) and parity (a sample of
    quantized weights dequantized against the original bf16 ones, one tensor at a time)."""
    from safetensors import safe_open

    from pipeline import formats
    from pipeline.modeling import weight_files

    out = weight_files(checkpoint)
    original = weight_files(model)
    config = json.loads((checkpoint / "hf_quant_config.json").read_text())["quantization"]
    scaled = sorted(n.removesuffix(".weight_scale") for n in out if n.endswith(".weight_scale"))
    linears = [n.removesuffix(".weight") for n in original if n.endswith("_proj.weight")]
    missing = sorted(set(linears) - set(scaled))
    errors = {}
    # o_proj and down_proj: their pre-quant scales (AWQ) stay in the checkpoint (q/k/v and gate/up fold theirs
    # into the layer norms), so dequantizing them gives back the original weight
    kept = [n for n in scaled if n.endswith(("o_proj", "down_proj"))]
    for name in [kept[0], kept[len(kept) // 2], kept[-1]][:sample]:
        tensors = {}
        for key in ("weight", "weight_scale", "weight_scale_2", "pre_quant_scale"):
            if f"{name}.{key}" in out:
                with safe_open(out[f"{name}.{key}"], "pt") as fh:
                    tensors[key] = fh.get_tensor(f"{name}.{key}")
        with safe_open(original[f"{name}.weight"], "pt") as fh:
            reference = fh.get_tensor(f"{name}.weight").float()
        restored = formats.get(fmt).weights.dequantize(tensors["weight"], tensors["weight_scale"],
                                                       tensors.get("weight_scale_2"), reference.shape[1]).float()
        if "pre_quant_scale" in tensors:
            restored = restored * tensors["pre_quant_scale"].float().reshape(1, -1)
        errors[name] = round(float((restored - reference).norm() / reference.norm()), 4)
    tolerance = formats.get(fmt).layer_tolerance
    return {"passed": not missing and len(scaled) == len(linears) and max(errors.values()) < tolerance,
            "tolerance": tolerance, "quant_algo": config.get("quant_algo"), "quantized_linears": len(scaled), "linears": len(linears),
            "missing": missing[:3], "relative_error": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="model, cache and checkpoints (tens of GB)")
    parser.add_argument("--formats", default="fp8,int4_awq")
    parser.add_argument("--layers", type=int, default=40)
    parser.add_argument("--set", dest="overrides", action="append", default=list(SETTINGS))
    parser.add_argument("--make-only", action="store_true", help="write the model and stop")
    parser.add_argument("--keep", action="store_true", help="keep ROOT (model and cache) afterwards")
    parser.add_argument("--results", type=Path, default=BENCH / "RESULTS.md")
    options = parser.parse_args()
    model = options.root / "llama-synthetic"
    if not (model / "model.safetensors.index.json").is_file():
        model.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        write_model(model, options.layers, tokenizer(model, 32000), "llama", WIDTHS, "LlamaForCausalLM")
        print(f"model written in {time.perf_counter() - started:.0f} s", flush=True)
    if options.make_only:
        return
    bf16 = json.loads((model / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    rows, checks = [], {}
    for fmt in options.formats.split(","):
        settings = [a for item in [f"model.source={model}", *options.overrides] for a in ("--set", item)]
        for stage in STAGES:
            command = [sys.executable, "-m", "pipeline", "run", fmt, *settings, "--until", stage, "--json",
                       "--cache-dir", str(options.root / "cache")]
            rss, seconds, stdout = peak_rss(command)
            events = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
            ended = next(e for e in events if e.get("event") == "stage_end" and e["stage"] == stage)
            rows.append((fmt, stage, ended["status"], round(seconds, 1), rss))
            print(rows[-1], flush=True)
            if stage == "quantize":
                checks[fmt] = parity(options.root / "cache" / stage / ended["key"] / "checkpoint", model, fmt)
                print(fmt, checks[fmt], flush=True)
    lines = [f"## A model larger than memory: 13B-parameter Llama, bf16 ({time.strftime('%Y-%m-%d')})", "",
             f"`python bench/bigmodel.py {' '.join(sys.argv[1:])}` (settings: {', '.join(options.overrides)}) on "
             f"{platform.platform()}, {os.cpu_count()} shared cores, "
             f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM. bf16 weights "
             f"{human_bytes(bf16)}. Each stage in its own process; peak RSS of the process (GNU time). "
             "Goal: < 0.5x the bf16 weights.", "",
             "| format | stage | status | seconds | peak RSS | / bf16 weights |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {fmt} | {stage} | {status} | {seconds} | {human_bytes(rss)} | {rss / bf16:.2f} |"
              for fmt, stage, status, seconds, rss in rows]
    lines += ["", *(f"- {fmt} checkpoint: {json.dumps(check)}" for fmt, check in checks.items())]
    append(options.results, "\n".join(lines) + "\n")
    if not options.keep:
        shutil.rmtree(options.root, ignore_errors=True)


if __name__ == "__main__":
    main()

"""A synthetic Qwen2-architecture model of about 1.8B parameters in bf16 through every stage up to verify, for fp8 and
int4_awq: peak RSS of each stage (its own process) against the bf16 weights. Goal (issue 13): <= 1.25x.

    python bench/scale.py [--formats fp8,int4_awq] [--layers 32] [--set calibration.samples=4 ...] [--cache-dir DIR]

The model is random-init from a transformers config and written shard by shard in bf16 (one shard's tensors in
memory at a time), so making it never holds the model, let alone in fp32. Its tokenizer is a byte-level BPE trained
on the calibration text. Appends a section to bench/RESULTS.md with the command that made it.
"""

import argparse
import json
import math
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from results import append  # noqa: E402 (bench/, the script's own folder)

from bench.memory import peak_rss  # noqa: E402
from pipeline.fmt import human_bytes  # noqa: E402

STAGES = ("load", "calibrate", "quantize", "export", "verify")
SHARD_BYTES = 1 << 30
# Qwen1.5-1.8B's widths; with the 10k-token vocabulary the calibration text trains, 35 layers make 1.8B parameters.
WIDTHS = dict(hidden_size=2048, intermediate_size=5504, num_attention_heads=16, num_key_value_heads=16,
              max_position_embeddings=4096, tie_word_embeddings=False)
# One batch at a time bounds the activations; few samples and tokens keep 2 CPU cores under about 10 minutes.
SMALL = ("calibration.samples=4", "calibration.seq_len=64", "calibration.batch_size=1", "verify.tokens=128",
         "verify.seq_len=64", "verify.max_new_tokens=2", "verify.prompts=['The capital of France is']",
         "export.formats=[hf]", "export.dtype=bfloat16", "build.backend=none", "export.max_shard_size=2GB")


def tokenizer(folder: Path, vocab: int) -> int:
    """A byte-level BPE trained on the calibration text; returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    text = (BENCH.parent / "calib_data" / "calib.txt").read_text()
    bpe.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(folder)
    return bpe.get_vocab_size()


def _random(name: str, shape, generator):
    import torch

    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=generator, dtype=torch.bfloat16) * 0.02)


def write_model(folder: Path, layers: int, vocab: int, model_type: str = "qwen2", widths: dict = WIDTHS,
                architecture: str = "Qwen2ForCausalLM") -> int:
    """Random bf16 weights, shard by shard, with model.safetensors.index.json; returns the parameter count."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=vocab, num_hidden_layers=layers, dtype="bfloat16", **widths)
    config.architectures = [architecture]  # as a saved model has it: ModelOpt's exporter reads it
    config.save_pretrained(folder)
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in AutoModelForCausalLM.from_config(config).state_dict().items()}
    groups: list[list[str]] = [[]]  # planned from the shapes alone: names per shard of about SHARD_BYTES
    filled = 0
    for name, shape in shapes.items():
        if filled >= SHARD_BYTES:
            groups.append([])
            filled = 0
        groups[-1].append(name)
        filled += math.prod(shape) * 2
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for number, names in enumerate(groups, 1):
        file = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        save_file({name: _random(name, shapes[name], generator) for name in names}, folder / file,
                  metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    total = sum(math.prod(s) for s in shapes.values()) * 2
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total // 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default="fp8,int4_awq")
    parser.add_argument("--layers", type=int, default=35)
    parser.add_argument("--set", dest="overrides", action="append", default=list(SMALL))
    parser.add_argument("--cache-dir", type=Path, help="default: a fresh temporary folder (model and cache)")
    parser.add_argument("--results", type=Path, default=BENCH / "RESULTS.md")
    options = parser.parse_args()
    root = options.cache_dir or Path(tempfile.mkdtemp(prefix="quantpipe-scale-"))
    model = root / "qwen2-synthetic"
    if not (model / "model.safetensors.index.json").is_file():
        model.mkdir(parents=True, exist_ok=True)
        write_model(model, options.layers, tokenizer(model, 32000))
        made = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(f"model written shard by shard, this process's peak RSS {human_bytes(made)}", flush=True)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    bf16 = index["metadata"]["total_size"]
    rows = []
    for fmt in options.formats.split(","):
        settings = [a for item in [f"model.source={model}", *options.overrides] for a in ("--set", item)]
        for stage in STAGES:
            command = [sys.executable, "-m", "pipeline", "run", fmt, *settings, "--until", stage, "--json",
                       "--cache-dir", str(root / "cache")]
            rss, seconds, stdout = peak_rss(command)
            ended = next(e for e in map(json.loads, (l for l in stdout.splitlines() if l.startswith("{")))
                         if e.get("event") == "stage_end" and e["stage"] == stage)
            rows.append((fmt, stage, ended["status"], round(seconds, 1), rss))
            print(rows[-1], flush=True)
    lines = [f"## A 1.8B-parameter bf16 model, sharded ({time.strftime('%Y-%m-%d')})", "",
             f"`python bench/scale.py {' '.join(sys.argv[1:])}` (settings: {', '.join(options.overrides)}) on "
             f"{platform.platform()}, {os.cpu_count()} shared cores. Synthetic Qwen2, {bf16 // 2 / 1e9:.2f}B "
             f"parameters, bf16 weights {human_bytes(bf16)} in {len(set(index['weight_map'].values()))} shards. "
             "Each stage in its own process (earlier stages are cache hits there); peak RSS of the whole process "
             "(GNU time). Goal: <= 1.25x the bf16 weights.", "",
             "| format | stage | status | seconds | peak RSS | / bf16 weights |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {fmt} | {stage} | {status} | {seconds} | {human_bytes(rss)} | {rss / bf16:.2f} |"
              for fmt, stage, status, seconds, rss in rows]
    append(options.results, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

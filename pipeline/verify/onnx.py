"""Checks of the exported ONNX decoder, and of any runtime that runs its graph (onnxruntime here, a TensorRT-RTX
engine in engine.py): batched full-window prefills against the calibrated model on the very windows of the PyTorch
perplexities, greedy steps through its KV cache against a full recompute, and the decode speed (timed on those
steps). verify runs the onnxruntime prefills inside its quantized perplexity pass (`open_onnx`, `fused`), so the
calibrated model's logits on the windows are computed once for both."""

from __future__ import annotations

from pathlib import Path

from pipeline.verify import evaluate
from pipeline.verify.checkpoint import layer_errors, over_tolerance

# The KV-cache check's greedy steps after the prompt also time the decode speed (all but the prefill's token).
KV_CHECK_PROMPT, KV_CHECK_STEPS = 128, 8


def open_onnx(folder: Path):
    """(the decoder in onnxruntime, None), or (None, the TensorRT-only ops that keep onnxruntime from running it)."""
    import onnx

    from pipeline.onnx_export import OrtDecoder
    from pipeline.stages.export import ONNX_FILE

    trt_only = sorted({n.op_type for n in onnx.load(str(folder / ONNX_FILE), load_external_data=False).graph.node
                       if n.domain == "trt"})
    return (None, trt_only) if trt_only else (OrtDecoder(folder / ONNX_FILE), [])


def check_onnx(folder: Path, quantized, folded: list[str], model_dir: Path, windows, limits: dict,
               tolerance: float, track, opened=None, compared: dict | None = None) -> dict:
    """Run the Q/DQ ONNX decoder in onnxruntime (see check_decoder; `opened` is what open_onnx gave, `compared` the
    prefill comparison already made in verify's perplexity pass). A graph with TensorRT-only ops (NVFP4's
    dynamic FP4 quantization) cannot run there: its weights are dequantized by hand and compared layer by layer
    instead, and the report says onnxruntime did not run it."""
    from pipeline.stages.export import ONNX_FILE
    from pipeline.verify.dequant import onnx_fp4_weights

    decoder, trt_only = opened or open_onnx(folder)
    if trt_only:
        layers = layer_errors(quantized, evaluate.tracked(track, folded, "onnx: FP4 weights vs calibrated layers"),
                              model_dir, onnx_fp4_weights(folder / ONNX_FILE), {"layout": "onnx"})
        bad = over_tolerance(layers, tolerance)
        problems = [] if layers else ["no FP4 weights found in the ONNX"]
        return {"problems": problems, "bad_layers": bad, "layers": layers, "parity": None,
                "onnxruntime": f"not run: {', '.join(trt_only)} only run in TensorRT; FP4 weights checked instead",
                "max_layer_error": max((row["error"] for row in layers), default=None), "tolerance": tolerance}
    return check_decoder(decoder, "onnxruntime", quantized, evaluate.batches(windows), limits, track, compared)


def fused(decoder, config, logits_of):
    """(logits_of wrapped so that every batch also goes through `decoder`'s prefill and is compared with the
    logits `logits_of` gave, the comparison): one pass of the calibrated model serves its perplexity and the
    runtime's comparison."""
    comparison = evaluate.Comparison()
    runtime = prefill_logits(decoder, config)

    def both(batch):
        logits = logits_of(batch)
        comparison.add(runtime(batch).float(), logits.float(), batch)
        return logits

    return both, comparison


def prefill_logits(decoder, config):
    """[b, len] ids -> [b, len, vocab] logits of one prefill through an empty cache: a whole batch of windows per
    call, the same numbers as feeding them token by token through the cache (which check_decoder checks)."""
    import numpy as np
    import torch

    from pipeline.onnx_export import kv_shape

    def logits_of(batch: torch.Tensor) -> torch.Tensor:
        empty = np.zeros(kv_shape(config, len(batch), 0), np.float32)
        return torch.from_numpy(decoder(batch.numpy(), np.ones(batch.shape), empty, empty)[0])

    return logits_of


def check_decoder(decoder, runtime: str, quantized, batches: list, limits: dict, track,
                  compared: dict | None = None) -> dict:
    """`decoder` (the exported graph in some runtime) against the calibrated model: a prefill over each batch of
    evaluation windows (top-1 agreement, logit cosine, and perplexity on the very windows the PyTorch perplexities
    use), greedy steps through its KV cache against a full recompute, and the decode speed."""
    import time

    import numpy as np
    import torch

    config = quantized.config
    windows = torch.cat(batches)
    on = evaluate.describe_windows(windows)
    if compared is None:
        compared = evaluate.compare_on_windows(prefill_logits(decoder, config), quantized, evaluate.tracked(
            track, batches, f"{runtime}: prefill vs the calibrated model, logits and perplexity: {on}"))
    prompt = windows[0][:KV_CHECK_PROMPT]
    timed: list[float] = []

    def stepping(steps: range):
        for step in evaluate.tracked(track, steps, f"{runtime}: KV-cache decoding vs a full recompute, timed"):
            timed.append(time.perf_counter())
            yield step
        timed.append(time.perf_counter())

    _, steps = decoder.prefill_then_decode(config, prompt.numpy(), KV_CHECK_STEPS, progress=stepping)
    # single-token steps through a cache of KV_CHECK_PROMPT tokens and more (the prefill not counted)
    tokens_per_second = (len(timed) - 1) / (timed[-1] - timed[0])
    with torch.no_grad():
        extended = torch.cat([prompt, torch.tensor(steps)])
        recomputed = quantized(extended[None]).logits[0, len(prompt) - 1:-1].argmax(-1).tolist()
    problems = []
    if "gen_agreement" in limits and compared["agreement"] < limits["gen_agreement"]:
        problems.append(f"{runtime} top-1 agreement {compared['agreement']:.2f} with the calibrated model < "
                        f"{limits['gen_agreement']}")
    kv_match = float(np.mean([a == b for a, b in zip(steps, recomputed)]))
    if kv_match < 1.0:
        problems.append(f"{runtime}: KV-cache decoding disagrees with a full recompute on {1 - kv_match:.0%} of steps")
    return {"problems": problems, "bad_layers": [], "layers": [], "parity": None, **compared, "ppl_windows": on,
            "kv_cache_steps_match": kv_match, "tokens_per_second": round(tokens_per_second, 1)}

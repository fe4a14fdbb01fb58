"""Checks of the exported ONNX decoder, and of any runtime that runs its graph (onnxruntime here, a TensorRT-RTX
engine in engine.py): batched full-window prefills against the calibrated model on the very windows of the PyTorch
perplexities, greedy steps through its KV cache against a full recompute, and the decode speed."""

from __future__ import annotations

from pathlib import Path

from pipeline.verify import evaluate
from pipeline.verify.checkpoint import layer_errors, over_tolerance

KV_CHECK_PROMPT, KV_CHECK_STEPS, SPEED_STEPS = 128, 3, 32


def check_onnx(folder: Path, quantized, folded: list[str], model_dir: Path, windows, limits: dict,
               tolerance: float, track) -> dict:
    """Run the Q/DQ ONNX decoder in onnxruntime (see check_decoder). A graph with TensorRT-only ops (NVFP4's
    dynamic FP4 quantization) cannot run there: its weights are dequantized by hand and compared layer by layer
    instead, and the report says onnxruntime did not run it."""
    import onnx

    from pipeline.verify.dequant import onnx_fp4_weights
    from pipeline.onnx_export import OrtDecoder
    from pipeline.stages.export import ONNX_FILE

    trt_only = sorted({n.op_type for n in onnx.load(str(folder / ONNX_FILE), load_external_data=False).graph.node
                       if n.domain == "trt"})
    if trt_only:
        layers = layer_errors(quantized, evaluate.tracked(track, folded, "onnx: FP4 weights vs calibrated layers"),
                              model_dir, onnx_fp4_weights(folder / ONNX_FILE), {"layout": "onnx"})
        bad = over_tolerance(layers, tolerance)
        problems = [] if layers else ["no FP4 weights found in the ONNX"]
        return {"problems": problems, "bad_layers": bad, "layers": layers, "parity": None,
                "onnxruntime": f"not run: {', '.join(trt_only)} only run in TensorRT; FP4 weights checked instead",
                "max_layer_error": max((row["error"] for row in layers), default=None), "tolerance": tolerance}
    return check_decoder(OrtDecoder(folder / ONNX_FILE), "onnxruntime", quantized, evaluate.batches(windows), limits,
                         track)


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


def check_decoder(decoder, runtime: str, quantized, batches: list, limits: dict, track) -> dict:
    """`decoder` (the exported graph in some runtime) against the calibrated model: a prefill over each batch of
    evaluation windows (top-1 agreement, logit cosine, and perplexity on the very windows the PyTorch perplexities
    use), greedy steps through its KV cache against a full recompute, and the decode speed."""
    import time

    import numpy as np
    import torch

    config = quantized.config
    windows = torch.cat(batches)
    on = evaluate.describe_windows(windows)
    compared = evaluate.compare_on_windows(prefill_logits(decoder, config), quantized, evaluate.tracked(
        track, batches, f"{runtime}: prefill vs the calibrated model, logits and perplexity: {on}"))
    prompt = windows[0][:KV_CHECK_PROMPT]
    _, steps = decoder.prefill_then_decode(config, prompt.numpy(), KV_CHECK_STEPS, progress=lambda r: evaluate.tracked(
        track, r, f"{runtime}: KV-cache decoding vs a full recompute"))
    with torch.no_grad():
        extended = torch.cat([prompt, torch.tensor(steps)])
        recomputed = quantized(extended[None]).logits[0, len(prompt) - 1:-1].argmax(-1).tolist()
    started = time.perf_counter()
    decoder.prefill_then_decode(config, prompt[:8].numpy(), SPEED_STEPS, progress=lambda r: evaluate.tracked(
        track, r, f"{runtime}: decode speed, {SPEED_STEPS} single-token steps"))
    tokens_per_second = SPEED_STEPS / (time.perf_counter() - started)  # one short prefill, then the steps
    problems = []
    if "gen_agreement" in limits and compared["agreement"] < limits["gen_agreement"]:
        problems.append(f"{runtime} top-1 agreement {compared['agreement']:.2f} with the calibrated model < "
                        f"{limits['gen_agreement']}")
    kv_match = float(np.mean([a == b for a, b in zip(steps, recomputed)]))
    if kv_match < 1.0:
        problems.append(f"{runtime}: KV-cache decoding disagrees with a full recompute on {1 - kv_match:.0%} of steps")
    return {"problems": problems, "bad_layers": [], "layers": [], "parity": None, **compared, "ppl_windows": on,
            "kv_cache_steps_match": kv_match, "tokens_per_second": round(tokens_per_second, 1)}

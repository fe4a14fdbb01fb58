"""Mixed precision with ModelOpt's AutoQuantize: per-layer sensitivity scores once (calibration of every candidate
plus backward passes, the expensive part), then a per-layer format map for any effective-bits budget re-solved from
those scores alone (mtq.get_auto_quantize_config), so a second budget costs one ordinary max calibration."""

from __future__ import annotations

import copy
import fnmatch
import logging
import pickle
import warnings
from pathlib import Path

from pipeline import formats
from pipeline.quant import QuantPlan, computes_on_cpu, library_prints, modelopt, use_cpu_quantizers, write_state
from pipeline.recipe import CANDIDATE_BITS, QuantizationSpec

log = logging.getLogger(__name__)

SEARCH_STATE = "search_state.pkl"  # AutoQuantize's search state: per-group candidates, costs, sensitivity scores
UNQUANTIZED = "none"


def candidate_configs(candidates: tuple[str, ...], cpu: bool) -> list[dict]:
    """Each candidate's ModelOpt config (pointed at the CPU fake quantizers for a model computing on the CPU)."""
    mtq, _ = modelopt()
    configs = [copy.deepcopy(getattr(mtq, formats.get(fmt).modelopt_config)) for fmt in candidates]
    if cpu:
        for config in configs:
            use_cpu_quantizers(config)
    return configs


def score(model, spec: QuantizationSpec, batches: list, out: Path) -> dict:
    """Run AutoQuantize's calibration and gradient sensitivity scoring on `batches` and store its search state
    (what mtq.get_auto_quantize_config re-solves from) in out/SEARCH_STATE. Returns the per-group scores and costs
    (for the manifest and the report)."""
    mtq, _ = modelopt()
    configs = candidate_configs(spec.auto.candidates, computes_on_cpu(model))
    with library_prints(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*custom quantization formats.*")
        _, state = mtq.auto_quantize(
            model, constraints={"effective_bits": spec.auto.effective_bits,  # the budget counts searched layers only
                                "cost": {"excluded_module_name_patterns": list(spec.exclude)}},
            quantization_formats=configs,
            data_loader=batches, forward_step=lambda m, batch: m(input_ids=batch, labels=batch),
            loss_func=lambda output, batch: output.loss, disabled_layers=list(spec.exclude),
            num_calib_steps=len(batches), num_score_steps=len(batches))
    # Without the candidates' calibrations (calibrate redoes the one it needs): their tensors would carry
    # torch.save's random serialization id, and a rerun must reproduce the artifact byte for byte.
    write_state(out / SEARCH_STATE, {key: value for key, value in state.items() if key != "quantizer_states"})
    return {name.removesuffix(".quant_recipe"): {"module_names": stats["module_names"],
                                                 "scores": [float(s) for s in stats["scores"]],
                                                 "costs": [float(c) for c in stats["costs"]]}
            for name, stats in state["candidate_stats"].items()}


def load_search_state(folder: Path) -> dict:
    return pickle.loads((folder / SEARCH_STATE).read_bytes())  # our own artifact, sha256-checked by the store


def plan(spec: QuantizationSpec, model, sensitivity: Path) -> QuantPlan:
    """The per-layer map for spec.auto.effective_bits, re-solved from the cached sensitivity scores, as an
    ordinary ModelOpt config that calibrate applies with mtq.quantize."""
    import torch

    mtq, _ = modelopt()
    with library_prints(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*get_auto_quantize_config.*")
        config = mtq.get_auto_quantize_config(load_search_state(sensitivity),
                                              {"effective_bits": spec.auto.effective_bits})
    sizes = {name: m.weight.numel() for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
             and not any(fnmatch.fnmatch(name, pattern) for pattern in spec.exclude)}
    formats = layer_formats(config, spec.auto.candidates, sorted(sizes))
    bits = effective_bits(formats, sizes)
    quantized = [n for n, f in formats.items() if f != UNQUANTIZED]
    unquantized = [n for n, f in formats.items() if f == UNQUANTIZED]
    counts = ", ".join(f"{sum(f == fmt for f in formats.values())} {fmt}"
                       for fmt in (*spec.auto.candidates, UNQUANTIZED))
    decision = (f"AutoQuantize at {spec.auto.effective_bits} effective bits: {counts} layers "
                f"({bits:.2f} bits per weight)")
    log.info("%s", decision)
    return QuantPlan(config, None, quantized, unquantized, [decision], formats)


def layer_formats(config: dict, candidates: tuple[str, ...], layers: list[str]) -> dict[str, str]:
    """Linear layer -> the candidate its weight quantizer was given (by its bit layout), or 'none'."""
    mtq, _ = modelopt()
    by_bits = {_weight_bits(getattr(mtq, formats.get(fmt).modelopt_config)["quant_cfg"], "*weight_quantizer"): fmt
               for fmt in candidates}
    return {name: by_bits.get(_weight_bits(config["quant_cfg"], f"{name}.weight_quantizer"), UNQUANTIZED)
            for name in layers}


def _weight_bits(entries: list[dict], quantizer: str):
    """num_bits of the enabled entry naming `quantizer`, None if it is disabled or not named."""
    for entry in reversed(entries):  # ModelOpt applies entries in order: the last match wins
        if entry["quantizer_name"] == quantizer:
            cfg = entry.get("cfg") or {}
            cfg = cfg[0] if isinstance(cfg, list) else cfg
            return tuple(cfg["num_bits"]) if entry.get("enable", True) and cfg else None
    return None


def effective_bits(formats: dict[str, str], sizes: dict[str, int]) -> float:
    """Average bits per weight of the searched linear layers, counted as AutoQuantize counts them."""
    bits = {**CANDIDATE_BITS, UNQUANTIZED: 16.0}
    return sum(bits[formats[n]] * sizes[n] for n in formats) / max(sum(sizes.values()), 1)

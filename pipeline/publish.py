"""Publishing: finished artifacts copied out of the store into engines/<model>/<format>-<target>-<recipe>/,
atomically and idempotently, with a build.json naming the key of every input and the size and sha256 of every file.

Copies, never hard links: editing a published file must not change the cached one. Each file is checked against its
artifact's manifest while it is copied, so damaged cache bytes are never published. engines/<model>/<format>-<target>
is a link to the folder published last for that model, format and target. gc never removes what a build.json
references."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path

from pipeline import card, genai, host, serving
from pipeline.errors import BadInput, VerificationFailed
from pipeline.files import copy_hashed, sha256_file
from pipeline.recipe import Recipe
from pipeline.store import Artifact, ArtifactStore

log = logging.getLogger(__name__)

PROVENANCE = "build.json"
CARD = "README.md"
REPORT_FILES = ("report.md", "report.json", "plot.png")


def published_folders(engines_dir: Path) -> list[Path]:
    """Every published folder under `engines_dir`: not the <format>-<target> links, not half-written temporaries."""
    folders = []
    for parent, subfolders, names in os.walk(engines_dir):  # does not follow links
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        if PROVENANCE in names:
            folders.append(Path(parent))
    return folders


def published_keys(engines_dir: Path) -> set[str]:
    """Every artifact key a published build.json references."""
    return {key for folder in published_folders(engines_dir) for key in provenance(folder).get("keys", {}).values()}


def provenance(folder: Path) -> dict:
    """A published folder's build.json ({} when unreadable)."""
    try:
        return json.loads((folder / PROVENANCE).read_text())
    except (OSError, ValueError):
        return {}


def _variant(recipe: Recipe) -> str:
    """<format>-<target>, the format spelled as everywhere else: int4_awq-sm_89, fp8-sm_89+sm_120."""
    return f"{recipe.quantization.format}-{'+'.join(recipe.gpus)}"


def destination(engines_dir: Path, model_name: str, recipe: Recipe) -> Path:
    """engines/<model>/<format>-<target>-<recipe>/ (two recipes never share a folder), refusing any name that
    would land outside engines/."""
    root = Path(engines_dir).absolute()
    target = root / _slug(model_name) / f"{_variant(recipe)}-{recipe.name}"
    if root not in target.resolve().parents:
        raise BadInput(f"published path {target} would leave {root}; rename the model")
    return target


def _slug(name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-")
    if not slug:
        raise BadInput(f"model name {name!r} gives no usable folder name; set model.source to a named directory")
    return slug


def publish(engines_dir: Path, recipe: Recipe, artifacts: dict[str, Artifact], store: ArtifactStore,
            search: dict | None = None) -> Path:
    """Copy the run's deliverables out of the store and point engines/<model>/<format>-<target> at them. The same
    keys again change nothing; other keys replace the recipe's folder, with a warning naming what they replaced.
    `search` is the record of the `quantpipe tune` search that chose this run, for its cards."""
    keys = {stage: a.key for stage, a in artifacts.items()}
    target = destination(engines_dir, artifacts["load"].facts.name, recipe)
    replacing = target.exists()
    recorded = provenance(target)
    before = recorded.get("keys")
    if before == keys and recorded.get("search") == search:
        return target
    staging = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    try:
        _fill(staging, target, recipe, artifacts, keys, store, search)
        _swap_in(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if replacing:
        held = ", ".join(f"{stage} {key[:12]}" for stage, key in (before or {}).items() if keys.get(stage) != key)
        log.warning("replaced %s (it held %s)", target, held or "no readable build.json")
    _point(target.parent / _variant(recipe), target)
    return target


def _fill(staging: Path, target: Path, recipe: Recipe, artifacts: dict[str, Artifact], keys: dict[str, str],
          store: ArtifactStore, search: dict | None) -> None:
    staging.mkdir(parents=True)
    export, verify = artifacts["export"], artifacts.get("verify")
    formats = export.facts.formats
    files: dict[str, dict] = {}

    def copy(artifact: Artifact, name: str, published: str) -> None:
        files[published] = _copy_checked(store, artifact, name, staging / published)

    for name in export.manifest["files"]:
        fmt, _, rest = name.partition("/")
        if fmt in formats and not (verify is not None and rest == CARD):
            copy(export, name, name)
    config = staging / "onnx" / genai.CONFIG_FILE
    if config.is_file():  # the package names the execution providers of the GPUs it is published for
        files[f"onnx/{genai.CONFIG_FILE}"] = _write(config, genai.with_providers(config.read_bytes(), recipe.gpus))
    if "build" in artifacts:
        for name in artifacts["build"].manifest["files"]:
            copy(artifacts["build"], name, f"engine/{name}")
    if verify is not None:
        for name in REPORT_FILES:
            copy(verify, name, name)
        facts = card.facts(recipe, artifacts)
        quality = {"metrics": verify.facts.metrics, "thresholds": verify.facts.thresholds}
        for fmt, part in formats.items():
            serve = serving.card_lines(recipe, str(target / "hf")) if fmt == "hf" else []
            text = card.render({**facts, "artifact": f"{fmt} checkpoint", "bytes": part.bytes,
                                "quality": quality, "serving": serve, "search": search,
                                **card.sharding(recipe, fmt)})
            files[f"{fmt}/{CARD}"] = _write(staging / fmt / CARD, text.encode())
    if "hf" in formats:  # serving bundles beside the checkpoint, naming where it is published
        (staging / "hf" / "serve").mkdir()
        for name, data in serving.bundle(recipe, str(target / "hf")).items():
            files[f"hf/serve/{name}"] = _write(staging / "hf" / "serve" / name, data)
    provenance = {"keys": keys, "recipe": recipe.model_dump(mode="json"), "model": _model(recipe, artifacts["load"]),
                  "host": host.describe(),
                  "versions": {stage: a.manifest.get("environment", {}) for stage, a in artifacts.items()},
                  "published": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": files}
    if search is not None:
        provenance["search"] = search
    (staging / PROVENANCE).write_text(json.dumps(provenance, indent=2))


def _copy_checked(store: ArtifactStore, artifact: Artifact, name: str, dst: Path) -> dict:
    """Copy one stored file, hashing it on the way. Bytes that differ from the manifest are never published: the
    artifact is discarded (the next run rebuilds it) and the run fails."""
    size, sha256 = copy_hashed(artifact / name, dst)
    expected = artifact.manifest["files"][name]
    if (size, sha256) != (expected["size"], expected["sha256"]):
        problem = f"{name} content differs from its recorded sha256"
        store.discard(artifact.stage, artifact.key, problem)
        raise VerificationFailed(f"the cached {artifact.stage} artifact {artifact.key[:12]} was damaged ({problem}) "
                                 "and nothing was published; run again to rebuild it")
    return {"size": size, "sha256": sha256}


def _write(path: Path, data: bytes) -> dict:
    path.write_bytes(data)
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _model(recipe: Recipe, load: Artifact) -> dict:
    """The model load read, resolved: the bundled model's package and GGUF file, a local path, or a hub id at the
    commit it resolved to; `weights` is the fingerprint the load key covers."""
    from importlib.metadata import version

    from pipeline.stages.load import DEFAULT_PACKAGE, resolve_source

    source = resolve_source(recipe)
    facts = {"name": load.facts.name, "kind": source.kind, "weights": load.facts.weights}
    if recipe.model.source is None:
        facts["package"] = f"{DEFAULT_PACKAGE.replace('_', '-')} {version(DEFAULT_PACKAGE)}"
    elif source.kind == "hub":
        facts.update(hub=source.location, revision=load.facts.revision)
    else:
        facts["path"] = source.location
    if source.gguf_file:
        facts["file"] = source.gguf_file
    return facts


def _swap_in(staging: Path, target: Path) -> None:
    """Replace the folder `target` with `staging` so a reader sees the old folder or the new one, never a mix."""
    old = target.parent / f".old-{target.name}-{uuid.uuid4().hex[:8]}"
    if target.exists():
        os.rename(target, old)
    os.rename(staging, target)
    shutil.rmtree(old, ignore_errors=True)


def _point(link: Path, target: Path) -> None:
    """Make `link` a relative symbolic link to `target`, swapped in atomically. A folder published there by an
    earlier quantpipe (before folders were named per recipe) is replaced, with a warning."""
    new = link.with_name(f".tmp-{link.name}-{uuid.uuid4().hex[:8]}")
    new.symlink_to(target.name)
    if link.is_dir() and not link.is_symlink():
        log.warning("replaced %s (published by an earlier quantpipe) with a link to %s", link, target.name)
        _swap_in(new, link)
    else:
        os.replace(new, link)


def check_published(folder: Path) -> list[str]:
    """Each way a published folder differs from its build.json, one line per file; empty when every file matches."""
    if not (folder / PROVENANCE).is_file():
        raise BadInput(f"{folder} is not a published folder (no {PROVENANCE}); "
                       "pass a folder such as engines/<model>/<format>-<target>-<recipe>")
    recorded = provenance(folder).get("files")
    if recorded is None:
        return [f"{folder}: its {PROVENANCE} records no file hashes (unreadable, or from an earlier quantpipe)"]
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {PROVENANCE}
    problems = []
    for name in sorted(recorded.keys() | present):
        path, expected = folder / name, recorded.get(name)
        if expected is None:
            problems.append(f"{path}: not listed in {PROVENANCE}")
        elif name not in present:
            problems.append(f"{path}: missing")
        elif path.stat().st_size != expected["size"] or sha256_file(path) != expected["sha256"]:
            problems.append(f"{path}: content differs from the sha256 in {PROVENANCE}")
    return problems

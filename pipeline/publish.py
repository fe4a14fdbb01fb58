"""Publishing: finished artifacts linked out of the store into engines/<model>/<format>-<target>/, atomically and
idempotently, with a build.json naming the key of every input. gc never removes what a build.json references."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path

from pipeline import card, genai, host
from pipeline.errors import BadInput
from pipeline.recipe import Recipe
from pipeline.store import Artifact, link, link_tree

PROVENANCE = "build.json"
REPORT_FILES = ("report.md", "report.json", "plot.png")


def published_keys(engines_dir: Path) -> set[str]:
    """Every artifact key a published build.json references."""
    keys: set[str] = set()
    for provenance in Path(engines_dir).glob(f"**/{PROVENANCE}"):
        try:
            keys.update(json.loads(provenance.read_text()).get("keys", {}).values())
        except (OSError, ValueError):
            continue
    return keys


def destination(engines_dir: Path, model_name: str, recipe: Recipe) -> Path:
    """engines/<model>/<format>-<target>/, refusing any name that would land outside engines/."""
    parts = [_slug(model_name), f"{recipe.quantization.format}-{'+'.join(recipe.gpus)}"]
    root = Path(engines_dir).absolute()
    target = root.joinpath(*parts)
    if root not in target.resolve().parents:
        raise BadInput(f"published path {target} would leave {root}; rename the model")
    return target


def _slug(name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-")
    if not slug:
        raise BadInput(f"model name {name!r} gives no usable folder name; set model.source to a named directory")
    return slug


def publish(engines_dir: Path, recipe: Recipe, artifacts: dict[str, Artifact]) -> Path:
    """Link the run's deliverables out of the store. A second call with the same keys changes nothing."""
    keys = {stage: a.key for stage, a in artifacts.items()}
    target = destination(engines_dir, artifacts["load"].metadata["name"], recipe)
    try:
        if json.loads((target / PROVENANCE).read_text())["keys"] == keys:
            return target
    except (OSError, ValueError, KeyError):
        pass
    staging = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    try:
        _fill(staging, recipe, artifacts, keys)
        _swap_in(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _fill(staging: Path, recipe: Recipe, artifacts: dict[str, Artifact], keys: dict[str, str]) -> None:
    staging.mkdir(parents=True)
    export, verify = artifacts["export"], artifacts.get("verify")
    for fmt in export.metadata["formats"]:
        link_tree(export / fmt, staging / fmt)
    if (staging / "onnx" / genai.CONFIG_FILE).is_file():
        genai.name_providers(staging / "onnx", recipe.gpus)
    if "build" in artifacts:
        link_tree(artifacts["build"].path, staging / "engine", skip=("manifest.json",))
    if verify is not None:
        for name in REPORT_FILES:
            link(verify / name, staging / name)
        facts = card.facts(recipe, artifacts)
        quality = {"ppl_ratio": verify.metadata["ppl_ratio"], "agreement": verify.metadata["agreement"],
                   "ppl_ratio_max": verify.metadata["thresholds"]["ppl_ratio_max"],
                   "agreement_min": verify.metadata["thresholds"]["agreement_min"]}
        for fmt, info in export.metadata["formats"].items():
            readme = staging / fmt / "README.md"
            readme.unlink()  # a link into the store: replace, never edit in place
            readme.write_text(card.render({**facts, "artifact": f"{fmt} checkpoint", "bytes": info["bytes"],
                                           "quality": quality, **card.sharding(recipe, fmt)}))
    provenance = {"keys": keys, "recipe": recipe.model_dump(mode="json"), "host": host.describe(),
                  "versions": {stage: a.manifest.get("environment", {}) for stage, a in artifacts.items()},
                  "published": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (staging / PROVENANCE).write_text(json.dumps(provenance, indent=2))


def _swap_in(staging: Path, target: Path) -> None:
    """Replace `target` with `staging` so a reader sees the old folder or the new one, never a mix."""
    old = target.parent / f".old-{target.name}-{uuid.uuid4().hex[:8]}"
    if target.exists():
        os.rename(target, old)
    os.rename(staging, target)
    shutil.rmtree(old, ignore_errors=True)



"""Architecture coverage: a tiny random-init model of every family in pipeline/architectures.py against every
preset. Each cell is refused before any work with exit 3 naming the family and the export format, or passes the
recipe check; representative cells run the whole chain with every parity check. The results make
docs/architectures.md (QUANTPIPE_WRITE_DOCS=1 rewrites it; otherwise the test checks it is current)."""

import json
import os
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from pipeline import architectures, data, runner
from pipeline.errors import BadInput, UnsupportedOnTarget
from pipeline.recipe import load_recipe, presets
from pipeline.store import MANIFEST, ArtifactStore, write_json_atomic

pytestmark = pytest.mark.slow

DOC = Path(__file__).resolve().parents[1] / "docs" / "architectures.md"
README = DOC.parents[1] / "README.md"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, max_position_embeddings=512, tie_word_embeddings=False)
MOE = dict(num_experts=4, num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
           shared_expert_intermediate_size=64, decoder_sparse_step=1)
MODEL_TYPES = [t for f in architectures.FAMILIES for t in f.model_types]
CALIBRATION = ["calibration.samples=2", "calibration.seq_len=32", "calibration.batch_size=2", "verify.tokens=128",
               "verify.seq_len=64", "verify.max_new_tokens=4", "verify.prompts=['The capital of France is']"]
# Whole chain for a few cells: (model type, preset, overrides). The rest are checked at plan level.
END_TO_END = [
    ("llama", "fp8", ()),
    ("qwen3", "int4_awq", ()),
    ("phi3", "fp8", ("export.formats=[hf]", "build.backend=none")),
    ("gemma2", "fp8", ("export.formats=[hf,onnx]",)),
    ("gemma3_text", "fp8", ("export.formats=[hf,onnx]", "build.backend=none")),
    ("qwen3_moe", "fp8", ("export.formats=[hf]", "build.backend=none")),
    ("mixtral", "fp8", ("export.formats=[hf]", "build.backend=none")),
]
RESULTS: dict[tuple[str, str], str] = {}  # (family, preset) -> outcome
WITH_OVERRIDES: dict[str, str] = {}  # family -> a preset run end to end with the export formats the family takes


@pytest.fixture(scope="session")
def tokenizer_dir(run_preset) -> Path:
    """The bundled SmolLM2 tokenizer, from the real model's load artifact."""
    result = run_preset("default", until="load")
    return result.outcomes[0].artifact.path / "model"


@pytest.fixture(scope="session")
def tiny_model(tokenizer_dir, tmp_path_factory):
    """A tiny random-init model of a family, saved with the SmolLM2 tokenizer; cached per model type."""
    made: dict[str, Path] = {}

    def make(model_type: str, add_bos: bool = False) -> Path:
        key = f"{model_type}{'-bos' if add_bos else ''}"
        if key not in made:
            import torch
            from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

            vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
            moe = MOE if architectures.family(model_type).moe else {}
            config = AutoConfig.for_model(model_type, vocab_size=vocab, **TINY, **moe)
            torch.manual_seed(0)
            folder = tmp_path_factory.mktemp(key)
            AutoModelForCausalLM.from_config(config).save_pretrained(folder)
            for name in TOKENIZER_FILES:
                shutil.copy(tokenizer_dir / name, folder / name)
            if add_bos:  # a post-processor that puts BOS first, as Gemma's own tokenizer.json has
                from tokenizers import Tokenizer
                from tokenizers.processors import TemplateProcessing

                bos = AutoTokenizer.from_pretrained(tokenizer_dir).bos_token
                tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
                tokenizer.post_processor = TemplateProcessing(
                    single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tokenizer.token_to_id(bos))])
                tokenizer.save(str(folder / "tokenizer.json"))
            made[key] = folder
        return made[key]

    return make


def _recipe(model: Path, preset: str, *overrides: str):
    return load_recipe(preset, [*CALIBRATION, f"model.source={model}", f"name=tiny-{model.name}-{preset}",
                                *overrides])


@pytest.mark.parametrize("preset", presets())
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_every_preset_is_refused_before_load_or_passes_the_checks(model_type, preset, tiny_model, tmp_path):
    family = architectures.family(model_type)
    recipe = _recipe(tiny_model(model_type), preset)
    facts = architectures.model_facts(json.loads((tiny_model(model_type) / "config.json").read_text()))
    refused = {f"exported as {f}": why for f, why in architectures.refusals(facts, recipe.build.max_seq_len).items()
               if f in recipe.export.formats}
    fmt = recipe.quantization.format
    if fmt in family.refused_formats:  # checked first
        refused = {f"quantized as {fmt}": family.refused_formats[fmt]}
    store = ArtifactStore(tmp_path / "store")
    if not refused:
        for step in runner.plan(recipe, store):
            step.stage.preflight(recipe, {})
        RESULTS.setdefault((family.name, preset), "passes the recipe check")
        return
    with pytest.raises(UnsupportedOnTarget) as caught:
        runner.run(recipe, store)
    what, why = next(iter(refused.items()))
    message = str(caught.value)  # "... cannot be exported as onnx (build.backend tensorrt-rtx builds from it): why"
    assert message.startswith(f"{family.name} (") and what in message and f": {why}" in message
    assert not (store.root / "load").exists(), "refused before the model was loaded"
    RESULTS[(family.name, preset)] = f"refused: {what.split()[-1]}"


@pytest.mark.parametrize(("model_type", "preset", "overrides"), END_TO_END)
def test_representative_cells_run_end_to_end(model_type, preset, overrides, tiny_model, real_store):
    recipe = _recipe(tiny_model(model_type), preset, *overrides)
    result = runner.run(recipe, real_store)
    assert result.failure is None, result.failure
    verify = result.outcomes[-1].artifact.metadata
    assert set(verify["exports"]) == set(recipe.export.formats)
    assert all(not r["problems"] and not r["bad_layers"] for r in verify["exports"].values())
    family = architectures.family(model_type)
    if family.moe:  # every expert of every layer was dequantized and compared, not only the routed ones
        layers = json.loads((result.outcomes[-1].artifact / "report.json").read_text())["layers"]["hf"]
        experts = {row["layer"] for row in layers if ".experts." in row["layer"]}
        assert len(experts) == TINY["num_hidden_layers"] * MOE["num_experts"] * 3
    outcome = (f"works (parity cosine {verify['metrics'].get('parity_cosine', 1.0):.4f}, "
               f"ppl ratio {verify['metrics']['ppl_ratio']:.3f})")
    if overrides:
        WITH_OVERRIDES[family.name] = f"{preset} with {', '.join(overrides)}: {outcome}"
    else:
        RESULTS[(family.name, preset)] = outcome


def test_an_uncalibrated_expert_fails_verification_naming_it(tiny_model, real_store, tmp_path):
    """The MoE failure mode this guards against: an expert exported with a zero scale loads as zeros."""
    recipe = _recipe(tiny_model("qwen3_moe"), "fp8", "export.formats=[hf]", "build.backend=none")
    built = {o.stage: o.artifact for o in runner.run(recipe, real_store).outcomes}
    store = ArtifactStore(tmp_path / "store")  # a private copy sharing the files by hard links
    for stage in ("load", "reference", "calibrate", "quantize", "export"):
        shutil.copytree(built[stage].path, store.root / stage / built[stage].path.name, copy_function=os.link)
    export = built["export"]
    checkpoint = store.root / "export" / export.path.name / "hf" / "model.safetensors"
    tensors = load_file(checkpoint)
    tensors["model.layers.1.mlp.experts.2.up_proj.weight_scale"] *= 0
    checkpoint.unlink()
    save_file(tensors, checkpoint, metadata={"format": "pt"})
    manifest = json.loads((checkpoint.parents[1] / MANIFEST).read_text())
    manifest["files"] = ArtifactStore._inventory(checkpoint.parents[1])
    manifest["files"].pop(MANIFEST, None)
    write_json_atomic(checkpoint.parents[1] / MANIFEST, manifest)
    result = runner.run(recipe, store)
    assert result.failure and "model.layers.1.mlp.experts.2.up_proj" in result.failure


def test_windows_start_with_bos_when_the_tokenizer_adds_it(tiny_model):
    from transformers import AutoTokenizer

    from pipeline.verify.evaluate import eval_windows

    with_bos = AutoTokenizer.from_pretrained(tiny_model("gemma2", add_bos=True))
    without = AutoTokenizer.from_pretrained(tiny_model("qwen3"))
    calibration = data.token_windows(with_bos, "calib", samples=3, seq_len=32, seed=0)
    evaluation = eval_windows(with_bos, data.load_documents("eval"), tokens=128, seq_len=32)
    for windows in (calibration, evaluation):
        assert windows.shape[1] == 32 and (windows[:, 0] == with_bos.bos_token_id).all()
    assert not (data.token_windows(without, "calib", samples=3, seq_len=32, seed=0)[:, 0]
                == without.bos_token_id).any()


def test_a_model_without_tokenizer_files_is_refused_at_load(tiny_model, tmp_path):
    folder = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_model("llama"), folder)
    for name in TOKENIZER_FILES:
        (folder / name).unlink()
    store = ArtifactStore(tmp_path / "store")
    with pytest.raises(BadInput, match="has no tokenizer .*tokenizer.json"):
        runner.run(_recipe(folder, "fp8"), store)
    assert not list(store.artifacts()), "no load artifact is left behind"


def test_a_sliding_window_not_longer_than_the_engine_refuses_onnx():
    from transformers import MistralConfig

    facts = architectures.model_facts(MistralConfig(sliding_window=512).to_dict())
    with pytest.raises(UnsupportedOnTarget, match=r"Mistral \(.*cannot be exported as onnx .*window \(512 tokens\)"):
        architectures.check(load_recipe("fp8"), facts)  # build.max_seq_len 1024
    architectures.check(load_recipe("fp8", ["build.max_seq_len=511"]), facts)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_the_table_names_the_decoder_type_modelopt_gives_each_family(model_type):
    """ModelOpt's exporters pick their code path by this name: the table must follow ModelOpt upgrades."""
    import torch
    from modelopt.torch.export.model_utils import get_model_type
    from transformers import AutoConfig, AutoModelForCausalLM

    moe = MOE if architectures.family(model_type).moe else {}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, vocab_size=128, pad_token_id=0,
                                                                      **TINY, **moe))
    assert get_model_type(model) == architectures.family(model_type).decoder_type


def test_architecture_table_is_current():
    """docs/architectures.md is rendered from this module's results; run the module with QUANTPIPE_WRITE_DOCS=1
    after changing pipeline/architectures.py."""
    cells = {(f.name, p) for f in architectures.FAMILIES for p in presets()}
    if not cells <= RESULTS.keys():
        pytest.skip("needs every family x preset result from this module's other tests (run the whole module)")
    table = render(RESULTS)
    readme = _with_table(README.read_text(), table)
    if os.environ.get("QUANTPIPE_WRITE_DOCS"):
        DOC.write_text(table)
        README.write_text(readme)
    assert DOC.read_text() == table, "docs/architectures.md is stale: rerun this module with QUANTPIPE_WRITE_DOCS=1"
    assert README.read_text() == readme, "README.md's table is stale: rerun this module with QUANTPIPE_WRITE_DOCS=1"


def _with_table(readme: str, doc: str) -> str:
    """README.md with the family x preset table of `doc` between its architecture-table markers."""
    start, end = "<!-- architecture table: generated by tests/test_architectures.py -->\n", "<!-- end -->\n"
    head, rest = readme.split(start)
    table = "\n".join(line for line in doc.split("## Why")[0].splitlines() if line.startswith("|")) + "\n"
    return head + start + table + end + rest.split(end, 1)[1]


def render(results: dict[tuple[str, str], str]) -> str:
    names = presets()
    lines = [
        "# Architectures x presets",
        "",
        "Generated by `QUANTPIPE_WRITE_DOCS=1 pytest tests/test_architectures.py` from tiny random-init models of each",
        "family (hidden 64, 2 layers, 4 heads / 2 KV heads; MoE: 4 experts, top 2) with the bundled SmolLM2",
        "tokenizer. The support data is `pipeline/architectures.py`; a refused cell exits 3 before the model is",
        "loaded, naming the family and the export format. \"works\" cells ran the whole chain (calibrate, quantize,",
        "every export, build, verify with its parity checks); \"passes the recipe check\" cells were planned and",
        "preflighted only.",
        "",
        "| family | " + " | ".join(names) + " | run end to end with the formats it takes |",
        "| --- | " + " | ".join("---" for _ in names) + " | --- |",
    ]
    for family in architectures.FAMILIES:
        cells = [results[(family.name, p)] for p in names] + [WITH_OVERRIDES.get(family.name, "")]
        lines.append(f"| {family.name} | " + " | ".join(cells) + " |")
    lines += ["", "## Why a format is refused", "", "| family | format | reason |", "| --- | --- | --- |"]
    for family in architectures.FAMILIES:
        lines += [f"| {family.name} | export {fmt} | {why} |" for fmt, why in family.refused.items()]
        lines += [f"| {family.name} | quantization {fmt} | {why} |" for fmt, why in family.refused_formats.items()]
    lines += ["", "A model whose sliding attention window is not longer than `build.max_seq_len` is also refused the",
              "onnx format (one KV cache tensor for all layers). MoE families calibrate with ModelOpt's",
              "`moe_calib_experts_ratio: 1.0` (every expert sees tokens) and verify dequantizes every expert.", ""]
    return "\n".join(lines)

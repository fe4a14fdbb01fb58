"""Bad input: each case gives one line naming the problem and the fix, a stable exit code, no traceback, and leaves
the store exactly as it was. Cases that need the model reuse the session's real store (load is a hit there)."""

import json
import subprocess
import sys

import pytest

from pipeline.store import ArtifactStore
from tests.conftest import TINY


def snapshot(store: ArtifactStore) -> dict:
    """Every artifact and its manifest bytes: what 'nothing in the store changed' means."""
    return {(a.stage, a.key): (a.path / "manifest.json").read_bytes() for a in store.artifacts()}


def quantpipe(*args, cache, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "pipeline", *args, "--cache-dir", str(cache)],
                          capture_output=True, text=True, timeout=600, cwd=cwd, env=env)


def assert_one_line_error(result, code, fragment):
    """One error line, last; off a terminal the stages that started before it have their own progress lines (a stage
    start, then its own lines such as calibrate's placement)."""
    assert result.returncode == code, (result.returncode, result.stderr)
    *progress, error = result.stderr.strip().splitlines()
    assert error.startswith("quantpipe: error: ") and fragment in error, result.stderr
    assert all(line.startswith("quantpipe: ") and ": error" not in line for line in progress), result.stderr
    assert all(": running (" in line for line in progress[:1]), result.stderr
    assert "Traceback" not in result.stderr


def set_args(*items):
    return [arg for item in items for arg in ("--set", item)]


@pytest.fixture
def model_dirs(tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    (pickled / "pytorch_model.bin").write_bytes(b"not really a pickle")
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({"model_type": "custom", "auto_map": {"AutoModel": "x.Y"}}))
    (remote / "model.safetensors").write_bytes(b"")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    broken = tmp_path / "broken.yaml"
    broken.write_text("quantization: {format: fp8\n")
    typo = tmp_path / "typo.yaml"
    typo.write_text("calibration:\n  sampels: 8\n")
    return {"pickled": pickled, "remote": remote, "empty": empty, "broken": broken, "typo": typo}


# (name, argv, exit code, fragment of the message). MODEL placeholders are filled from model_dirs.
CASES = [
    ("missing model path", ["run", *set_args("model.source=/no/such/model")], 2, "neither an existing path nor"),
    ("hub id without network", ["run", *set_args("model.source=quantpipe-test/no-such-model")], 2,
     "cannot fetch hub model quantpipe-test/no-such-model"),
    ("pickle-only weights", ["run", "--set", "model.source={pickled}"], 2, "only pickle weights"),
    ("remote code", ["run", "--set", "model.source={remote}"], 2, "set model.trust_remote_code: true"),
    ("malformed yaml", ["run", "{broken}"], 2, "not valid YAML at line"),
    ("unknown key in file", ["run", "{typo}"], 2, "did you mean 'samples'"),
    ("unknown key", ["run", *set_args("quantization.fromat=fp8")], 2, "did you mean 'format'"),
    ("wrong type", ["run", *set_args("calibration.samples=lots")], 2, "calibration.samples"),
    ("format the target cannot run", ["run", "nvfp4", *set_args("target=ada")], 3, "does not run on ada"),
    ("kv cache the target cannot run", ["run", *set_args("target=hopper", "quantization.kv_cache=nvfp4")], 3,
     "quantization.kv_cache 'nvfp4' does not run on hopper"),
    ("backend the target cannot run", ["run", *set_args("target=hopper", "build.backend=tensorrt-rtx")], 3,
     "build.backend 'tensorrt-rtx' does not run on hopper"),
    ("algorithm that does not fit the format", ["run", *set_args("quantization.algorithm=awq_lite")], 2,
     "does not apply to format 'fp8'"),
    ("empty calibration file", ["run", "--set", "calibration.dataset={empty}"], 2, "holds no text"),
    ("missing calibration file", ["run", *set_args("calibration.dataset=/no/such.jsonl")], 2, "not found"),
    ("evaluation overlapping calibration", ["run", *set_args("verify.dataset=calib")], 2,
     "shares"),
    ("output name escaping the cache", ["run", *set_args("name=../../etc")], 2, "name: String should match"),
    ("unknown preset", ["run", "fp16"], 2, "unknown preset 'fp16'"),
    ("bad --set syntax", ["run", "--set", "calibration"], 2, "must look like section.field=value"),
    ("unknown stage", ["run", "--until", "verfy"], 2, "'verfy' is not one of"),
    ("engine backend library missing", ["run", *set_args("target=hopper", "build.backend=trtllm-pytorch")], 4,
     "needs tensorrt_llm and an NVIDIA sm_90 GPU"),
    ("pp without the trtllm format", ["run", *set_args("export.formats=[hf]", "export.pp=2")], 2,
     "export.pp applies to the trtllm format only"),
]


@pytest.mark.parametrize(("name", "argv", "code", "fragment"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_without_a_model(tmp_path, model_dirs, name, argv, code, fragment):
    cache = tmp_path / "cache"
    argv = [a.format(**model_dirs) for a in argv]
    before = snapshot(ArtifactStore(cache))
    result = quantpipe(*argv, cache=cache)
    assert_one_line_error(result, code, fragment)
    assert snapshot(ArtifactStore(cache)) == before


def test_unwritable_cache_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache should be")
    assert_one_line_error(quantpipe("run", cache=blocker / "cache"), 2, "is not writable")


# Cases that only show once the model's shape is known: the load artifact is a hit in the session store.
MODEL_CASES = [
    ("block size no layer width allows", ["int4_awq", "quantization.block_size=100"], 2,
     "divides no layer's input width (576, 1536); use 64 or 32 or 16"),
    ("calibration longer than the model allows", ["fp8", "calibration.seq_len=100000"], 2,
     "exceeds the model's 8192 positions"),
    ("tp the heads do not allow", ["fp8", "export.tp=2"], 2, "export.tp 2 does not divide the model's 9 attention"),
    ("pp beyond the layers", ["fp8", "export.formats=[trtllm,hf]", "export.pp=64"], 2,
     "export.pp 64 exceeds the model's 30 layers"),
    ("more samples than the data holds", ["fp8", "calibration.samples=100000"], 2, "lower the sample count"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "args", "code", "fragment"), MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_bad_input_found_against_the_model(run_preset, real_store, name, args, code, fragment):
    run_preset("fp8", until="load")
    before = snapshot(real_store)
    preset, *overrides = args
    result = quantpipe("run", preset, *set_args(*TINY, *overrides), cache=real_store.root)
    assert_one_line_error(result, code, fragment)
    assert snapshot(real_store) == before

"""GPU-only paths. They run where an NVIDIA GPU and TensorRT-LLM exist and skip with the reason elsewhere."""

import pytest

from pipeline import host
from pipeline.backends.trtllm import trtllm_version

GPUS = host.gpus()
needs_trtllm = pytest.mark.skipif(not GPUS or trtllm_version() is None,
                                  reason=f"needs an NVIDIA GPU and tensorrt_llm; found GPUs {[g.name for g in GPUS]}, "
                                         f"tensorrt_llm {trtllm_version()}")


def _target() -> str:
    return f"sm_{GPUS[0].sm}"


@pytest.mark.gpu
@needs_trtllm
def test_trtllm_engine_builds_from_the_exported_checkpoint(run_preset):
    result = run_preset("fp8", f"target={_target()}", "build.backend=trtllm", until="build")
    build = result.outcomes[-1].artifact
    assert build.metadata["engines"] >= 1 and build.metadata["engine_bytes"] > 0


@pytest.mark.gpu
@needs_trtllm
def test_trtllm_pytorch_bundle_loads_and_generates(run_preset):
    result = run_preset("fp8", f"target={_target()}", "build.backend=trtllm-pytorch", until="build")
    assert (result.outcomes[-1].artifact / "llm_api_options.yaml").is_file()


@pytest.mark.gpu
@pytest.mark.skipif(not GPUS, reason="needs an NVIDIA GPU (nvidia-smi finds none)")
def test_doctor_reports_the_gpu_architecture(tmp_path):
    import json
    import subprocess
    import sys

    doctor = json.loads(subprocess.run([sys.executable, "-m", "pipeline", "doctor", "--json", "--cache-dir",
                                        str(tmp_path)], capture_output=True, text=True, check=True).stdout)
    assert doctor["gpus"] and doctor["gpus"][0]["sm"] == _target()

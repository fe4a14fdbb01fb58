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


RTX_GPUS = [g for g in GPUS if g.sm in (89, 120, 121)]


@pytest.mark.gpu
@pytest.mark.skipif(not RTX_GPUS, reason=f"needs an sm_89/sm_120 GPU for TensorRT-RTX engines; found "
                                         f"{[f'{g.name} (sm_{g.sm})' for g in GPUS] or 'none'}")
def test_tensorrt_rtx_engine_runs_and_is_verified_on_its_gpu(run_preset):
    result = run_preset("fp8", f"target=sm_{RTX_GPUS[0].sm}", until="verify")
    verify = result.outcomes[-1].artifact.metadata
    assert verify["engine_run"] is not None, verify["engine"]
    assert verify["engine_run"]["tokens_per_second"] > 0 and verify["engine_run"]["kv_cache_steps_match"] == 1.0
    assert "ran on" in verify["engine"]

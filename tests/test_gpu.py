"""GPU-only paths. They run where an NVIDIA GPU and TensorRT-LLM exist and skip with the reason elsewhere."""

import pytest

from pipeline import host
from pipeline.backends.trtllm import trtllm_version
from tests.tiny_llama import tiny_llama  # noqa: F401

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


needs_gpu = pytest.mark.skipif(not GPUS, reason="needs an NVIDIA GPU (nvidia-smi finds none)")
HOPPER_FORMATS = ("fp8", "int8_sq", "int4_awq", "w4a8_awq")


def _calibrate_tiny(folder, cache, fmt: str, *overrides: str) -> dict:
    from pipeline import runner
    from pipeline.recipe import load_recipe
    from pipeline.store import ArtifactStore
    from tests.tiny_llama import SETTINGS

    recipe = load_recipe(fmt, [f"model.source={folder}", *SETTINGS, "target=hopper", *overrides])
    return {o.stage: o.artifact for o in runner.run(recipe, ArtifactStore(cache), until="quantize").outcomes}


@pytest.mark.gpu
@needs_gpu
def test_auto_placement_puts_every_layer_on_the_gpu(tiny_llama):  # noqa: F811
    from pipeline import placement
    from pipeline.recipe import ModelSpec

    placed = placement.plan(tiny_llama, ModelSpec())
    assert (placed.kind, placed.layers, placed.spills) == ("cuda", {"cuda:0": 6}, False)
    capped = placement.plan(tiny_llama, ModelSpec(max_memory={"cuda:0": "600KB"}))
    assert capped.spills and capped.layers.get("cpu", 0) > 0, "what the GPU cannot hold goes to CPU memory"


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("fmt", HOPPER_FORMATS)
def test_cuda_calibration_of_each_hopper_format(tiny_llama, tmp_path, fmt):  # noqa: F811
    artifacts = _calibrate_tiny(tiny_llama, tmp_path / "cache", fmt, "model.device=cuda")
    calibrated = artifacts["calibrate"]
    assert calibrated.manifest["environment"]["device"] == "cuda"
    assert calibrated.metadata["placement"]["layers"] == {"cuda:0": 6}
    assert (artifacts["quantize"] / "checkpoint" / "hf_quant_config.json").is_file()


def _assert_same_ranges(expected, got) -> None:
    """Two calibration artifacts hold the same quantizers, and their ranges agree within 2%."""
    import torch
    from safetensors.torch import load_file

    first, second = (load_file(a / "calibration.safetensors") for a in (expected, got))
    amax = sorted(name for name in first if name.endswith("_amax"))
    assert amax and amax == sorted(name for name in second if name.endswith("_amax"))
    for name in amax:
        torch.testing.assert_close(second[name], first[name], rtol=2e-2, atol=1e-4, msg=name)


# NVFP4 runs on Blackwell only; a Hopper host still calibrates it for a Blackwell target.
TARGETS = {"nvfp4": "target=blackwell"}


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("fmt", ["fp8", "int4_awq", "nvfp4"])
def test_cuda_and_cpu_calibrations_are_keyed_apart_and_agree(tiny_llama, tmp_path, fmt):  # noqa: F811
    target = TARGETS.get(fmt, "target=hopper")
    cpu = _calibrate_tiny(tiny_llama, tmp_path / "cache", fmt, "model.device=cpu", target)["calibrate"]
    cuda = _calibrate_tiny(tiny_llama, tmp_path / "cache", fmt, "model.device=cuda", target)["calibrate"]
    assert cpu.key != cuda.key, "kernels round differently: one device kind's calibration never serves the other"
    _assert_same_ranges(cpu, cuda)


@pytest.mark.gpu
@needs_gpu
def test_cpu_nvfp4_fake_quantizer_matches_modelopts_cuda_kernel():
    """pipeline.fp4 stands in for ModelOpt's CUDA NVFP4 kernel wherever a model computes on the CPU: both must
    round every value alike."""
    import torch
    from modelopt.torch.quantization.config import QuantizerAttributeConfig
    from modelopt.torch.quantization.nn import TensorQuantizer

    from pipeline import fp4
    from pipeline.quant import modelopt

    modelopt()
    values = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0)) * 3
    values[0, :16] = 0.0  # an all-zero block
    quantizer = TensorQuantizer(QuantizerAttributeConfig(
        num_bits=(2, 1), axis=None, block_sizes={-1: 16, "type": "dynamic", "scale_bits": (4, 3)}))
    quantizer.amax = values.abs().amax()
    on_gpu = quantizer.cuda()(values.cuda()).cpu()
    on_cpu = fp4.nvfp4_qdq(values, 16, values.abs().amax())
    assert (on_gpu != values).float().mean() > 0.5, "the CUDA kernel did quantize"
    differ = (on_cpu != on_gpu).float().mean().item()
    assert differ < 1e-4, f"{differ:.2%} of values round differently; max error {(on_cpu - on_gpu).abs().max():.3g}"


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_nvfp4_calibrated_on_a_gpu_host_computes_on_cpu(tiny_llama, tmp_path, device):  # noqa: F811
    """A Hopper build host quantizing for Blackwell: NVFP4 calibrates on its GPU or its CPU, and the restored model
    computes on the CPU (verify, generate --runtime pytorch) through the CPU fake quantizer."""
    import torch

    from pipeline.state import restore_model

    artifacts = _calibrate_tiny(tiny_llama, tmp_path / "cache", "nvfp4", f"model.device={device}",
                                TARGETS["nvfp4"])
    model, _ = restore_model({"load": artifacts["load"], "calibrate": artifacts["calibrate"]})
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(tokens).logits
    assert torch.isfinite(logits).all() and logits.abs().max() > 0


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("fmt", ["fp8", "int4_awq"])
def test_layer_by_layer_calibration_agrees_on_cuda_and_cpu(tiny_llama, tmp_path, fmt):  # noqa: F811
    """Layer by layer, each layer calibrates on the outputs of the quantized layers before it (so it differs from
    a whole-model calibration by design); on CUDA and on the CPU it must agree."""
    runs = {device: _calibrate_tiny(tiny_llama, tmp_path / device, fmt, f"model.device={device}",
                                    "calibration.layerwise=on")["calibrate"] for device in ("cpu", "cuda")}
    assert all(artifact.metadata["layerwise"] for artifact in runs.values())
    _assert_same_ranges(runs["cpu"], runs["cuda"])


@pytest.mark.gpu
@needs_gpu
def test_calibration_spilling_from_the_gpu_to_cpu_memory(tiny_llama, tmp_path):  # noqa: F811
    """Weights the GPU cannot hold wait in CPU memory and run on the GPU one layer at a time (auto: layer by
    layer, since the model spills)."""
    artifacts = _calibrate_tiny(tiny_llama, tmp_path / "cache", "fp8", "model.max_memory={cuda:0: 600KB}")
    calibrated = artifacts["calibrate"].metadata
    assert calibrated["placement"]["layers"].get("cpu", 0) > 0 and calibrated["layerwise"]
    assert (artifacts["quantize"] / "checkpoint" / "hf_quant_config.json").is_file()

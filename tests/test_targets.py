"""The support matrix and the pre-flight check."""

import pytest

from pipeline import targets
from pipeline.errors import BadInput, UnsupportedOnTarget


@pytest.mark.parametrize(("name", "sm"), [("ada", 89), ("sm_89", 89), ("SM90", 90), ("blackwell", 100),
                                          ("blackwell-rtx", 120), ("121", 121)])
def test_resolve(name, sm):
    assert targets.resolve(name).sm == sm


def test_resolve_unknown():
    with pytest.raises(BadInput, match="unknown GPU 'volta'"):
        targets.resolve("volta")


@pytest.mark.parametrize(
    ("gpu", "fmt", "kv", "backend", "fragment"),
    [
        ("ada", "nvfp4", "none", "none", "quantization.format 'nvfp4' does not run on ada (sm_89)"),
        ("ampere", "fp8", "none", "none", "quantization.format 'fp8' does not run on ampere (sm_80)"),
        ("hopper", "fp8", "nvfp4", "none", "quantization.kv_cache 'nvfp4' does not run on hopper"),
        ("hopper", "fp8", "none", "tensorrt-rtx", "build.backend 'tensorrt-rtx' does not run on hopper"),
        ("ada", "w4a8_awq", "none", "tensorrt-rtx", "cannot build quantization.format 'w4a8_awq'"),
    ],
)
def test_check_refuses_with_the_alternatives(gpu, fmt, kv, backend, fragment):
    with pytest.raises(UnsupportedOnTarget) as info:
        targets.check(gpu, fmt, kv, backend)
    assert fragment in str(info.value)


def test_refusal_lists_what_the_target_supports():
    with pytest.raises(UnsupportedOnTarget, match="ada \\(sm_89\\) supports: fp8, int8_sq, int4_awq, w4a8_awq"):
        targets.check("ada", "nvfp4", "none", "none")


@pytest.mark.parametrize(("gpu", "fmt", "kv", "backend"), [
    ("ada", "fp8", "fp8", "tensorrt-rtx"), ("hopper", "w4a8_awq", "fp8", "trtllm"),
    ("blackwell", "nvfp4", "nvfp4", "trtllm"), ("blackwell-rtx", "nvfp4", "none", "tensorrt-rtx"),
    ("ampere", "int4_awq", "none", "tensorrt-rtx"),
])
def test_supported_combinations_pass(gpu, fmt, kv, backend):
    assert targets.check(gpu, fmt, kv, backend).sm == targets.resolve(gpu).sm


def test_matrix_rows_cover_each_architecture():
    rows = {r["sm"]: r for r in targets.matrix()}
    assert "nvfp4" in rows["sm_100"]["formats"] and "nvfp4" not in rows["sm_90"]["formats"]
    assert "tensorrt-rtx" in rows["sm_120"]["backends"] and "tensorrt-rtx" not in rows["sm_90"]["backends"]

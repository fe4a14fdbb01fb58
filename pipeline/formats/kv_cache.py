"""KV cache formats (quantization.kv_cache): the ModelOpt config merged into the format's, and where each runs."""

from dataclasses import dataclass


@dataclass(frozen=True)
class KvCache:
    name: str
    modelopt_config: str | None  # None: the cache stays in the model's dtype
    min_sm: int


KV_CACHES: dict[str, KvCache] = {kv.name: kv for kv in (
    KvCache("none", None, 80),
    KvCache("fp8", "FP8_KV_CFG", 89),
    KvCache("nvfp4", "NVFP4_KV_CFG", 100),
)}

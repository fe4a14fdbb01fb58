"""`python -m tests.toy_cli ARGS...`: the real command line over the toy stages, for testing what a run prints,
records and exits with in a separate process. QP_TOY_DELAY (seconds per stage) and QP_TOY_CRASH (a stage name that
raises an unexpected error) shape the run."""

import os

from pipeline import cli, runner
from tests.toy_stages import toy_chain

CHAIN = toy_chain(delay=float(os.environ.get("QP_TOY_DELAY", "0")))
for stage in CHAIN:
    if stage.name == os.environ.get("QP_TOY_CRASH"):
        stage.fail_with = RuntimeError(f"injected failure in {stage.name}")

_run, _plan = runner.run, runner.plan
runner.run = lambda *args, **kwargs: _run(*args, **{**kwargs, "stages": CHAIN})
runner.plan = lambda *args, **kwargs: _plan(*args, **{**kwargs, "stages": CHAIN})
cli.by_name = {stage.name: stage for stage in CHAIN}.__getitem__

if __name__ == "__main__":
    cli.main()

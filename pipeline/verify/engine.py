"""The built engine, run where this host has a GPU it was built for (the same checks as the ONNX decoder's);
otherwise the report says why it did not run. An engine is never claimed to pass without having run."""

from __future__ import annotations

from pipeline.recipe import Recipe
from pipeline.verify import evaluate
from pipeline.verify.onnx import check_decoder


def check_engine(build, recipe: Recipe, quantized, windows, limits: dict, track) -> tuple[str, dict | None]:
    from pipeline.backends import registry
    from pipeline.backends.builders import builder as find_builder
    from pipeline.fmt import human_bytes

    if build is None:
        return "no engine built (build.backend: none)", None
    backend, size = build.facts.backend, human_bytes(getattr(build.facts, "engine_bytes", build.size))
    builder = find_builder(backend)
    if not builder.info.verify_runs:
        runs = " or ".join(n for n, b in registry().items() if b.verify_runs)
        return f"{backend} build made ({size}){builder.info.verify_note}; not run by verify: it runs {runs} only", None
    gpu = builder.runnable_here(build.metadata)
    if gpu is None:
        wanted = "/".join(f"sm_{cc.removeprefix('SM')}" for cc in build.facts.compute_capability.split(","))
        return f"{backend} engine built ({size}); not run: no {wanted} GPU on this host", None
    # the engine's profile caps one prefill's batch and length
    fitting = windows[:, :recipe.build.max_input_len]
    batches = evaluate.batches(fitting, min(evaluate.BATCH_TOKENS, recipe.build.max_batch_size * fitting.shape[1]))
    result = check_decoder(builder.decoder(build.path), f"engine on {gpu}", quantized, batches, limits, track)
    return (f"{backend} engine ({size}) ran on {gpu}: top-1 agreement {result['agreement']:.1%}, cosine "
            f"{result['cosine']:.4f}, {result['tokens_per_second']} tokens/s"), result

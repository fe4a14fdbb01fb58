"""lm-evaluation-harness on models already in memory (the unquantized model and the fake-quantized one), with the
same tasks and settings for both, and the per-task deltas against thresholds.

Besides the harness's own tasks there is a local one, `quantpipe_eval`: rolling log-likelihood over the shipped
evaluation text (or any pipeline dataset), scored per token as well as per word and byte, so its token perplexity
is comparable with verify's. It needs no download, so it runs offline and in CI."""

from __future__ import annotations

import functools
import logging

from pipeline import data, host
from pipeline.errors import BadInput, HostLacks

log = logging.getLogger(__name__)

LOCAL_TASK = "quantpipe_eval"
EXTRA = "eval"  # the pyproject extra that installs lm-eval
DEFAULT_THRESHOLD = 0.05  # a task's main metric may get at most 5% worse than the unquantized model's


def _require() -> None:
    if not host.has_module("lm_eval"):
        raise HostLacks(f"lm-eval tasks need lm-evaluation-harness: pip install 'quantpipe[{EXTRA}]'")


@functools.cache
def _task_manager(builtin: bool):
    """lm-eval's task index; indexing its built-in tasks takes seconds, so only when one is asked for."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=builtin)


def check_tasks(tasks: list[str]) -> None:
    """BadInput naming unknown tasks (before any model is loaded); HostLacks when lm-eval is missing."""
    _require()
    builtin = [t for t in tasks if t != LOCAL_TASK]
    unknown = [t for t in builtin if t not in set(_task_manager(True).all_tasks)]
    if unknown:
        raise BadInput(f"unknown lm-eval task {', '.join(unknown)}; use {LOCAL_TASK} (offline) or a task from "
                       "`lm_eval --tasks list`")


def local_task(tokenizer, dataset: str = "eval") -> dict:
    """The `quantpipe_eval` task config: every document of `dataset` scored by rolling log-likelihood."""

    def documents(**_):
        from datasets import Dataset, DatasetDict

        return DatasetDict({"test": Dataset.from_dict({"text": data.load_documents(dataset)})})

    def process_results(doc: dict, results: list) -> dict:
        (loglikelihood,) = results
        text = doc["text"]
        tokens = len(tokenizer(text, add_special_tokens=False).input_ids)
        return {"token_perplexity": (loglikelihood, tokens), "word_perplexity": (loglikelihood, len(text.split())),
                "bits_per_byte": (loglikelihood, len(text.encode()))}

    return {
        "task": LOCAL_TASK, "custom_dataset": documents, "test_split": "test", "output_type": "loglikelihood_rolling",
        "doc_to_text": "", "doc_to_target": "{{text}}", "process_results": process_results,
        "metric_list": [{"metric": "token_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
                        {"metric": "word_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
                        {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False}],
        "metadata": {"version": 1.0, "dataset": dataset},
    }


def run_tasks(model, tokenizer, tasks: list[str], *, batch_size: int = 1, num_fewshot: int = 0, seed: int = 0,
              limit: int | None = None, dataset: str = "eval") -> dict:
    """Run lm-eval `tasks` on an in-memory transformers model; returns each task's metrics (with which way is
    better) and the settings that produced them, so two runs with equal settings are comparable."""
    check_tasks(tasks)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device="cpu")
    requested = [local_task(tokenizer, dataset) if t == LOCAL_TASK else t for t in tasks]
    out = simple_evaluate(model=lm, tasks=requested, num_fewshot=num_fewshot, limit=limit, log_samples=False,
                          bootstrap_iters=0, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                          fewshot_random_seed=seed, task_manager=_task_manager(tasks != [LOCAL_TASK] * len(tasks)))
    scores = {task: {name.split(",")[0]: value for name, value in metrics.items()
                     if "," in name and "_stderr" not in name and isinstance(value, (int, float))}
              for task, metrics in out["results"].items()}
    return {"scores": scores, "higher_is_better": out["higher_is_better"],
            "settings": {"batch_size": batch_size, "num_fewshot": num_fewshot, "seed": seed, "limit": limit,
                         "dataset": dataset, "lm_eval": host.version("lm-eval")}}


def task_deltas(original: dict, quantized: dict, thresholds: dict[str, float] | None = None) -> tuple[list[dict], list[str]]:
    """Each task's scores for both models, the delta, and whether the quantized one stayed within the task's
    threshold (the largest relative worsening allowed); returns (rows, failures)."""
    if original["settings"] != quantized["settings"]:
        raise ValueError("lm-eval results to compare were made with different settings")
    rows, failures = [], []
    for task, metrics in original["scores"].items():
        limit = (thresholds or {}).get(task, DEFAULT_THRESHOLD)
        for metric, before in metrics.items():
            after = quantized["scores"][task][metric]
            higher_is_better = original["higher_is_better"][task].get(metric, True)
            worse = (before - after if higher_is_better else after - before) / abs(before) if before else 0.0
            rows.append({"task": task, "metric": metric, "original": before, "quantized": after,
                         "delta": after - before, "worse_by": round(worse, 4), "threshold": limit,
                         "passed": worse <= limit})
            if worse > limit:
                failures.append(f"lm-eval {task} {metric} {after:.4g} vs {before:.4g} unquantized: "
                                f"{worse:.1%} worse > {limit:.0%}")
    return rows, failures

"""finetune (optional): quantization-aware fine-tuning of the calibrated model with ModelOpt's quantizers in place.
QAT trains the weights on the training text's next tokens; QAD distils from the unquantized model with ModelOpt's
logits distillation loss. The quantizer ranges stay as calibrated (ModelOpt's QAT guide). Checkpoints in the store's scratch
area for the stage key let a killed build resume at its last checkpoint and end with the same bytes."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from pipeline import data
from pipeline.errors import BadInput
from pipeline.facts import Facts
from pipeline.recipe import Recipe
from pipeline.stages.base import Stage, StageContext
from pipeline.stages.calibrate import check_seq_len
from pipeline.store import ArtifactStore

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
LOSSES = "losses.json"


def training_dataset(recipe: Recipe) -> str:
    return recipe.finetune.dataset or recipe.calibration.dataset


class FinetuneFacts(Facts):
    method: str
    steps: int
    tokens: int
    first_loss: float
    last_loss: float
    resumed_from_step: int  # 0 unless a killed build resumed from a checkpoint
    seconds: float
    cpu_seconds: float
    weights_bytes: int


class Finetune(Stage):
    name = "finetune"
    version = "1"
    inputs = ("load", "calibrate")
    fields = ("finetune",)
    libraries = ("torch", "transformers", "nvidia-modelopt", "safetensors")
    Facts = FinetuneFacts

    def applies(self, recipe: Recipe) -> bool:
        return recipe.finetune.method is not None

    def params(self, recipe: Recipe, store: ArtifactStore) -> dict:
        """The training fields with the dataset resolved (absent = calibration's, so both spellings share a key),
        less the checkpoint interval, which changes nothing the stage makes."""
        spec = {**recipe.field("finetune"), "dataset": training_dataset(recipe)}
        del spec["checkpoint_every"]
        return {"finetune": spec, "data": data.fingerprint(spec["dataset"], store)}

    def preflight(self, recipe: Recipe, model: dict) -> None:
        dataset = training_dataset(recipe)
        if data.resolve(dataset) == data.resolve(recipe.verify.dataset) or data.shared_paragraphs(
                dataset, recipe.verify.dataset):
            raise BadInput(f"finetune.dataset '{dataset}' is (or shares text with) verify.dataset: evaluating on "
                           "training text is not a measurement; train on other text (the shipped 'calib' set)")
        check_seq_len(recipe.finetune.seq_len, model)

    def summary(self, facts: FinetuneFacts) -> str:
        return (f"{facts.method} {facts.steps} steps on {facts.tokens} tokens: loss "
                f"{facts.first_loss:.4f} -> {facts.last_loss:.4f}")

    def run(self, ctx: StageContext) -> FinetuneFacts:
        import torch

        from pipeline.state import restore_model, save_finetune, trainable

        spec = ctx.recipe.finetune
        model, tokenizer = restore_model(ctx.inputs)  # the calibrated model: quantizers in place
        check_seq_len(spec.seq_len, ctx.input("load").metadata)
        windows = training_windows(tokenizer, training_dataset(ctx.recipe), spec.seq_len, spec.batch_size)
        loss_of = distillation_loss(ctx.input("load")) if spec.method == "qad" else next_token_loss
        params = trainable(model)
        optimizer = torch.optim.AdamW([p for _, p in params], lr=spec.lr, weight_decay=0.0)
        scratch = ctx.scratch  # removed by the store when the artifact commits; gc sweeps abandoned ones
        losses = resume(scratch, params, optimizer)
        resumed_from = len(losses)
        if losses:
            log.info("finetune: resuming at step %d of %d from %s", len(losses), spec.steps, scratch)
        model.train()
        started, cpu_started = time.time(), time.process_time()
        for step in ctx.track(range(len(losses), spec.steps), total=spec.steps - len(losses),
                              description=f"{spec.method}: {spec.steps} steps of {spec.batch_size} x {spec.seq_len} "
                                          f"tokens, lr {spec.lr:g}"):
            batch = windows[batch_indices(len(windows), spec.batch_size, step, spec.seed)]
            loss = loss_of(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(round(loss.item(), 6))
            ctx.report({"step": step + 1, "steps": spec.steps, "loss": losses[-1]})
            log.info("finetune: step %d/%d, loss %.4f", step + 1, spec.steps, losses[-1])
            if (step + 1) % spec.checkpoint_every == 0 and step + 1 < spec.steps:
                save_checkpoint(scratch, params, optimizer, losses)
        model.eval()
        saved = save_finetune(model, ctx.out)
        (ctx.out / LOSSES).write_text(json.dumps({"loss_per_step": losses}))
        return FinetuneFacts(
            method=spec.method, steps=spec.steps, tokens=spec.steps * spec.batch_size * spec.seq_len,
            first_loss=losses[0], last_loss=losses[-1], resumed_from_step=resumed_from,
            seconds=round(time.time() - started, 1), cpu_seconds=round(time.process_time() - cpu_started, 1),
            weights_bytes=saved)


def training_windows(tokenizer, dataset: str, seq_len: int, batch_size: int):
    """Every whole window of `seq_len` tokens in the training text, in order: [n, seq_len]."""
    ids = data.encode(tokenizer, data.load_documents(dataset))
    body = data.text_length(tokenizer, seq_len)
    count = len(ids) // body
    if count < batch_size:
        raise BadInput(f"dataset {dataset} has {count} windows of {seq_len} tokens, fewer than finetune.batch_size "
                       f"{batch_size}; lower finetune.seq_len or batch_size, or use a larger dataset")
    return data.frame(tokenizer, ids[: count * body].reshape(count, body))


def batch_indices(count: int, batch_size: int, step: int, seed: int):
    """The windows of one step: a seeded shuffle per pass over the data, so a resumed run sees the same batches."""
    import torch

    per_pass = count // batch_size
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed * 100003 + step // per_pass))
    start = (step % per_pass) * batch_size
    return order[start:start + batch_size]


def next_token_loss(model, batch):
    """QAT: cross-entropy of the quantized model on the training text."""
    return model(batch, labels=batch).loss


def distillation_loss(loaded):
    """QAD: ModelOpt's logits distillation loss (KL divergence) against the unquantized model, with the causal
    shift ModelOpt's KDTrainer uses."""
    import torch
    from modelopt.torch.distill import LogitsDistillationLoss

    from pipeline.modeling import load_model

    teacher, _ = load_model(loaded / "model")
    teacher.requires_grad_(False)
    criterion = LogitsDistillationLoss(reduction="none")

    def loss(model, batch):
        with torch.no_grad():
            target = teacher(batch).logits[:, :-1].float()
        return criterion(model(batch).logits[:, :-1].float(), target).mean()

    return loss


def save_checkpoint(scratch: Path, params: list, optimizer, losses: list[float]) -> None:
    """Weights, optimizer state and losses so far, replaced atomically: a kill leaves the previous checkpoint."""
    import torch

    scratch.mkdir(parents=True, exist_ok=True)
    tmp = scratch / f".{CHECKPOINT}.{os.getpid()}"
    torch.save({"weights": {name: p.detach() for name, p in params}, "optimizer": optimizer.state_dict(),
                "losses": losses}, tmp)
    os.replace(tmp, scratch / CHECKPOINT)


def resume(scratch: Path, params: list, optimizer) -> list[float]:
    """Load the last checkpoint into the parameters and optimizer; the losses of the steps it covers ([] if none)."""
    import torch

    path = scratch / CHECKPOINT
    if not path.is_file():
        return []
    saved = torch.load(path, weights_only=True)
    with torch.no_grad():
        for name, p in params:
            p.copy_(saved["weights"][name])
    optimizer.load_state_dict(saved["optimizer"])
    return list(saved["losses"])

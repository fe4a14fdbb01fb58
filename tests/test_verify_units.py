"""Verify's building blocks on a tiny random-init Llama (no tokenizer, no ModelOpt): batched evaluation equals
window-by-window evaluation, the reference artifact round-trips, and the one model skeleton swaps export weights in
and the previous export's back out."""

import math

import pytest
import torch

from pipeline.verify import evaluate
from pipeline.verify.checkpoint import Skeleton
from pipeline.verify.reference import Reference


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def _load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


def test_batched_scores_equal_window_by_window_scores(tiny):
    model = _load(tiny)
    windows = torch.randint(0, 96, (5, 16))
    batched = evaluate.score(evaluate.model_logits(model), evaluate.batches(windows, batch_tokens=32))
    assert [len(b) for b in evaluate.batches(windows, batch_tokens=32)] == [2, 2, 1]
    with torch.no_grad():
        one_by_one = [torch.nn.functional.cross_entropy(model(w[None]).logits[0, :-1], w[1:], reduction="none")
                      for w in windows]
    torch.testing.assert_close(batched["losses"], torch.stack(one_by_one), rtol=1e-4, atol=1e-5)
    assert evaluate.perplexity(model, windows) == pytest.approx(math.exp(torch.stack(one_by_one).mean().item()),
                                                                rel=1e-5)
    compared = evaluate.compare_on_windows(evaluate.model_logits(model), model, evaluate.batches(windows, 32))
    assert compared["cosine"] == pytest.approx(1.0) and compared["agreement"] == 1.0


def test_the_reference_artifact_round_trips(tmp_path):
    losses, top1 = torch.rand(3, 7), torch.randint(0, 500, (3, 8))
    Reference(losses, top1, [[5, 6, 7], [], [9]]).write(tmp_path)
    back = Reference.read(tmp_path)
    assert torch.equal(back.losses, losses) and torch.equal(back.top1, top1)
    assert back.generations == [[5, 6, 7], [], [9]]
    assert back.perplexity == pytest.approx(math.exp(losses.double().mean().item()))


def test_the_skeleton_restores_what_the_previous_export_replaced(tiny):
    skeleton = Skeleton(_load(tiny), tiny)
    original = {k: v.clone() for k, v in skeleton.model.state_dict().items()}
    q, o = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"
    first = skeleton.holding({q: torch.zeros_like(original[q]), o: torch.ones_like(original[o])}, {})
    assert first.state_dict()[q].abs().sum() == 0 and torch.equal(first.state_dict()[o], torch.ones_like(original[o]))
    second = skeleton.holding({q: torch.full_like(original[q], 2.0)}, {})  # this export has no down_proj
    assert second is first, "one model, weights swapped"
    assert torch.equal(second.state_dict()[q], torch.full_like(original[q], 2.0))
    assert torch.equal(second.state_dict()[o], original[o]), "the first export's down_proj was swapped back out"

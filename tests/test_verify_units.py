"""Verify's building blocks on a tiny random-init Llama (no tokenizer, no ModelOpt): batched evaluation equals
window-by-window evaluation, the reference artifact round-trips, the calibrated model holding an export's weights
computes as a plain model holding them, and dequantized weights read on access equal the eager ones."""

import math

import pytest
import torch

from pipeline.verify import evaluate
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


def _fp8(folder, fold: bool = True):
    """The tiny model under ModelOpt FP8 fake quantization, weights folded, activation quantizers off: verify's
    weight-only view of a calibrated model."""
    from pipeline.quant import fold_weight_quantization, modelopt

    mtq, _ = modelopt()
    model = _load(folder)
    calibration = torch.randint(0, 96, (2, 16))
    mtq.quantize(model, mtq.FP8_DEFAULT_CFG, lambda m: m(calibration))
    if not fold:
        return model
    fold_weight_quantization(model)
    for pattern in ("*input_quantizer", "*output_quantizer", "*_bmm_quantizer"):
        mtq.disable_quantizer(model, pattern)
    return model


def test_the_calibrated_model_holding_export_weights_computes_as_a_plain_model_holding_them(tiny):
    """verify's parity runs the calibrated model as a plain one holding an export's weights (no second model):
    the logits are those of a separately loaded plain model with the same weights, and afterwards the calibrated
    model is exactly as before."""
    from pipeline.verify.checkpoint import held_logits

    quantized = _fp8(tiny)
    batch = torch.randint(0, 96, (3, 16))
    with torch.no_grad():
        before = quantized(batch).logits
    parameters = {name: p.detach().clone() for name, p in quantized.named_parameters()}
    torch.manual_seed(1)
    plain = _load(tiny)
    exported = {name: t + 0.01 * torch.randn_like(t) for name, t in plain.state_dict().items()}
    exported["model.layers.1.mlp.down_proj.weight"] = torch.zeros_like(exported["model.layers.1.mlp.down_proj.weight"])
    plain.load_state_dict(exported)
    with torch.no_grad():
        expected = plain(batch).logits
    del plain
    got = held_logits(quantized, exported, {})(batch)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    with torch.no_grad():
        assert torch.equal(quantized(batch).logits, before), "every tensor and quantizer swapped back"
    assert all(torch.equal(p, parameters[name]) for name, p in quantized.named_parameters())
    assert not any("forward" in vars(m) for m in quantized.modules()), "quantizers' own forward restored"


def test_dequantized_weights_are_read_on_access_and_equal_the_eager_ones(tmp_path, tiny):
    """The lazy mapping verify uses gives the same tensors as effective_weights (each on every access)."""
    from pipeline.quant import export_unified
    from pipeline.verify.dequant import dequantized, effective_weights

    quantized = _fp8(tiny, fold=False)
    shapes = {n: tuple(m.weight.shape) for n, m in quantized.named_modules() if isinstance(m, torch.nn.Linear)}
    export_unified(quantized, torch.float16, tmp_path / "hf", "1GB")
    eager, problems = effective_weights(tmp_path / "hf", shapes)
    lazy, lazy_problems = dequantized(tmp_path / "hf", shapes)
    assert problems == lazy_problems == [] and set(lazy) == set(eager)
    assert all(torch.equal(lazy[name], eager[name]) for name in eager)

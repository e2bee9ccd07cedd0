"""AutoBitModel.from_pretrained on transformers models: shapes, forward in train/eval, skip lists, report, messages."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from bitcore.config import BitQuantConfig
from bitcore.errors import ConfigError
from bitlayers import BitLinear
from bitmodels import AutoBitModel
from tests.bitmodels.hf.hf_tiny_models import TINY_MODELS, main_output, model_inputs, tiny_bert, tiny_llama

TERNARY = BitQuantConfig(weight_bits=1.58, activation_dtype="int8", activation_granularity="per_token")
W8A8 = BitQuantConfig(weight_bits=8, weight_granularity="per_channel", activation_granularity="per_token")


def _linears(model):
    return {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}


@pytest.mark.parametrize("kind", sorted(TINY_MODELS))
def test_conversion_keeps_shapes_and_runs_in_eval(kind):
    model = TINY_MODELS[kind]()
    inputs = model_inputs(kind)
    with torch.no_grad():
        reference = main_output(model, inputs)
    shapes = _linears(model)
    AutoBitModel.from_pretrained(model, quant_config=TERNARY, verbose=False, progress=False)
    after = {n: m for n, m in model.named_modules() if isinstance(m, BitLinear)}
    skipped = {"lm_head"} if kind == "llama" else set()
    assert set(after) == set(shapes) - skipped
    assert all((m.in_features, m.out_features) == shapes[n] for n, m in after.items())
    with torch.no_grad():
        out = main_output(model, inputs)
    assert out.shape == reference.shape and bool(torch.isfinite(out).all())
    assert not torch.equal(out, reference)  # the weights really are quantized now


@pytest.mark.parametrize("kind", sorted(TINY_MODELS))
def test_converted_model_trains(kind):
    model = TINY_MODELS[kind]()
    AutoBitModel.from_pretrained(model, quant_config=TERNARY, verbose=False, progress=False)
    model.train()
    outputs = model(**model_inputs(kind, seed=5)).to_tuple()  # BERT's pooler output too
    sum(t.float().square().mean() for t in outputs if torch.is_tensor(t)).backward()
    layers = [m for m in model.modules() if isinstance(m, BitLinear)]
    assert layers and all(m.weight.grad is not None and bool(m.weight.grad.abs().sum() > 0) for m in layers)


def test_w8a8_stays_close_to_float():
    """Conversion keeps each layer's weights: at 8 bits the outputs barely move."""
    model = tiny_bert(seed=3)
    inputs = model_inputs("bert", seed=4)
    with torch.no_grad():
        reference = main_output(model, inputs)
        AutoBitModel.from_pretrained(model, quant_config=W8A8, verbose=False, progress=False)
        out = main_output(model, inputs)
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), reference.flatten(1), dim=-1)
    assert bool((cos > 0.999).all()), cos


def test_skip_list_is_respected_and_reported():
    model = tiny_bert()
    skip = ["pooler.dense", "*.attention.self.query"]
    AutoBitModel.from_pretrained(model, quant_config=TERNARY, modules_to_not_convert=skip, verbose=False, progress=False)
    kept = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, BitLinear)}
    assert kept == {"pooler.dense", "encoder.layer.0.attention.self.query", "encoder.layer.1.attention.self.query"}
    report = model.bitlab_report
    assert {name for name, _ in report.skipped} == kept
    assert "encoder.layer.0.attention.self.key" in report.converted


def test_default_keeps_lm_head_and_empty_list_converts_it():
    model = tiny_llama()
    AutoBitModel.from_pretrained(model, quant_config=TERNARY, verbose=False, progress=False)
    assert not isinstance(model.lm_head, BitLinear)
    model = tiny_llama()
    AutoBitModel.from_pretrained(model, quant_config=TERNARY, modules_to_not_convert=[], verbose=False, progress=False)
    assert isinstance(model.lm_head, BitLinear)


def test_report_counts_true_packed_memory(capsys):
    model = tiny_bert()
    float_bytes = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, nn.Linear))
    AutoBitModel.from_pretrained(model, quant_config=TERNARY, progress=False)
    report = model.bitlab_report
    layers = [m for m in model.modules() if isinstance(m, BitLinear)]
    assert report.linear_bytes_before == float_bytes
    assert report.linear_bytes_after == sum(m.weight_memory_bytes() for m in layers)
    # ternary packs 4 weights per byte, plus one float32 scale per layer; rows of 70 inputs pad to 18 bytes
    assert report.linear_bytes_after == sum(m.out_features * ((m.in_features + 3) // 4) + 4 for m in layers)
    assert report.model_bytes_after < report.model_bytes_before
    printed = capsys.readouterr().out
    assert f"converted {len(layers)} Linear layer(s)" in printed and "MiB" in printed


def test_freeze_drops_latent_weights():
    model = tiny_bert()
    AutoBitModel.from_pretrained(model, quant_config=TERNARY, freeze=True, verbose=False, progress=False)
    assert all(m.frozen for m in model.modules() if isinstance(m, BitLinear))


def test_model_without_linear_layers_gets_a_clear_message():
    model = nn.Sequential(nn.Embedding(10, 6), nn.LayerNorm(6))
    with pytest.warns(UserWarning, match="has no nn.Linear layers: nothing was converted"):
        out = AutoBitModel.from_pretrained(model, quant_config=TERNARY, verbose=False)
    assert out is model and out.bitlab_report.converted == []


def test_skip_list_given_as_a_string_is_refused():
    with pytest.raises(ConfigError, match="modules_to_not_convert"):
        AutoBitModel.from_pretrained(tiny_bert(), quant_config=TERNARY, modules_to_not_convert="pooler.dense")


def test_converts_a_local_transformers_directory(tmp_path):
    source = tiny_bert(seed=7)
    source.save_pretrained(tmp_path)
    model = AutoBitModel.from_pretrained(tmp_path, quant_config=W8A8, verbose=False, progress=False)
    assert type(model).__name__ == "BertModel"
    assert isinstance(model.encoder.layer[1].output.dense, BitLinear)
    inputs = model_inputs("bert")
    with torch.no_grad():
        torch.testing.assert_close(
            main_output(model, inputs), main_output(source, inputs), rtol=0.1, atol=0.1
        )


def test_missing_directory_says_offline(tmp_path):
    with pytest.raises(FileNotFoundError, match="offline"):
        AutoBitModel.from_pretrained(tmp_path / "nope", quant_config=TERNARY)

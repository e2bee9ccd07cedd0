"""save_pretrained / from_pretrained of converted transformers models: exact round trip, named errors."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from bitcore.config import BitQuantConfig
from bitcore.errors import CheckpointError, ConfigError
from bitlayers import BitLinear
from bitmodels import AutoBitModel
from tests.bitmodels.hf.hf_tiny_models import TINY_MODELS, main_output, model_inputs, tiny_bert, tiny_llama

CONFIGS = {
    "ternary_a8": BitQuantConfig(weight_bits=1.58, activation_dtype="int8", activation_granularity="per_token"),
    "w4_group32": BitQuantConfig(weight_bits=4, weight_granularity="per_group", group_size=32, activation_dtype="float32"),
    "binary": BitQuantConfig(weight_bits=1, weight_granularity="per_channel", activation_dtype="float32"),
}


def _convert(model, cfg, **kwargs):
    return AutoBitModel.from_pretrained(model, quant_config=cfg, verbose=False, progress=False, **kwargs)


@pytest.mark.parametrize("cfg_name", sorted(CONFIGS))
@pytest.mark.parametrize("kind", sorted(TINY_MODELS))
def test_round_trip_is_bit_exact(kind, cfg_name, tmp_path):
    model = _convert(TINY_MODELS[kind](seed=2), CONFIGS[cfg_name])
    inputs = model_inputs(kind, seed=9)
    with torch.no_grad():
        expected = main_output(model, inputs)
    AutoBitModel.save_pretrained(model, tmp_path)
    loaded = AutoBitModel.from_pretrained(tmp_path, verbose=False)
    assert type(loaded) is type(model)
    layers = {n: m for n, m in loaded.named_modules() if isinstance(m, BitLinear)}
    assert set(layers) == set(model.bitlab_report.converted)
    assert all(m.frozen and m.quant_config == CONFIGS[cfg_name] for m in layers.values())
    for name, layer in layers.items():
        assert torch.equal(layer.qweight, model.get_submodule(name).qweight)
    with torch.no_grad():
        got = main_output(loaded, inputs)
    assert torch.equal(got, expected)


def test_checkpoint_holds_packed_weights_only(tmp_path):
    model = _convert(tiny_bert(), CONFIGS["ternary_a8"])
    AutoBitModel.save_pretrained(model, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    name = "encoder.layer.0.intermediate.dense"
    assert f"{name}.weight" not in tensors
    assert tensors[f"{name}.qweight"].dtype == torch.uint8
    assert tuple(tensors[f"{name}.qweight"].shape) == (70, 12)  # 48 inputs, 4 ternary weights per byte
    assert tensors[f"{name}.weight_scale"].dtype == torch.float32
    meta = json.loads((tmp_path / "bitlab_config.json").read_text())
    assert meta["architecture"] == "BertModel" and meta["base_config"]["hidden_size"] == 48
    assert meta["bitlinear_modules"][name]["quant_config"]["weight_bits"] == 1.58
    file_bytes = (tmp_path / "model.safetensors").stat().st_size
    assert file_bytes < sum(p.numel() * 4 for p in tiny_bert().parameters())


def test_loading_does_not_requantize(tmp_path, monkeypatch):
    model = _convert(tiny_llama(), CONFIGS["ternary_a8"])
    AutoBitModel.save_pretrained(model, tmp_path)

    def refuse(self):
        raise AssertionError("loading must not quantize weights")

    monkeypatch.setattr(BitLinear, "quantize_weights", refuse)
    loaded = AutoBitModel.from_pretrained(tmp_path, verbose=False)
    with torch.no_grad():
        main_output(loaded, model_inputs("llama"))


def test_tied_embeddings_round_trip(tmp_path):
    model = _convert(tiny_llama(seed=4, tie_word_embeddings=True), CONFIGS["ternary_a8"])
    assert model.lm_head.weight is model.model.embed_tokens.weight
    inputs = model_inputs("llama", seed=2)
    with torch.no_grad():
        expected = main_output(model, inputs)
    AutoBitModel.save_pretrained(model, tmp_path)
    loaded = AutoBitModel.from_pretrained(tmp_path, verbose=False)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(main_output(loaded, inputs), expected)


@pytest.fixture
def saved_bert(tmp_path):
    model = _convert(tiny_bert(seed=6), CONFIGS["ternary_a8"])
    AutoBitModel.save_pretrained(model, tmp_path)
    return tmp_path


def _rewrite(directory, edit):
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def test_missing_tensor_is_named(saved_bert):
    _rewrite(saved_bert, lambda t: t.pop("encoder.layer.1.attention.output.dense.weight_scale"))
    with pytest.raises(CheckpointError, match=r"'encoder\.layer\.1\.attention\.output\.dense\.weight_scale' is missing"):
        AutoBitModel.from_pretrained(saved_bert, verbose=False)


def test_missing_float_tensor_is_named(saved_bert):
    _rewrite(saved_bert, lambda t: t.pop("embeddings.LayerNorm.bias"))
    with pytest.raises(CheckpointError, match=r"'embeddings\.LayerNorm\.bias' is missing"):
        AutoBitModel.from_pretrained(saved_bert, verbose=False)


def test_mismatched_shape_is_named(saved_bert):
    key = "encoder.layer.0.intermediate.dense.qweight"
    _rewrite(saved_bert, lambda t: t.__setitem__(key, t[key][:, :-1].contiguous()))
    with pytest.raises(CheckpointError, match=r"'encoder\.layer\.0\.intermediate\.dense\.qweight'.*shape \(70, 11\).*\(70, 12\)"):
        AutoBitModel.from_pretrained(saved_bert, verbose=False)


def test_mismatched_dtype_is_named(saved_bert):
    key = "encoder.layer.0.output.dense.weight_scale"
    _rewrite(saved_bert, lambda t: t.__setitem__(key, t[key].to(torch.float16)))
    with pytest.raises(CheckpointError, match=r"'encoder\.layer\.0\.output\.dense\.weight_scale'.*float16.*float32"):
        AutoBitModel.from_pretrained(saved_bert, verbose=False)


def test_unexpected_tensor_is_named(saved_bert):
    _rewrite(saved_bert, lambda t: t.__setitem__("encoder.layer.0.extra", torch.randn(3)))
    with pytest.raises(CheckpointError, match=r"'encoder\.layer\.0\.extra'"):
        AutoBitModel.from_pretrained(saved_bert, verbose=False)


def test_unknown_bitlinear_module_is_named(saved_bert):
    path = saved_bert / "bitlab_config.json"
    meta = json.loads(path.read_text())
    meta["bitlinear_modules"]["encoder.layer.7.output.dense"] = meta["bitlinear_modules"]["encoder.layer.0.output.dense"]
    path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"encoder\.layer\.7\.output\.dense"):
        AutoBitModel.from_pretrained(saved_bert, verbose=False)


def test_quant_config_with_a_saved_checkpoint_is_refused(saved_bert):
    with pytest.raises(ConfigError, match="already quantized"):
        AutoBitModel.from_pretrained(saved_bert, quant_config=CONFIGS["binary"])


def test_saving_an_unconverted_model_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no BitLinear layers"):
        AutoBitModel.save_pretrained(tiny_bert(), tmp_path)
    with pytest.raises(CheckpointError, match="no transformers config"):
        AutoBitModel.save_pretrained(nn.Sequential(BitLinear(4, 3)), tmp_path)

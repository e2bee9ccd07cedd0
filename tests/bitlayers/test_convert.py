import pytest
import torch
from torch import nn

from bitcore.config import BitQuantConfig
from bitlayers import BitLinear, convert_to_bitlinear


def small_model():
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 16), nn.Tanh()), nn.Linear(16, 3))


def test_converts_every_linear_keeping_weights():
    torch.manual_seed(0)
    model = small_model()
    w0 = model[0].weight.detach().clone()
    convert_to_bitlinear(model, BitQuantConfig(weight_bits=8, activation_dtype="float32"))
    assert all(isinstance(m, BitLinear) for m in (model[0], model[2][0], model[3]))
    assert torch.equal(model[0].weight, w0)
    report = model.bitlab_report
    assert report.converted == ["0", "2.0", "3"] and report.params_converted == 12 * 16 + 16 * 16 + 16 * 3


def test_skip_list_by_name_suffix_and_glob():
    model = small_model()
    convert_to_bitlinear(model, skip_modules=["3", "2.*"])
    assert isinstance(model[0], BitLinear)
    assert type(model[2][0]) is nn.Linear and type(model[3]) is nn.Linear
    assert {name for name, _ in model.bitlab_report.skipped} == {"2.0", "3"}


def test_int8_conversion_stays_close_to_float():
    torch.manual_seed(1)
    model = small_model().eval()
    x = torch.randn(8, 12)
    ref = model(x)
    convert_to_bitlinear(model, BitQuantConfig(weight_bits=8, weight_granularity="per_channel",
                                               activation_dtype="int8", activation_granularity="per_token"))
    out = model(x)
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.999


def test_model_without_linear_layers_warns(caplog):
    model = nn.Sequential(nn.ReLU())
    with caplog.at_level("WARNING"):
        convert_to_bitlinear(model)
    assert "no nn.Linear layers" in caplog.text


def test_bare_linear_is_refused_with_hint():
    with pytest.raises(TypeError, match="wrap a bare nn.Linear"):
        convert_to_bitlinear(nn.Linear(3, 3))

import pytest
import torch

from bitcore.config import BitQuantConfig
from bitcore.errors import ConfigError
from bitlayers import BitLinear
from bitmodels import AutoBitModel, BitMLP, BitMLPConfig, load_model_config


def test_from_config_builds_bitmlp():
    cfg = BitMLPConfig(n_layers=3, in_channels=256, hidden_dim=128, out_channels=10, dropout=0.1)
    model = AutoBitModel.from_config(cfg)
    assert isinstance(model, BitMLP)
    assert sum(isinstance(m, BitLinear) for m in model.modules()) == 3
    assert model(torch.randn(2, 256)).shape == (2, 10)


def test_config_yaml_round_trip_and_from_yaml_file(tmp_path):
    cfg = BitMLPConfig(n_layers=2, in_channels=64, hidden_dim=32, out_channels=5,
                       quant_config=BitQuantConfig(weight_bits=1, activation_dtype="binary"))
    path = tmp_path / "mlp.yaml"
    cfg.to_yaml(path)
    assert load_model_config(str(path)) == cfg
    model = AutoBitModel.from_config(str(path))
    assert model.layers[1].quant_config.weight_bits == 1


def test_unknown_model_type_and_field():
    with pytest.raises(ConfigError, match="model_type: got 'gpt9'"):
        AutoBitModel.from_config({"model_type": "gpt9"})
    with pytest.raises(ConfigError, match="unknown field.*'depth'"):
        AutoBitModel.from_config({"model_type": "bit_mlp", "depth": 3})
    with pytest.raises(ConfigError, match="n_layers"):
        BitMLPConfig(n_layers=0)


def test_autobitmodel_is_a_factory():
    with pytest.raises(TypeError, match="factory"):
        AutoBitModel()

import pytest

from bitcore.config import BitQuantConfig
from bitcore.errors import ConfigError


def test_defaults_are_ternary_int8_per_tensor():
    cfg = BitQuantConfig()
    assert (cfg.weight_bits, cfg.weight_granularity, cfg.activation_dtype, cfg.activation_granularity) == (
        1.58, "per_tensor", "int8", "per_tensor")
    assert cfg.storage_bits == 2


@pytest.mark.parametrize("bits", [1, 1.58, 2, 4, 8, "1.58", 1.0])
def test_weight_bits_accepted(bits):
    assert BitQuantConfig(weight_bits=bits).weight_bits == float(bits)


@pytest.mark.parametrize(
    "field,value",
    [("weight_bits", 3), ("weight_bits", True), ("weight_granularity", "per_row"), ("activation_dtype", "int4"),
     ("activation_granularity", "per_block"), ("group_size", 0), ("group_size", 2.5)],
)
def test_bad_field_names_field_and_value(field, value):
    with pytest.raises(ConfigError) as err:
        BitQuantConfig(**{field: value})
    assert field in str(err.value)
    assert repr(value) in str(err.value) or str(value) in str(err.value)


def test_error_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"allowed values are \['float32', 'float16', 'bfloat16', 'int8', 'binary'\]"):
        BitQuantConfig(activation_dtype="fp8")


def test_per_channel_activation_granularity_means_per_token():
    cfg = BitQuantConfig(activation_granularity="per_channel")
    assert cfg.activation_granularity == "per_token"


def test_dict_and_yaml_round_trip(tmp_path):
    cfg = BitQuantConfig(weight_bits=4, weight_granularity="per_group", group_size=64,
                         activation_dtype="bfloat16", activation_granularity="per_token")
    assert BitQuantConfig.from_dict(cfg.to_dict()) == cfg
    assert BitQuantConfig.from_yaml(cfg.to_yaml()) == cfg
    path = tmp_path / "q.yaml"
    cfg.to_yaml(path)
    assert BitQuantConfig.from_yaml(str(path)) == cfg


def test_unknown_field_in_yaml_is_named():
    with pytest.raises(ConfigError, match="unknown field.*'bitz'"):
        BitQuantConfig.from_yaml("weight_bits: 1\nbitz: 3\n")


def test_config_is_frozen_and_hashable():
    cfg = BitQuantConfig()
    with pytest.raises(Exception):
        cfg.weight_bits = 1
    assert {cfg: 1}[BitQuantConfig()] == 1

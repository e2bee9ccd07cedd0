"""BitQuantConfig: what a low-bit layer quantizes and how.

The config is data: a frozen, validated dataclass that round-trips through
``dict`` and YAML.  Every error names the field, the bad value and the allowed
values.

Example::

    cfg = BitQuantConfig(weight_bits=1.58, activation_dtype="int8",
                         activation_granularity="per_token")
    assert BitQuantConfig.from_yaml(cfg.to_yaml()) == cfg

Field meanings
--------------
weight_bits
    ``1``: binary {-1, +1} (XNOR-Net sign, mean-|w| scale);
    ``1.58``: ternary {-1, 0, +1} (BitNet b1.58 absmean);
    ``2``: 4-level symmetric grid {-3, -1, +1, +3} * s (absmax);
    ``4``, ``8``: symmetric integers in [-7, 7] and [-127, 127] (absmax).
weight_granularity
    One scale for the whole matrix (``per_tensor``), one per output row
    (``per_channel``) or one per ``group_size`` consecutive inputs of a row
    (``per_group``).
activation_dtype
    ``float32`` / ``float16`` / ``bfloat16``: activations stay floating point
    and are computed in that dtype; ``int8``: absmax-quantized to [-127, 127];
    ``binary``: sign(x) in {-1, +1} with a mean-|x| scale.
activation_granularity
    For ``int8`` and ``binary`` activations: one scale for the whole input
    (``per_tensor``) or one per row of the input, i.e. per token / per sample
    (``per_token``).  ``per_channel`` is accepted as the spelling older BitLab
    code used for the same thing (one scale per row of the activation matrix)
    and is stored as ``per_token``.  Float activations have no scale; their
    granularity is ignored.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Union

import yaml

from bitcore.errors import ConfigError

WEIGHT_BITS = (1, 1.58, 2, 4, 8)
WEIGHT_GRANULARITIES = ("per_tensor", "per_channel", "per_group")
ACTIVATION_DTYPES = ("float32", "float16", "bfloat16", "int8", "binary")
FLOAT_ACTIVATION_DTYPES = ("float32", "float16", "bfloat16")
ACTIVATION_GRANULARITIES = ("per_tensor", "per_token")
ACTIVATION_GRANULARITY_ALIASES = {"per_channel": "per_token"}


def _normalize_bits(value: Any) -> Union[int, float]:
    if isinstance(value, bool):
        raise ConfigError(f"weight_bits: got {value!r}; allowed values are {list(WEIGHT_BITS)}")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(
                f"weight_bits: got {value!r}; allowed values are {list(WEIGHT_BITS)}"
            ) from None
    for allowed in WEIGHT_BITS:
        if isinstance(value, (int, float)) and abs(float(value) - allowed) < 1e-9:
            return allowed
    raise ConfigError(f"weight_bits: got {value!r}; allowed values are {list(WEIGHT_BITS)}")


@dataclass(frozen=True)
class BitQuantConfig:
    """How a BitLinear layer quantizes weights and activations (see module docstring)."""

    weight_bits: Union[int, float] = 1.58
    weight_granularity: str = "per_tensor"
    group_size: int = 128
    activation_dtype: str = "int8"
    activation_granularity: str = "per_tensor"

    def __post_init__(self) -> None:
        object.__setattr__(self, "weight_bits", _normalize_bits(self.weight_bits))
        _check_choice("weight_granularity", self.weight_granularity, WEIGHT_GRANULARITIES)
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise ConfigError(f"group_size: got {self.group_size!r}; expected a positive integer")
        _check_choice("activation_dtype", self.activation_dtype, ACTIVATION_DTYPES)
        granularity = ACTIVATION_GRANULARITY_ALIASES.get(
            self.activation_granularity, self.activation_granularity
        )
        _check_choice(
            "activation_granularity",
            granularity,
            ACTIVATION_GRANULARITIES,
            shown=ACTIVATION_GRANULARITIES + tuple(ACTIVATION_GRANULARITY_ALIASES),
            original=self.activation_granularity,
        )
        object.__setattr__(self, "activation_granularity", granularity)

    # -- derived facts -------------------------------------------------
    @property
    def is_ternary(self) -> bool:
        return self.weight_bits == 1.58

    @property
    def is_binary(self) -> bool:
        return self.weight_bits == 1

    @property
    def float_activations(self) -> bool:
        return self.activation_dtype in FLOAT_ACTIVATION_DTYPES

    @property
    def storage_bits(self) -> int:
        """Bits each weight occupies in the packed format (ternary is stored in 2)."""
        from bitcore.packing import storage_bits

        return storage_bits(self.weight_bits)

    def describe(self) -> str:
        """Short human label, e.g. ``W1.58A8 per_tensor/per_token``."""
        act = {"int8": "A8", "binary": "A1", "float16": "A16", "bfloat16": "A16bf", "float32": "A32"}
        wg = self.weight_granularity
        if wg == "per_group":
            wg = f"per_group({self.group_size})"
        ag = "" if self.float_activations else f"/{self.activation_granularity}"
        return f"W{self.weight_bits}{act[self.activation_dtype]} {wg}{ag}"

    # -- serialization -------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "BitQuantConfig":
        if not isinstance(data, Mapping):
            raise ConfigError(f"BitQuantConfig.from_dict expects a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"BitQuantConfig: unknown field(s) {unknown}; known fields are {sorted(known)}"
            )
        return cls(**dict(data))

    def to_yaml(self, path: Union[str, Path, None] = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_yaml(cls, source: Union[str, Path]) -> "BitQuantConfig":
        """Load from a YAML file path or a YAML string."""
        text = _read_yaml_source(source)
        data = yaml.safe_load(text)
        if isinstance(data, Mapping) and "quant_config" in data and len(data) == 1:
            data = data["quant_config"]
        return cls.from_dict(data)


def _read_yaml_source(source: Union[str, Path]) -> str:
    if isinstance(source, Path):
        return source.read_text()
    if "\n" not in source and source.endswith((".yaml", ".yml")):
        path = Path(source)
        if not path.exists():
            raise ConfigError(f"config file not found: {source}")
        return path.read_text()
    return source


_UNSET = object()


def _check_choice(field: str, value: Any, allowed: tuple, shown: tuple = (), original: Any = _UNSET) -> None:
    if value not in allowed:
        given = value if original is _UNSET else original
        raise ConfigError(f"{field}: got {given!r}; allowed values are {list(shown or allowed)}")

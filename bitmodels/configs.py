"""Model-config registry: ``model_type`` string -> (config class, model class).

Configs are dataclasses with a ``model_type`` class attribute and a
``quant_config`` field; they round-trip through dict and YAML.

Example::

    @register_model("bit_mlp")
    class BitMLP(nn.Module): ...
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, Mapping, Tuple, Type, Union

import yaml

from bitcore.config import BitQuantConfig, _read_yaml_source
from bitcore.errors import ConfigError

_MODELS: Dict[str, Tuple[type, type]] = {}


def register_model(config_cls: type, model_cls: type) -> None:
    """Make ``AutoBitModel.from_config`` build ``model_cls`` for configs of ``config_cls``."""
    model_type = getattr(config_cls, "model_type", None)
    if not model_type:
        raise ValueError(f"{config_cls.__name__} needs a model_type class attribute")
    _MODELS[model_type] = (config_cls, model_cls)


def registered_model_types() -> Dict[str, Tuple[type, type]]:
    return dict(_MODELS)


def model_class_for(config: Any) -> type:
    model_type = getattr(config, "model_type", None)
    if model_type not in _MODELS:
        raise ConfigError(f"model_type: got {model_type!r}; registered model types are {sorted(_MODELS)}")
    return _MODELS[model_type][1]


class ModelConfigMixin:
    """dict / YAML round trip for model-config dataclasses."""

    model_type: str = ""

    def to_dict(self) -> dict:
        out: Dict[str, Any] = {"model_type": self.model_type}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, BitQuantConfig) else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        data = dict(data)
        model_type = data.pop("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ConfigError(f"model_type: got {model_type!r}; {cls.__name__} is {cls.model_type!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown field(s) {unknown}; known fields are {sorted(known)}")
        if isinstance(data.get("quant_config"), Mapping):
            data["quant_config"] = BitQuantConfig.from_dict(data["quant_config"])
        return cls(**data)

    def to_yaml(self, path: Union[str, Path, None] = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_yaml(cls, source: Union[str, Path]):
        return cls.from_dict(yaml.safe_load(_read_yaml_source(source)))


def load_model_config(source: Union[str, Path, Mapping[str, Any]]):
    """Build the right config class from a dict or YAML (file or text) naming its ``model_type``."""
    data = source if isinstance(source, Mapping) else yaml.safe_load(_read_yaml_source(source))
    if not isinstance(data, Mapping) or "model_type" not in data:
        raise ConfigError(f"model config needs a 'model_type' key; registered types are {sorted(_MODELS)}")
    model_type = data["model_type"]
    if model_type not in _MODELS:
        raise ConfigError(f"model_type: got {model_type!r}; registered model types are {sorted(_MODELS)}")
    return _MODELS[model_type][0].from_dict(data)

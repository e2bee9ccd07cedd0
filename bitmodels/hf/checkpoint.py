"""Saving and loading converted transformers models: packed safetensors + one JSON config.

A saved directory holds

* ``model.safetensors``: for every ``BitLinear`` only its packed weight
  (``<name>.qweight`` uint8, ``<name>.weight_scale`` float32, ``<name>.bias``),
  never the float latent weight; every other parameter and persistent buffer
  as it is.  Tied tensors are stored once.
* ``bitlab_config.json``: the format tag, the transformers architecture and
  its full config (so loading needs no download), the model dtype, the
  default quant config and, per BitLinear module, its shape, bias and quant
  config; the tied names.

Loading rebuilds the transformers architecture from its config, puts empty
frozen ``BitLinear`` layers in place and copies the packed bytes in without
re-quantizing: the loaded model computes bit for bit what the saved one did in
eval mode.  A missing, unexpected or mismatched tensor raises
:class:`~bitcore.errors.CheckpointError` naming it.

Example::

    save_pretrained(model, "out/minilm-w8a8")
    same = load_pretrained("out/minilm-w8a8")
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Union

import torch
from torch import nn

from bitcore.config import BitQuantConfig
from bitcore.errors import CheckpointError
from bitlayers.bitlinear import BitLinear
from bitmodels.hf.build import build_model, config_from_dict, empty_frozen_bitlinear, load_tensors, set_module

CONFIG_NAME = "bitlab_config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "bitlab-transformers-packed"
FORMAT_VERSION = 1


def is_bitlab_checkpoint(path: Union[str, Path]) -> bool:
    return (Path(path) / CONFIG_NAME).exists()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _model_dtype(model: nn.Module) -> torch.dtype:
    for name, p in model.named_parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def save_pretrained(model: nn.Module, directory: Union[str, Path]) -> Path:
    """Write ``model`` (a transformers model with BitLinear layers) to ``directory``; returns the directory.

    Example::

        save_pretrained(AutoBitModel.from_pretrained(bert, quant_config=cfg), "out/bert-w8a8")
    """
    from safetensors.torch import save_file

    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise CheckpointError(
            f"save_pretrained saves transformers models; {type(model).__name__} has no transformers config"
        )
    layers = {n: m for n, m in model.named_modules() if isinstance(m, BitLinear)}
    if not layers:
        raise CheckpointError(
            f"{type(model).__name__} has no BitLinear layers; convert it first with AutoBitModel.from_pretrained"
        )
    tensors: Dict[str, torch.Tensor] = {}
    modules = {}
    for name, layer in layers.items():
        packed = layer.packed_weight()
        tensors[f"{name}.qweight"] = packed.data
        tensors[f"{name}.weight_scale"] = packed.scale
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias.detach()
        modules[name] = {
            "in_features": layer.in_features,
            "out_features": layer.out_features,
            "bias": layer.bias is not None,
            "bias_dtype": _dtype_name(layer.bias.dtype) if layer.bias is not None else None,
            "fused_activation": layer.fused_activation,
            "quant_config": layer.quant_config.to_dict(),
        }
    prefixes = tuple(f"{name}." for name in layers)
    tied: Dict[str, str] = {}
    stored: Dict[tuple, str] = {}
    for key, value in model.state_dict().items():
        if key.startswith(prefixes):
            continue
        ident = (value.data_ptr(), tuple(value.shape), value.dtype)
        if value.numel() and ident in stored:
            tied[key] = stored[ident]
            continue
        stored[ident] = key
        tensors[key] = value.detach()
    quant = getattr(model, "bitlab_quant_config", None) or next(iter(layers.values())).quant_config
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": type(model).__name__,
        "dtype": _dtype_name(_model_dtype(model)),
        "quant_config": quant.to_dict(),
        "bitlinear_modules": modules,
        "tied": tied,
        "base_config": config.to_dict(),
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous().cpu() for k, v in tensors.items()},
        str(directory / WEIGHTS_NAME),
        metadata={"format": "pt", "bitlab_format": FORMAT},
    )
    (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=False, default=str))
    return directory


def read_bitlab_config(directory: Union[str, Path]) -> dict:
    path = Path(directory) / CONFIG_NAME
    if not path.exists():
        raise CheckpointError(f"{directory}: no {CONFIG_NAME}; expected a directory written by save_pretrained")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {meta.get('format_version')!r}; this BitLab reads version {FORMAT_VERSION}"
        )
    for key in ("architecture", "dtype", "bitlinear_modules", "base_config"):
        if key not in meta:
            raise CheckpointError(f"{path}: missing the {key!r} entry")
    return meta


def load_pretrained(directory: Union[str, Path], *, backend: Optional[str] = None) -> nn.Module:
    """Rebuild a model written by :func:`save_pretrained`, with frozen BitLinear layers; no download.

    Example::

        model = load_pretrained("out/bert-w8a8")
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    meta = read_bitlab_config(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.exists():
        raise CheckpointError(f"{directory}: {WEIGHTS_NAME} is missing")
    dtype = getattr(torch, meta["dtype"], None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"{CONFIG_NAME}: dtype {meta['dtype']!r} is not a torch dtype")
    model = build_model(config_from_dict(meta["base_config"]), meta["architecture"], dtype=dtype)
    for name, spec in meta["bitlinear_modules"].items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(
                f"{CONFIG_NAME}: BitLinear module {name!r} does not exist in {meta['architecture']}"
            ) from None
        if isinstance(old, nn.Linear) and (old.in_features, old.out_features) != (spec["in_features"], spec["out_features"]):
            raise CheckpointError(
                f"{CONFIG_NAME}: module {name!r} is {spec['in_features']}->{spec['out_features']}, but the "
                f"architecture's Linear is {old.in_features}->{old.out_features}"
            )
        bias_dtype = getattr(torch, spec.get("bias_dtype") or meta["dtype"])
        layer = empty_frozen_bitlinear(
            spec["in_features"], spec["out_features"], spec["bias"], BitQuantConfig.from_dict(spec["quant_config"]),
            bias_dtype=bias_dtype, backend=backend, fused_activation=spec.get("fused_activation", "none"),
        )
        set_module(model, name, layer)
    tensors = load_file(str(weights))
    for alias, source in meta.get("tied", {}).items():
        if source in tensors:
            tensors.setdefault(alias, tensors[source])
    load_tensors(model, tensors, source=weights)
    model.bitlab_quant_config = BitQuantConfig.from_dict(meta["quant_config"])
    return model.eval()

"""Rebuilding a transformers architecture from its config and filling it from checkpoint tensors.

Both our own checkpoints (:mod:`bitmodels.hf.checkpoint`) and transformers'
BitNet checkpoints (:mod:`bitmodels.hf.bitnet_format`) are loaded the same
way: build the transformers model from its config without running weight
initialisation (no download), put empty *frozen* ``BitLinear`` layers where the
checkpoint holds packed weights, then copy every tensor in after checking
that the checkpoint has exactly the tensors the model expects, with the
expected shapes and dtypes.  A missing, unexpected or mismatched tensor is a
:class:`~bitcore.errors.CheckpointError` that names it.

Example::

    model = build_model(config, "BertModel", dtype=torch.float32)
    set_module(model, "encoder.layer.0.output.dense", empty_frozen_bitlinear(1536, 384, True, cfg))
    load_tensors(model, tensors, source="model.safetensors")
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Dict, Iterable, Mapping, Optional, Union

import torch
from torch import nn

from bitcore.config import BitQuantConfig
from bitcore.errors import CheckpointError
from bitcore.packing import PackedWeight, row_bytes, scale_shape
from bitlayers.bitlinear import BitLinear


def config_from_dict(data: Mapping) -> object:
    """The transformers config object for a ``config.json``-style dict (its ``model_type`` picks the class)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = data.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise CheckpointError(f"model_type: got {model_type!r}, which this transformers does not know")
    return CONFIG_MAPPING[model_type].from_dict(dict(data))


def model_class_for(config, architecture: Optional[str] = None) -> type:
    """The transformers class named ``architecture`` (or ``config.architectures[0]``; else AutoModel's choice)."""
    import transformers

    name = architecture or (config.architectures[0] if getattr(config, "architectures", None) else None)
    if name is None:
        return transformers.AutoModel._model_mapping[type(config)]
    cls = getattr(transformers, name, None)
    if cls is None or not isinstance(cls, type):
        raise CheckpointError(
            f"architecture: got {name!r}, which this transformers ({transformers.__version__}) does not define"
        )
    return cls


def build_model(config, architecture: Optional[str] = None, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Instantiate the transformers model for ``config`` with its weights left uninitialised (they are loaded next)."""
    cls = model_class_for(config, architecture)
    with _no_init_weights():
        model = cls._from_config(config, dtype=dtype) if dtype is not None else cls._from_config(config)
    if callable(getattr(model, "tie_weights", None)):
        model.tie_weights()  # skipping init skipped the tying too; tied tensors are stored once
    return model.eval()


@contextlib.contextmanager
def _no_init_weights():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: initialising costs time but is harmless
        yield
        return
    with no_init_weights():
        yield


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) by ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def empty_frozen_bitlinear(
    in_features: int,
    out_features: int,
    bias: bool,
    quant_config: BitQuantConfig,
    *,
    bias_dtype: torch.dtype = torch.float32,
    backend: Optional[str] = None,
    fused_activation: str = "none",
) -> BitLinear:
    """A frozen ``BitLinear`` with uninitialised ``qweight`` / ``weight_scale`` / ``bias``, ready to be loaded.

    No latent weight is created or quantized: loading fills the packed tensors as they are.
    """
    layer = BitLinear(
        in_features, out_features, bias=bias, quant_config=quant_config,
        fused_activation=fused_activation, backend=backend, device="meta",
    )
    del layer._parameters["weight"]
    layer.register_parameter("weight", None)
    if bias:
        layer.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype), requires_grad=False)
    cfg = layer.quant_config
    layer.qweight = torch.empty(out_features, row_bytes(in_features, cfg.weight_bits), dtype=torch.uint8)
    layer.weight_scale = torch.empty(
        scale_shape(cfg.weight_granularity, out_features, in_features, cfg.group_size), dtype=torch.float32
    )
    return layer.eval()


def frozen_bitlinear_from_packed(
    packed: PackedWeight,
    quant_config: BitQuantConfig,
    bias: Optional[torch.Tensor] = None,
    *,
    backend: Optional[str] = None,
) -> BitLinear:
    """A frozen ``BitLinear`` computing with ``packed`` as it is (no re-quantization)."""
    if packed.weight_bits != quant_config.weight_bits or packed.granularity != quant_config.weight_granularity:
        raise CheckpointError(
            f"packed weight is {packed.weight_bits}-bit {packed.granularity}, but the quant config asks for "
            f"{quant_config.weight_bits}-bit {quant_config.weight_granularity}"
        )
    layer = empty_frozen_bitlinear(
        packed.in_features, packed.out_features, bias is not None, quant_config,
        bias_dtype=bias.dtype if bias is not None else torch.float32, backend=backend,
    )
    layer.qweight = packed.data
    layer.weight_scale = packed.scale
    if bias is not None:
        with torch.no_grad():
            layer.bias.copy_(bias)
    return layer


def load_tensors(
    model: nn.Module, tensors: Mapping[str, torch.Tensor], source: Union[str, Path], preloaded: Iterable[str] = ()
) -> None:
    """Copy ``tensors`` into ``model``'s state after checking names, shapes and dtypes; errors name the tensor.

    The state of the modules named in ``preloaded`` (already filled) is left out of the check.
    """
    skip = tuple(f"{name}." for name in preloaded)
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(skip)}
    tensors = _fill_tied(expected, tensors)
    missing = [k for k in expected if k not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more: {missing[1:6]})" if len(missing) > 1 else ""
        raise CheckpointError(f"tensor {missing[0]!r} is missing from {source}{more}")
    unexpected = [k for k in tensors if k not in expected]
    if unexpected:
        raise CheckpointError(
            f"tensor {unexpected[0]!r} in {source} does not belong to the model "
            f"({len(unexpected)} unexpected tensor(s): {unexpected[:5]})"
        )
    for key, want in expected.items():
        got = tensors[key]
        if tuple(got.shape) != tuple(want.shape):
            raise CheckpointError(
                f"tensor {key!r} in {source} has shape {tuple(got.shape)}, expected {tuple(want.shape)}"
            )
        if got.dtype != want.dtype:
            raise CheckpointError(f"tensor {key!r} in {source} has dtype {got.dtype}, expected {want.dtype}")
    result = model.load_state_dict(dict(tensors), strict=False)
    left = [k for k in result.missing_keys if not k.startswith(skip)]
    if left or result.unexpected_keys:  # cannot happen after the checks above; never pass silently
        raise CheckpointError(f"{source}: tensors not loaded {left}, unexpected {result.unexpected_keys}")


def read_safetensors(directory: Path) -> Dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors`` or of the shards named by ``model.safetensors.index.json``."""
    import json

    from safetensors.torch import load_file

    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    if single.exists():
        return load_file(str(single))
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        tensors: Dict[str, torch.Tensor] = {}
        for shard in shards:
            path = directory / shard
            if not path.exists():
                raise CheckpointError(f"shard {shard!r} named by {index} is missing")
            tensors.update(load_file(str(path)))
        return tensors
    raise CheckpointError(f"{directory} holds no model.safetensors (nor a model.safetensors.index.json)")


def _fill_tied(expected: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Tied parameters (one tensor under several names) are stored once; give every name its tensor."""
    groups: Dict[tuple, list] = {}
    for key, value in expected.items():
        if value.numel():
            groups.setdefault((value.data_ptr(), tuple(value.shape), value.dtype), []).append(key)
    filled = dict(tensors)
    for names in groups.values():
        present = [k for k in names if k in filled]
        if present and len(names) > 1:
            for k in names:
                filled.setdefault(k, filled[present[0]])
    return filled

"""Loading BitNetForCausalLM from transformers' BitNet checkpoints and from BitLab's own format; saving.

Two directory formats are read (no download, ever):

* **transformers BitNet** (``config.json`` with ``quantization_config.quant_method == "bitnet"``):
  each projection is a packed ``uint8`` tensor plus ``weight_scale``, turned into our canonical
  packed weight by :func:`bitmodels.hf.bitnet_format.bitnet_linear_to_packed`; the other tensors
  (embeddings, norms, ``lm_head``) load as they are, cast to the model's float dtype.
* **BitLab** (``bitlab_config.json``, written by :func:`save_pretrained`, which is
  :func:`bitmodels.hf.checkpoint.save_pretrained`): ``<name>.qweight`` / ``<name>.weight_scale``
  per projection.  Module names are transformers', so such a directory also loads with
  ``AutoBitModel.from_pretrained`` into transformers' own BitNet architecture.

Every tensor is checked by name, shape and dtype (:func:`bitmodels.hf.build.load_tensors`); a
missing or mismatched one raises :class:`~bitcore.errors.CheckpointError` naming it.

Example::

    model = load_bitnet("checkpoints/bitnet-b1.58-2B-4T", dtype=torch.bfloat16).cuda()
    save_pretrained(model, "out/bitnet")
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from bitcore.config import BitQuantConfig
from bitcore.errors import CheckpointError
from bitmodels.bitnet.config import BitNetConfig
from bitmodels.bitnet.model import BitNetForCausalLM
from bitmodels.hf.bitnet_format import bitnet_linear_to_packed, is_bitnet_checkpoint
from bitmodels.hf.build import load_tensors, read_safetensors
from bitmodels.hf.checkpoint import is_bitlab_checkpoint, read_bitlab_config
from bitmodels.hf.checkpoint import save_pretrained as _save_pretrained


def save_pretrained(model: BitNetForCausalLM, directory: Union[str, Path]) -> Path:
    """Write packed projections + float tensors + ``bitlab_config.json`` (BitLab's checkpoint format)."""
    return _save_pretrained(model, directory)


def load_bitnet(path: Union[str, Path], *, dtype: Optional[torch.dtype] = None) -> BitNetForCausalLM:
    """A :class:`BitNetForCausalLM` (eval mode, on the CPU) from either checkpoint format.

    ``dtype`` is the float dtype of embeddings, norms and activations; by default the
    checkpoint's own (the dtype of its embedding matrix).
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a local checkpoint directory; nothing is downloaded)")
    if is_bitlab_checkpoint(path):
        return _load_bitlab(path, dtype)
    if is_bitnet_checkpoint(path):
        return _load_transformers_bitnet(path, dtype)
    raise CheckpointError(
        f"{path}: neither a BitLab checkpoint (bitlab_config.json) nor a transformers BitNet checkpoint "
        "(config.json with quantization_config.quant_method == 'bitnet')"
    )


def _config_from_saved(base: dict) -> BitNetConfig:
    """Our own config dict (written from a BitNetConfig) or a transformers BitNet config dict."""
    ours = {f.name for f in dataclasses.fields(BitNetConfig)} | {"model_type"}
    if set(base) <= ours:
        return BitNetConfig.from_dict(base)
    return BitNetConfig.from_hf_config(base)


def _model_dtype(tensors: Dict[str, torch.Tensor], dtype: Optional[torch.dtype]) -> torch.dtype:
    if dtype is not None:
        return dtype
    embed = tensors.get("model.embed_tokens.weight")
    return embed.dtype if embed is not None and embed.is_floating_point() else torch.float32


def _cast_floats(model: torch.nn.Module, tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Float tensors in the dtype the model holds them in (BitLinear scales are float32 in both)."""
    expected = model.state_dict()
    out = {}
    for key, t in tensors.items():
        want = expected.get(key)
        if want is not None and t.is_floating_point() and want.is_floating_point():
            t = t.to(want.dtype)
        out[key] = t
    return out


def _load_bitlab(path: Path, dtype: Optional[torch.dtype]) -> BitNetForCausalLM:
    meta = read_bitlab_config(path)
    if meta["architecture"] not in ("BitNetForCausalLM",) or meta["base_config"].get("model_type") != "bitnet":
        raise CheckpointError(
            f"{path}: holds a {meta['architecture']} (model_type {meta['base_config'].get('model_type')!r}); "
            "expected a BitNetForCausalLM"
        )
    config = _config_from_saved(meta["base_config"])
    quant = {json.dumps(spec["quant_config"], sort_keys=True) for spec in meta["bitlinear_modules"].values()}
    if len(quant) != 1:
        raise CheckpointError(f"{path}: projections with different quant configs {sorted(quant)}; expected one")
    config.quant_config = BitQuantConfig.from_dict(json.loads(quant.pop()))
    tensors = read_safetensors(path)
    for alias, source in meta.get("tied", {}).items():
        if source in tensors:
            tensors.setdefault(alias, tensors[source])
    model = BitNetForCausalLM(config, packed_only=True).to(_model_dtype(tensors, dtype))
    load_tensors(model, _cast_floats(model, tensors), source=path)
    return model.eval()


def _load_transformers_bitnet(path: Path, dtype: Optional[torch.dtype]) -> BitNetForCausalLM:
    raw = json.loads((path / "config.json").read_text())
    qc = raw.get("quantization_config") or {}
    linear_class = qc.get("linear_class", "bitlinear")
    if qc.get("use_rms_norm") or (linear_class == "autobitlinear" and qc.get("quantization_mode") == "online"):
        raise CheckpointError(
            f"{path}: quantization_config {qc} is not a packed BitNet b1.58 checkpoint this model reads; "
            "expected linear_class 'bitlinear' (or offline 'autobitlinear') and use_rms_norm False"
        )
    config = BitNetConfig.from_hf_config(raw)
    tensors = read_safetensors(path)
    model = BitNetForCausalLM(config, packed_only=True).to(_model_dtype(tensors, dtype))
    preloaded = []
    for name, layer in model.bitlinears():
        wkey, skey = f"{name}.weight", f"{name}.weight_scale"
        if wkey not in tensors:
            raise CheckpointError(f"tensor {wkey!r} is missing from {path}")
        if skey not in tensors:
            raise CheckpointError(f"tensor {skey!r} is missing from {path} (the checkpoint packs {wkey!r})")
        packed = bitnet_linear_to_packed(
            tensors.pop(wkey), tensors.pop(skey), layer.in_features, layer.out_features,
            scale_is_inverse=(linear_class == "bitlinear"), name=wkey,
        )
        layer.qweight, layer.weight_scale = packed.data, packed.scale
        if layer.bias is not None:
            bias = tensors.pop(f"{name}.bias", None)
            if bias is None:
                raise CheckpointError(f"tensor {name}.bias is missing from {path}")
            layer.bias.data = bias.to(layer.bias.dtype)
        preloaded.append(name)
    load_tensors(model, _cast_floats(model, tensors), source=path, preloaded=preloaded)
    return model.eval()

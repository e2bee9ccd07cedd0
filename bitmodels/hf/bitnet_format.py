"""Reading transformers' BitNet checkpoints (``quantization_config.quant_method == "bitnet"``).

Layout of transformers' packed ternary weight
---------------------------------------------
A ternary weight ``W[out_features, in_features]`` (values in {-1, 0, +1}) is
stored as ``uint8 P[R, in_features]`` with ``R = ceil(out_features / 4)``:
four 2-bit codes per byte, packed **along out_features in blocks of R rows**
(not interleaved)::

    code  = (P[r, k] >> (2 * i)) & 3          # i = 0..3, lowest bits first
    W[i * R + r, k] = code - 1                # codes 0, 1, 2 -> -1, 0, +1; 3 is invalid

(transformers' ``pack_weights`` / ``unpack_weights``).  Our canonical format
(:mod:`bitcore.packing`) packs along in_features with codes 0 -> 0, 1 -> +1,
2 -> -1, so a BitNet tensor is unpacked to its integer values and re-packed.

Math of transformers' ``BitLinear`` (``linear_class="bitlinear"``)
-----------------------------------------------------------------
* activations: per-token absmax int8, ``q = clamp(round(x * 127 / max|x|), -128, 127)``
  with ``max|x|`` clamped to ``>= 1e-5``; ``|q| <= 127`` always, so this is
  exactly :func:`bitcore.quantize.quantize_activation_int8` with
  ``granularity="per_token"``;
* output: ``y = (q @ W.T) / (weight_scale * (127 / max|x|)) + bias``.

So the stored ``weight_scale`` is the *inverse* of a dequantization scale (it is
``1 / mean|w|`` of the BitNet b1.58 absmean quantizer), one value per tensor,
and our equivalent layer is a per_tensor ternary BitLinear with
``scale = 1 / weight_scale`` and int8 per-token activations
(:data:`BITNET_QUANT_CONFIG`).  transformers' ``AutoBitLinear`` in offline mode
multiplies by ``weight_scale`` instead (``scale_is_inverse=False``).

Example::

    packed = bitnet_linear_to_packed(sd["model.layers.0.mlp.up_proj.weight"],
                                     sd["model.layers.0.mlp.up_proj.weight_scale"])
    model = load_bitnet_checkpoint("path/to/bitnet-checkpoint")
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from bitcore.config import BitQuantConfig
from bitcore.errors import CheckpointError
from bitcore.packing import PackedWeight, pack_weight
from bitmodels.hf.build import build_model, config_from_dict, frozen_bitlinear_from_packed, load_tensors, read_safetensors, set_module

VALUES_PER_BYTE = 4

#: The BitLab config equivalent to transformers' BitNet ``BitLinear``.
BITNET_QUANT_CONFIG = BitQuantConfig(
    weight_bits=1.58, weight_granularity="per_tensor", activation_dtype="int8", activation_granularity="per_token"
)


def unpack_bitnet_ternary(packed: torch.Tensor, out_features: Optional[int] = None, *, name: str = "weight") -> torch.Tensor:
    """transformers' packed ``uint8 [ceil(out/4), in]`` -> int8 ternary values ``[out, in]``.

    ``out_features`` defaults to ``4 * packed.shape[0]``; ``name`` is used in error messages.

    Example::

        values = unpack_bitnet_ternary(transformers.integrations.bitnet.pack_weights(w.clone()))
    """
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise CheckpointError(
            f"{name}: a BitNet packed weight is a 2-D uint8 tensor [ceil(out_features/4), in_features], "
            f"got {packed.dtype} of shape {tuple(packed.shape)}"
        )
    rows = packed.shape[0]
    if out_features is None:
        out_features = rows * VALUES_PER_BYTE
    if not (rows - 1) * VALUES_PER_BYTE < out_features <= rows * VALUES_PER_BYTE:
        raise CheckpointError(
            f"{name}: out_features={out_features} does not fit packed shape {tuple(packed.shape)}; "
            f"expected ceil(out_features / 4) == {rows}"
        )
    p = packed.to(torch.int16)
    codes = torch.cat([(p >> (2 * i)) & 3 for i in range(VALUES_PER_BYTE)], dim=0)[:out_features]
    if bool((codes == 3).any()):
        row = int((codes == 3).any(dim=1).nonzero()[0])
        raise CheckpointError(f"{name}: invalid ternary code 3 in output row {row} (codes are 0, 1, 2 for -1, 0, +1)")
    return (codes - 1).to(torch.int8)


def bitnet_linear_to_packed(
    packed_uint8: torch.Tensor,
    weight_scale: torch.Tensor,
    in_features: Optional[int] = None,
    out_features: Optional[int] = None,
    *,
    scale_is_inverse: bool = True,
    name: str = "weight",
) -> PackedWeight:
    """One BitNet linear (packed ``uint8 [ceil(out/4), in]`` + ``weight_scale``) -> canonical :class:`PackedWeight`.

    The result is ternary (``weight_bits=1.58``), ``per_tensor``, with float32
    scale ``1 / weight_scale`` (``scale_is_inverse=True``, transformers'
    ``BitLinear``) or ``weight_scale`` itself (``False``, ``AutoBitLinear``).
    Use it with :data:`BITNET_QUANT_CONFIG` (int8 per-token activations).
    ``in_features`` is checked against the packed shape when given;
    ``out_features`` defaults to ``4 * packed_uint8.shape[0]``.  Stable API:
    the BitNet LLM loader builds on it.

    Example::

        packed = bitnet_linear_to_packed(sd["lm.q_proj.weight"], sd["lm.q_proj.weight_scale"], 2560)
        layer_scale = packed.scale   # float32 [1]
    """
    if in_features is not None and packed_uint8.dim() == 2 and packed_uint8.shape[1] != in_features:
        raise CheckpointError(
            f"{name}: packed shape {tuple(packed_uint8.shape)} has {packed_uint8.shape[1]} input features, "
            f"expected in_features={in_features} (transformers packs BitNet weights along out_features)"
        )
    values = unpack_bitnet_ternary(packed_uint8, out_features, name=name)
    ws = weight_scale.detach().to(torch.float32).reshape(-1)
    if ws.numel() != 1:
        raise CheckpointError(f"{name}_scale: expected one value per tensor, got shape {tuple(weight_scale.shape)}")
    if not bool(torch.isfinite(ws).all()) or float(ws) == 0.0:
        raise CheckpointError(f"{name}_scale: got {float(ws)!r}; expected a finite non-zero scale")
    scale = 1.0 / ws if scale_is_inverse else ws
    return pack_weight(values, scale, weight_bits=1.58, granularity="per_tensor")


# ------------------------------------------------------------ whole checkpoints
def _read_config_json(path: Path) -> dict:
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{path} has no config.json")
    return json.loads(cfg_path.read_text())


def is_bitnet_checkpoint(path: Union[str, Path]) -> bool:
    """True when ``path/config.json`` declares ``quantization_config.quant_method == "bitnet"``."""
    path = Path(path)
    if not (path / "config.json").exists():
        return False
    qc = _read_config_json(path).get("quantization_config") or {}
    return qc.get("quant_method") == "bitnet"


def load_bitnet_checkpoint(
    path: Union[str, Path], *, backend: Optional[str] = None, dtype: Optional[torch.dtype] = None
) -> torch.nn.Module:
    """Load a transformers BitNet checkpoint into the transformers architecture with frozen BitLab ``BitLinear`` s.

    Every linear whose checkpoint weight is packed ``uint8`` with a ``weight_scale``
    becomes a frozen ternary ``BitLinear`` (:data:`BITNET_QUANT_CONFIG`); other
    tensors load as they are.  Outputs match transformers' own BitNet model on
    float32 checkpoints up to float rounding of the epilogue (see the tests).

    Example::

        model = load_bitnet_checkpoint("checkpoints/bitnet-tiny")
        logits = model(input_ids).logits
    """
    path = Path(path)
    raw = _read_config_json(path)
    qc = dict(raw.get("quantization_config") or {})
    if qc.get("quant_method") != "bitnet":
        raise CheckpointError(f"{path}/config.json: quantization_config.quant_method is not 'bitnet'")
    linear_class = qc.get("linear_class", "bitlinear")
    mode = qc.get("quantization_mode", "offline")
    if qc.get("use_rms_norm"):
        raise CheckpointError(
            f"{path}: quantization_config.use_rms_norm=True (an RMSNorm inside every linear) is not supported; "
            "expected use_rms_norm=False"
        )
    if linear_class == "autobitlinear" and mode == "online":
        raise CheckpointError(
            f"{path}: linear_class='autobitlinear' with quantization_mode='online' stores float weights; "
            "convert it with AutoBitModel.from_pretrained(model, quant_config=BITNET_QUANT_CONFIG) instead"
        )
    if linear_class not in ("bitlinear", "autobitlinear"):
        raise CheckpointError(f"{path}: linear_class {linear_class!r}; expected 'bitlinear' or 'autobitlinear'")

    raw.pop("quantization_config")
    config = config_from_dict(raw)
    tensors = read_safetensors(path)
    model = build_model(config, dtype=dtype)
    converted = _swap_bitnet_linears(model, tensors, scale_is_inverse=(linear_class == "bitlinear"), backend=backend)
    swapped = sorted({k.rsplit(".", 1)[0] for k in converted})
    plain = {k: v for k, v in tensors.items() if k not in converted}
    expected = model.state_dict()
    for key, want in expected.items():
        if key in plain and plain[key].dtype != want.dtype and plain[key].is_floating_point():
            plain[key] = plain[key].to(want.dtype)  # like transformers: floats load in the model's dtype
    load_tensors(model, plain, source=path, preloaded=swapped)
    model.bitlab_bitnet_modules = swapped
    return model


def _swap_bitnet_linears(
    model: torch.nn.Module, tensors: Dict[str, torch.Tensor], *, scale_is_inverse: bool, backend: Optional[str]
) -> Dict[str, torch.Tensor]:
    """Replace each nn.Linear whose weight is packed in ``tensors``; returns the checkpoint tensors consumed."""
    consumed: Dict[str, torch.Tensor] = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.Linear):
            continue
        wkey, skey, bkey = f"{name}.weight", f"{name}.weight_scale", f"{name}.bias"
        if wkey not in tensors or tensors[wkey].dtype != torch.uint8:
            continue
        if skey not in tensors:
            raise CheckpointError(f"tensor {skey!r} is missing (the checkpoint packs {wkey!r})")
        packed = bitnet_linear_to_packed(
            tensors[wkey], tensors[skey], module.in_features, module.out_features,
            scale_is_inverse=scale_is_inverse, name=wkey,
        )
        bias = tensors.get(bkey)
        if (bias is None) != (module.bias is None):
            raise CheckpointError(f"tensor {bkey!r}: the checkpoint and the architecture disagree on the bias")
        layer = frozen_bitlinear_from_packed(
            packed, BITNET_QUANT_CONFIG,
            None if bias is None else bias.to(module.weight.dtype), backend=backend,
        )
        set_module(model, name, layer)
        consumed.update({wkey: tensors[wkey], skey: tensors[skey]})
        if bias is not None:
            consumed[bkey] = bias
    return consumed


"""Inference bindings: a BitLinear's kernel and prepared weight, resolved once per device.

``BitLinear.forward`` asks the registry for a kernel and looks up its prepared
weight on every call; a decoder that runs hundreds of projections per token
resolves them once instead (:class:`PreparedLinear`), which also keeps the
Python work out of CUDA-graph capture.  The registry still decides the kernel
(``BitLinear.kernel``), exactly as the layer would.

Fusion: projections that read the same input (q/k/v, gate/up) can run as one
matrix.  Per-token activation quantization of a shared input is the same for
every part, and a per-channel scale holds each part's per-tensor scale, so the
fused matrix computes exactly what the parts do (canonical packing is
row-major along in_features, so fusing is a concatenation of rows).  It is
used only when the registry's kernel for the fused (per-channel) key has at
least the priority of the parts' kernel.

Memory: with ``offload_packed`` the canonical packed copy of each projection
goes to the CPU once its kernel has prepared its own layout on the device, so
the device holds one copy of each weight (the prepared one); ``save_pretrained``
still finds the canonical copy.

Example::

    binding = bind_linear(model.model.layers[0].self_attn.o_proj, torch.device("cuda"))
    y = binding(x)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import torch

from bitcore.config import BitQuantConfig
from bitcore.errors import ConfigError
from bitcore.kernels import KernelRegistry
from bitcore.kernels.interface import BitKernel
from bitcore.packing import PackedWeight, pack_weight
from bitcore.quantize import quantize_weight
from bitlayers.bitlinear import BitLinear


class QuantizedActivation(NamedTuple):
    """Activations already int8-quantized per token: ``q [..., K]`` int8, ``scale [..., 1]`` float32
    (:func:`bitcore.quantize.quantize_activation_int8`)."""

    q: torch.Tensor
    scale: torch.Tensor


class PreparedLinear:
    """``y = kernel.forward(x, prepared, bias)``; ``splits`` cuts a fused output back into its parts.

    ``takes_quantized``: the kernel accepts :class:`QuantizedActivation` input (int8 per-token
    configs whose kernel implements ``forward_quantized``); its output is then ``out_dtype``.
    """

    def __init__(
        self,
        kernel: BitKernel,
        prepared: Any,
        in_features: int,
        out_features: int,
        bias: Optional[torch.Tensor] = None,
        splits: Optional[Sequence[int]] = None,
        config: Optional[BitQuantConfig] = None,
        out_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.kernel, self.prepared, self.bias = kernel, prepared, bias
        self.in_features, self.out_features = in_features, out_features
        self.splits = list(splits) if splits else None
        self.out_dtype = out_dtype
        self.takes_quantized = bool(
            config is not None
            and config.activation_dtype == "int8"
            and config.activation_granularity == "per_token"
            and kernel.accepts_quantized(prepared)
        )

    def __call__(self, x):
        if isinstance(x, QuantizedActivation):
            if not self.takes_quantized:
                raise ValueError(f"{self!r} does not take pre-quantized activations")
            lead = x.q.shape[:-1]
            y = self.kernel.forward_quantized(x.q.reshape(-1, self.in_features), x.scale.reshape(-1, 1),
                                              self.prepared, self.bias, "none", self.out_dtype)
        else:
            lead = x.shape[:-1]
            y = self.kernel.forward(x.reshape(-1, self.in_features), self.prepared, self.bias, "none")
        y = y.view(*lead, self.out_features)
        return y.split(self.splits, dim=-1) if self.splits else y

    def __repr__(self) -> str:
        parts = f", splits={self.splits}" if self.splits else ""
        return f"PreparedLinear({self.in_features} -> {self.out_features}, kernel={self.kernel.name}{parts})"


def _on(packed: PackedWeight, device: torch.device) -> PackedWeight:
    if packed.device == device:
        return packed
    return dataclasses.replace(packed, data=packed.data.to(device), scale=packed.scale.to(device))


def fuse_packed(layers: Sequence[BitLinear]) -> PackedWeight:
    """One per-channel PackedWeight whose rows are the layers' rows, in order (same math as the parts)."""
    first = layers[0]
    for layer in layers[1:]:
        if layer.in_features != first.in_features or layer.quant_config != first.quant_config:
            raise ConfigError(
                f"cannot fuse BitLinear({layer.in_features}, {layer.quant_config.describe()}) with "
                f"BitLinear({first.in_features}, {first.quant_config.describe()}): inputs and configs must match"
            )
    if first.quant_config.weight_granularity not in ("per_tensor", "per_channel"):
        raise ConfigError(
            f"weight_granularity: got {first.quant_config.weight_granularity!r}; "
            "fusion supports 'per_tensor' and 'per_channel'"
        )
    parts = [layer.packed_weight() for layer in layers]
    scales = [p.scale.expand(p.out_features) if p.granularity == "per_tensor" else p.scale for p in parts]
    return PackedWeight(
        data=torch.cat([p.data for p in parts]),
        scale=torch.cat(scales).contiguous(),
        weight_bits=first.quant_config.weight_bits,
        in_features=first.in_features,
        out_features=sum(p.out_features for p in parts),
        granularity="per_channel",
    )


def bind_linear(layer: BitLinear, device: torch.device, out_dtype: torch.dtype = torch.float32) -> PreparedLinear:
    """The layer's registry-chosen kernel on ``device`` with its weight prepared there."""
    kernel = layer.kernel(device)
    prepared = kernel.prepare(_on(layer.packed_weight(), device), layer.quant_config)
    bias = None if layer.bias is None else layer.bias.detach().to(device)
    return PreparedLinear(kernel, prepared, layer.in_features, layer.out_features, bias,
                          config=layer.quant_config, out_dtype=out_dtype)


LM_HEAD_BITS = (2, 4, 8)
_FLOAT_ACTIVATIONS = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


LM_HEAD_ACTIVATIONS = ("float", "int8")


def bind_quantized_dense(weight: torch.Tensor, bits: int, device: torch.device,
                         activations: str = "float") -> PreparedLinear:
    """A dense ``[out, in]`` float weight quantized per output row to ``bits`` (2, 4, 8) and bound to the
    registry's kernel, e.g. a quantized ``lm_head`` (outputs in the weight's dtype; the float weight itself
    is left as it is).  ``activations``: ``"float"`` multiplies inputs of the weight's dtype as they are;
    ``"int8"`` quantizes them per token first (W{bits}A8: integer products, one more rounding of the input),
    and the binding then also takes :class:`QuantizedActivation` input where its kernel does."""
    if bits not in LM_HEAD_BITS:
        raise ConfigError(f"bits: got {bits!r}; allowed values are {list(LM_HEAD_BITS)}")
    if activations not in LM_HEAD_ACTIVATIONS:
        raise ConfigError(f"activations: got {activations!r}; allowed values are {list(LM_HEAD_ACTIVATIONS)}")
    if weight.dtype not in _FLOAT_ACTIVATIONS:
        raise ConfigError(f"weight dtype {weight.dtype} is not served; expected one of {list(_FLOAT_ACTIVATIONS)}")
    if activations == "int8":
        cfg = BitQuantConfig(weight_bits=bits, activation_dtype="int8", activation_granularity="per_token",
                             weight_granularity="per_channel")
    else:
        cfg = BitQuantConfig(weight_bits=bits, activation_dtype=_FLOAT_ACTIVATIONS[weight.dtype],
                             weight_granularity="per_channel")
    values, scale = quantize_weight(weight.detach().to(device), cfg)
    packed = pack_weight(values, scale, bits, "per_channel")
    out_features, in_features = weight.shape
    kernel = KernelRegistry.get_kernel_for_config(cfg, device, in_features=in_features, out_features=out_features)
    return PreparedLinear(kernel, kernel.prepare(packed, cfg), in_features, out_features, config=cfg,
                          out_dtype=weight.dtype)


def bind_fused(layers: Sequence[BitLinear], device: torch.device,
               out_dtype: torch.dtype = torch.float32) -> Optional[PreparedLinear]:
    """One binding for ``layers`` fused, or None when no kernel serves the fused key as well as the parts'."""
    first = layers[0]
    if first.quant_config.weight_granularity not in ("per_tensor", "per_channel"):
        return None
    cfg = dataclasses.replace(first.quant_config, weight_granularity="per_channel")
    out_features = sum(layer.out_features for layer in layers)
    try:
        fused_kernel = KernelRegistry.get_kernel_for_config(
            cfg, device, backend=first.backend, in_features=first.in_features, out_features=out_features
        )
    except Exception:
        return None
    if fused_kernel.priority < max(layer.kernel(device).priority for layer in layers):
        return None
    packed = _on(fuse_packed(layers), device)
    prepared = fused_kernel.prepare(packed, cfg)
    biases = [layer.bias for layer in layers]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([
            b.detach() if b is not None else torch.zeros(layer.out_features) for b, layer in zip(biases, layers)
        ]).to(device)
    return PreparedLinear(fused_kernel, prepared, first.in_features, out_features, bias,
                          splits=[layer.out_features for layer in layers], config=cfg, out_dtype=out_dtype)


def bind_group(
    modules: Dict[str, BitLinear],
    groups: Dict[str, Sequence[str]],
    device: torch.device,
    *,
    fuse: bool = True,
    offload_packed: bool = False,
    out_dtype: torch.dtype = torch.float32,
) -> Dict[str, PreparedLinear]:
    """Bindings for one block: fused groups where possible (keyed by group name), else one per module.

    ``out_dtype``: the dtype of outputs computed from pre-quantized (int8) inputs."""
    bound: Dict[str, PreparedLinear] = {}
    grouped = set()
    if fuse:
        for group, names in groups.items():
            fused = bind_fused([modules[n] for n in names], device, out_dtype)
            if fused is not None:
                bound[group] = fused
                grouped.update(names)
    for name, layer in modules.items():
        if name not in grouped:
            bound[name] = bind_linear(layer, device, out_dtype)
    if offload_packed:
        for layer in modules.values():
            layer.qweight = layer.qweight.cpu()
            layer.weight_scale = layer.weight_scale.cpu()
    return bound


def cuda_ext_int8_why_not(binding: PreparedLinear, label: str, bias_allowed: bool = False) -> str:
    """``""`` where ``binding`` runs on cuda_ext on int8 per-token input (and has no bias, unless
    ``bias_allowed``): what the fused kernels below take; else why not, naming ``label``."""
    if binding.kernel.backend != "cuda_ext":
        return f"{label} runs on {binding.kernel.name}, not cuda_ext"
    if not binding.takes_quantized:
        return f"{label} does not take int8 per-token input"
    if binding.bias is not None and not bias_allowed:
        return f"{label} has a bias"
    return ""


def bind_fused_mlp(bound: Dict[str, PreparedLinear], sub_norm_weight: torch.Tensor, eps: float,
                   norm_weight: Optional[torch.Tensor] = None):
    """BitNet's MLP (gate/up, squared-ReLU gate, sub-norm + quantization, down) as one cuda_ext kernel over
    the layer's bound ``gate_up`` and ``down_proj`` weights (:mod:`backends.cuda_ext.bitnet_mlp`); with
    ``norm_weight`` (the post-attention norm's) the kernel can also take that norm and the residual add.

    Returns ``(fused, "")`` or ``(None, why not)``."""
    gate_up, down = bound.get("gate_up"), bound.get("down_proj")
    if gate_up is None or down is None:
        return None, "gate and up are not bound as one fused projection"
    if not (gate_up.takes_quantized and down.takes_quantized):
        return None, "the projections do not take int8 per-token input"
    if gate_up.bias is not None or down.bias is not None:
        return None, "the projections have biases"
    if gate_up.kernel.backend != "cuda_ext" or down.kernel.backend != "cuda_ext":
        return None, f"the projections run on {gate_up.kernel.name} / {down.kernel.name}, not cuda_ext"
    from backends.cuda_ext import bitnet_mlp

    why = bitnet_mlp.why_not(gate_up.prepared, down.prepared, sub_norm_weight)
    if why:
        return None, why
    return bitnet_mlp.prepare_bitnet_mlp(gate_up.prepared, down.prepared, sub_norm_weight, eps, norm_weight, eps), ""


def bind_norm_linears(bound: Dict[str, PreparedLinear], norms: Dict[str, torch.Tensor],
                      eps: float) -> Tuple[Dict[str, Any], str]:
    """For each ``{binding name: weight of the norm before it}``, the bound projection with that norm in its own
    kernel (:class:`backends.cuda_ext.norm_linear.NormLinear`) where cuda_ext serves it.

    Returns ``(fused by name, why some are not)`` (an empty reason when all are)."""
    fused: Dict[str, Any] = {}
    why = []
    for name, weight in norms.items():
        binding = bound.get(name)
        if binding is None:
            why.append(f"{name} is not bound as one projection")
            continue
        from backends.cuda_ext import norm_linear

        reason = (cuda_ext_int8_why_not(binding, name, bias_allowed=True)
                  or norm_linear.why_not(binding.prepared, weight))
        if reason:
            why.append(f"{name}: {reason}")
            continue
        fused[name] = norm_linear.NormLinear.prepare(binding.prepared, weight, eps, binding.bias, binding.out_dtype)
    return fused, "; ".join(why)


def bind_norm_tail(binding: Optional[PreparedLinear], norm_weight: torch.Tensor, eps: float) -> Tuple[Any, str]:
    """``(o projection with the residual add and the norm after it in one kernel, "")`` where cuda_ext serves it
    (:class:`backends.cuda_ext.norm_tail.NormTailLinear`), else ``(None, why not)``."""
    if binding is None:
        return None, "o_proj is not bound"
    why = cuda_ext_int8_why_not(binding, "o_proj")
    if why:
        return None, why
    if binding.out_dtype != norm_weight.dtype:
        return None, f"o_proj outputs {binding.out_dtype}, the norm's weight is {norm_weight.dtype}"
    from backends.cuda_ext import norm_tail

    why = norm_tail.why_not(binding.prepared, norm_weight)
    if why:
        return None, why
    return norm_tail.NormTailLinear.prepare(binding.prepared, norm_weight, eps), ""


def bind_qkv_attention(bound: Dict[str, PreparedLinear], config) -> Tuple[Any, str]:
    """``(the fused q/k/v projection as the one-row attention kernel takes it, "")`` where cuda_ext serves it
    (:func:`backends.cuda_ext.decode_attention.prepare_qkv_attention`), else ``(None, why not)``."""
    binding = bound.get("qkv")
    if binding is None:
        return None, "q, k and v are not bound as one fused projection"
    from backends.cuda_ext import decode_attention

    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    why = (cuda_ext_int8_why_not(binding, "the q/k/v projection")
           or decode_attention.qkv_why_not(binding.prepared, heads, kv_heads, head_dim))
    if why:
        return None, why
    return decode_attention.prepare_qkv_attention(binding.prepared, heads, kv_heads, head_dim), ""


def describe_norm_linears(fused: Dict[str, Any], why: str) -> str:
    """What runs the norms before the projections, e.g. for ``model.norm_gemv``."""
    if not fused:
        return f"separate kernels ({why})"
    parts = ", ".join(f"{name} up to {f.max_tokens} tokens" for name, f in fused.items())
    rest = f"; not: {why}" if why else ""
    return f"cuda_ext.linear_int8_norm (the norm inside the GEMV: {parts}{rest})"


def tensors_in(obj: Any, seen: Optional[set] = None) -> Iterable[torch.Tensor]:
    """Every tensor reachable from a prepared-weight object (dataclasses, tuples, lists, dicts, attributes)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, PackedWeight) or dataclasses.is_dataclass(obj):
        children = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    elif isinstance(obj, (list, tuple)):
        children = list(obj)
    elif isinstance(obj, dict):
        children = list(obj.values())
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        children = list(vars(obj).values())
    else:
        return []
    out: List[torch.Tensor] = []
    for child in children:
        out.extend(tensors_in(child, seen))
    return out


def device_bytes(bindings: Iterable[PreparedLinear], device_type: str) -> int:
    """Bytes of distinct storages on ``device_type`` held by the bindings' prepared weights and biases."""
    storages = {}
    for b in bindings:
        for t in tensors_in((b.prepared, b.bias)):
            if t.device.type == device_type:
                s = t.untyped_storage()
                storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())

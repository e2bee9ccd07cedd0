"""``torch.ops.bitlab.bitlinear``: the inference forward of a BitLinear layer as one custom op.

Why an op: ``torch.compile`` cannot trace the registry (dicts, a lock, context
variables, environment variables, data pointers) and does not need to.  The
choice depends only on the config, the device, the shape and the forced
backend, and ``prepare`` runs once per layer, kernel and device.  Wrapping
"select, prepare once, run" in a custom op with a fake implementation gives
dynamo one opaque node whose output shape it knows: no graph break, and the
selection still happens at run time, so ``force_backend`` and
``$BITLAB_BACKEND`` keep working inside a compiled model.

Prepared weights are cached per layer in a :class:`PreparedCache`; the op
finds the cache by its integer id and checks a stamp (data pointer and
version counter of ``qweight`` and ``weight_scale``), so in-place changes or
replaced tensors are re-prepared, never served stale.  An id with no live
cache (e.g. ``opcheck`` calling the op directly) prepares without caching.

Example::

    y = torch.ops.bitlab.bitlinear(x2d, layer.qweight, layer.weight_scale, layer.bias,
                                   config_spec(cfg), in_features, "none", "", -1)
"""
from __future__ import annotations

import functools
import itertools
import json
import threading
import weakref
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from bitcore.config import BitQuantConfig
from bitcore.kernels.interface import BitKernel
from bitcore.packing import PackedWeight

_ids = itertools.count(1)
_caches: "weakref.WeakValueDictionary[int, PreparedCache]" = weakref.WeakValueDictionary()


def config_spec(cfg: BitQuantConfig) -> str:
    """The config as the string the op carries (a custom op takes no dataclasses)."""
    return json.dumps(cfg.to_dict(), sort_keys=True)


@functools.lru_cache(maxsize=256)
def config_from_spec(spec: str) -> BitQuantConfig:
    return BitQuantConfig.from_dict(json.loads(spec))


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter
        return -1


class PreparedCache:
    """A layer's prepared weights per (kernel, device), each stamped with the tensors it came from."""

    def __init__(self) -> None:
        self.id = next(_ids)
        self._entries: Dict[Tuple[str, str], Tuple[tuple, Any]] = {}
        self._lock = threading.Lock()
        _caches[self.id] = self

    def __reduce__(self):
        # copy.deepcopy / pickle of a layer get a new, empty cache of their own (prepared weights are derived data)
        return (PreparedCache, ())

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, kernel: BitKernel, device: torch.device, stamp: tuple, make: Callable[[], Any]) -> Any:
        key = (kernel.name, str(device))
        entry = self._entries.get(key)
        if entry is not None and entry[0] == stamp:
            return entry[1]
        prepared = make()  # outside the lock: prepare may be slow; two threads may both prepare, one wins
        with self._lock:
            self._entries[key] = (stamp, prepared)
        return prepared


def resolve(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    config: BitQuantConfig,
    in_features: int,
    backend: Optional[str],
    cache_id: int,
) -> Tuple[BitKernel, Any]:
    """(kernel, prepared weight) for this call: the registry's choice, prepared once per layer."""
    from bitcore.kernels import KernelRegistry

    out_features = qweight.shape[0]
    kernel = KernelRegistry.get_kernel_for_config(
        config, x.device, backend=backend or None, in_features=in_features, out_features=out_features
    )

    def make():
        packed = PackedWeight(
            data=qweight,
            scale=weight_scale,
            weight_bits=config.weight_bits,
            in_features=in_features,
            out_features=out_features,
            granularity=config.weight_granularity,
            group_size=config.group_size if config.weight_granularity == "per_group" else None,
        )
        return kernel.prepare(packed, config)

    cache = _caches.get(cache_id)
    if cache is None:
        return kernel, make()
    stamp = (qweight.data_ptr(), _version(qweight), weight_scale.data_ptr(), _version(weight_scale))
    return kernel, cache.get(kernel, x.device, stamp, make)


@torch.library.custom_op("bitlab::bitlinear", mutates_args=())
def bitlinear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    config: str,
    in_features: int,
    activation: str,
    backend: str,
    cache_id: int,
) -> torch.Tensor:
    """``x [tokens, in_features]`` -> ``[tokens, out_features]`` in x.dtype through the registry's kernel."""
    cfg = config_from_spec(config)
    kernel, prepared = resolve(x, qweight, weight_scale, cfg, in_features, backend, cache_id)
    return kernel.forward(x, prepared, bias, activation)


@bitlinear.register_fake
def _bitlinear_fake(x, qweight, weight_scale, bias, config, in_features, activation, backend, cache_id):
    if x.dim() != 2 or x.shape[1] != in_features:
        raise ValueError(f"bitlab::bitlinear: x must be [tokens, {in_features}], got {tuple(x.shape)}")
    return x.new_empty(x.shape[0], qweight.shape[0])


def _setup_context(ctx, inputs, output) -> None:
    x, qweight, weight_scale, bias, config, in_features, activation, _backend, _cache_id = inputs
    ctx.config, ctx.in_features, ctx.activation = config, in_features, activation
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.needs_x = ctx.needs_input_grad[0]
    # Save only what the backward uses; weights packed under inference_mode cannot be saved as they are.
    saved = [t.clone() if t.is_inference() else t for t in (x, qweight, weight_scale)] if ctx.needs_x else []
    ctx.save_for_backward(output if activation != "none" else None, *saved)


def _backward(ctx, grad: torch.Tensor):
    """Straight-through gradients of the frozen layer, as in training: weights are constants,
    int8 / float activations pass the gradient through, binary ones through ``scale * 1{|x| <= 1}``."""
    from bitcore.packing import dequantize
    from bitcore.quantize import quantize_activation_binary

    y, *saved = ctx.saved_tensors
    g = grad.float()
    if ctx.activation == "relu":
        g = g * (y > 0)
    elif ctx.activation == "relu2":  # y = relu(p)**2, dy/dp = 2 relu(p) = 2 sqrt(y)
        g = g * 2 * y.float().clamp_min(0).sqrt()
    grad_x = None
    if ctx.needs_x:
        x, qweight, weight_scale = saved
        cfg = config_from_spec(ctx.config)
        group = cfg.group_size if cfg.weight_granularity == "per_group" else None
        packed = PackedWeight(qweight, weight_scale, cfg.weight_bits, ctx.in_features, qweight.shape[0],
                              cfg.weight_granularity, group)
        grad_x = g @ dequantize(packed, torch.float32)
        if cfg.activation_dtype == "binary":
            _, scale = quantize_activation_binary(x, cfg.activation_granularity)
            grad_x = grad_x * scale * (x.abs() <= 1)
        grad_x = grad_x.to(x.dtype)
    grad_bias = None if ctx.bias_dtype is None else g.sum(dim=0).to(ctx.bias_dtype)
    return grad_x, None, None, grad_bias, None, None, None, None, None


bitlinear.register_autograd(_backward, setup_context=_setup_context)


__all__ = ["bitlinear", "PreparedCache", "config_spec", "config_from_spec", "resolve"]

"""The kernel interface every backend implements.

A kernel computes ``y = epilogue(dequant(x) @ dequant(W).T * scales + bias)``
for the keys it declares, exactly as ``backends/torch_ref`` does (the
reference), from the canonical packed weight (:mod:`bitcore.packing`) and the
quantizers' definitions (:mod:`bitcore.quantize`).

A kernel declares:

* ``keys``: the :class:`KernelKey` s it serves (weight bits, activation dtype,
  weight granularity, activation granularity);
* ``devices``: device types (``"cpu"``, ``"cuda"``);
* ``priority``: higher wins among eligible kernels; ties break by name;
* ``check_shape``: shape limits (return a reason string to refuse);
* ``availability``: whether it can run on this machine, with the reason.

The call sequence is ``prepared = kernel.prepare(packed, config)`` once, then
``kernel.forward(x, prepared, bias, activation)`` per call, where ``x`` is
``[tokens, in_features]`` in float32, float16 or bfloat16 (contiguous or
strided; BitLinear brings other float dtypes to float32 first), ``bias`` is
``[out_features]`` in any of those dtypes or None, and ``activation`` is one of :data:`EPILOGUES` (``relu2`` is
squared ReLU), applied after the bias.  The output has ``x``'s dtype.

Example (a third-party kernel)::

    class MyTernaryKernel(BitKernel):
        backend = "my_backend"
        keys = keys_product(weight_bits=[1.58], activation_dtypes=["float32"])
        devices = frozenset({"cpu"})
        priority = 50

        def forward(self, x, prepared, bias=None, activation="none"):
            ...
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Union

import torch

from bitcore.config import (
    ACTIVATION_DTYPES,
    ACTIVATION_GRANULARITIES,
    WEIGHT_BITS,
    WEIGHT_GRANULARITIES,
    BitQuantConfig,
)
from bitcore.packing import PackedWeight

EPILOGUES = ("none", "relu", "relu2")
NO_GRANULARITY = "none"  # activation granularity of float-activation keys


@dataclass(frozen=True, order=True)
class KernelKey:
    """What a kernel computes: (weight bits, activation dtype, weight / activation granularity)."""

    weight_bits: float
    activation_dtype: str
    weight_granularity: str
    activation_granularity: str

    @classmethod
    def from_config(cls, cfg: BitQuantConfig) -> "KernelKey":
        act_gran = NO_GRANULARITY if cfg.float_activations else cfg.activation_granularity
        return cls(float(cfg.weight_bits), cfg.activation_dtype, cfg.weight_granularity, act_gran)

    def __str__(self) -> str:
        bits = "1.58" if self.weight_bits == 1.58 else str(int(self.weight_bits))
        return f"w{bits}/{self.activation_dtype}/{self.weight_granularity}/{self.activation_granularity}"


def keys_product(
    weight_bits: Iterable = WEIGHT_BITS,
    activation_dtypes: Iterable[str] = ACTIVATION_DTYPES,
    weight_granularities: Iterable[str] = WEIGHT_GRANULARITIES,
    activation_granularities: Iterable[str] = ACTIVATION_GRANULARITIES,
) -> frozenset:
    """All keys in the product of the given choices (float activations get granularity "none")."""
    keys = set()
    for bits, act, wg, ag in itertools.product(
        weight_bits, activation_dtypes, weight_granularities, activation_granularities
    ):
        float_act = act in ("float32", "float16", "bfloat16")
        keys.add(KernelKey(float(bits), act, wg, NO_GRANULARITY if float_act else ag))
    return frozenset(keys)


ALL_KEYS = keys_product()


@dataclass(frozen=True)
class Availability:
    """Whether a kernel or backend can run here; ``reason`` says why not (or what it runs on)."""

    available: bool
    reason: str = ""

    @classmethod
    def yes(cls, detail: str = "") -> "Availability":
        return cls(True, detail)

    @classmethod
    def no(cls, reason: str) -> "Availability":
        return cls(False, reason)

    def __bool__(self) -> bool:
        return self.available


class BitKernel:
    """Base class of kernels.  Subclasses set the class attributes and implement ``forward``."""

    backend: str = "unnamed"
    keys: frozenset = frozenset()
    devices: frozenset = frozenset({"cpu"})
    priority: int = 0
    has_cpp_backend: bool = False
    epilogues: frozenset = frozenset(EPILOGUES)

    @property
    def name(self) -> str:
        return f"{self.backend}.{type(self).__name__}"

    def serves(self, key: KernelKey) -> bool:
        return key in self.keys

    def availability(self) -> Availability:
        """Override to report a missing extension, driver or device (with the reason)."""
        return Availability.yes()

    def check_shape(self, in_features: int, out_features: int) -> Optional[str]:
        """Return a reason string when this kernel cannot serve the shape, else None."""
        return None

    def self_check(self) -> Optional[str]:
        """Quick correctness probe the registry runs once, before first choosing this kernel.

        Return a failure reason (the kernel is then rejected, and ``explain`` says why) or None.
        The default compares one tiny random problem per (weight bits, activation dtype) with the
        reference backend (:mod:`bitcore.kernels.self_check`); override it with a cheaper probe.
        """
        from bitcore.kernels.self_check import reference_self_check

        return reference_self_check(self)

    def prepare(self, packed: PackedWeight, config: BitQuantConfig) -> Any:
        """Re-layout the canonical packed weight once for this kernel; keep what ``forward`` needs.

        ``config`` says how activations are treated (its key is one this kernel serves).
        Called once per (layer, kernel, device); ``forward`` then runs with no re-layout.
        """
        raise NotImplementedError

    def forward(
        self,
        x: torch.Tensor,
        prepared: Any,
        bias: Optional[torch.Tensor] = None,
        activation: str = "none",
    ) -> torch.Tensor:
        """``x [tokens, in_features]`` (float, contiguous or strided) -> ``[tokens, out_features]`` in x.dtype."""
        raise NotImplementedError

    def accepts_quantized(self, prepared: Any) -> bool:
        """Whether :meth:`forward_quantized` serves this prepared weight (int8-activation keys only)."""
        return False

    def forward_quantized(
        self,
        xq: torch.Tensor,
        x_scale: torch.Tensor,
        prepared: Any,
        bias: Optional[torch.Tensor] = None,
        activation: str = "none",
        out_dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """``forward`` for activations the caller already quantized: ``xq [tokens, in_features]`` int8 and
        ``x_scale`` float32 ``[tokens, 1]`` (per token) or ``[1, 1]`` (per tensor), exactly as
        :func:`bitcore.quantize.quantize_activation_int8` returns them for the weight's config.

        Optional (see :meth:`accepts_quantized`): it lets a model fuse the activation quantization
        into the operation before a projection (a norm, say) instead of paying a separate pass.
        """
        raise NotImplementedError(f"{self.name} does not take pre-quantized activations")

    def route(self, batch: int) -> str:
        """Which internal path serves ``batch`` rows (for explain / logs)."""
        return type(self).__name__

    def __repr__(self) -> str:
        return f"<{self.name} priority={self.priority} devices={sorted(self.devices)}>"


def check_quantized_input(xq: torch.Tensor, x_scale: torch.Tensor, in_features: int) -> None:
    """Validate :meth:`BitKernel.forward_quantized` inputs; raises ValueError naming the problem."""
    if xq.dtype != torch.int8 or xq.dim() != 2 or xq.shape[1] != in_features:
        raise ValueError(
            f"xq must be int8 [tokens, in_features={in_features}]; got {xq.dtype} {tuple(xq.shape)}"
        )
    if x_scale.dtype != torch.float32 or x_scale.numel() not in (1, xq.shape[0]) or x_scale.device != xq.device:
        raise ValueError(
            f"x_scale must be float32 with 1 or {xq.shape[0]} elements on {xq.device}; "
            f"got {x_scale.dtype} {tuple(x_scale.shape)} on {x_scale.device}"
        )


def device_type(device: Union[str, torch.device, None]) -> str:
    if device is None:
        return "cpu"
    return torch.device(device).type

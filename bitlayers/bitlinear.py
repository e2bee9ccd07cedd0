"""BitLinear: a drop-in ``nn.Linear`` with low-bit weights (and optionally activations).

Two states:

* **training** (``layer.train()``): latent full-precision ``weight``; the
  forward fake-quantizes weights and activations (:mod:`bitcore.quantize`) and
  gradients pass straight through.
* **inference** (``layer.eval()``): the weight is quantized and packed into
  ``qweight`` (uint8, :mod:`bitcore.packing`) and ``weight_scale`` (float32);
  the forward runs the kernel the registry picks for the layer's device.

``freeze()`` packs and drops the latent weight for deployment: a frozen layer
always computes with its packed weights.  ``state_dict`` round-trips in every
state.

Example::

    layer = BitLinear(512, 256, quant_config=BitQuantConfig(weight_bits=1.58))
    layer.eval()
    y = layer(torch.randn(4, 512))
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from bitcore.config import BitQuantConfig
from bitcore.errors import CheckpointError
from bitcore.kernels import EPILOGUES, KernelRegistry
from bitcore.kernels.interface import BitKernel
from bitcore.kernels.ops import PreparedCache, config_spec, resolve
from bitcore.packing import PackedWeight, pack_weight, row_bytes, scale_shape
from bitcore.quantize import fake_quantize_activation, fake_quantize_weight, quantize_weight


KERNEL_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _as_config(quant_config: Union[BitQuantConfig, dict, None]) -> BitQuantConfig:
    if quant_config is None:
        return BitQuantConfig()
    if isinstance(quant_config, BitQuantConfig):
        return quant_config
    if isinstance(quant_config, dict):
        return BitQuantConfig.from_dict(quant_config)
    raise TypeError(f"quant_config must be a BitQuantConfig or dict, got {type(quant_config).__name__}")


class BitLinear(nn.Module):
    """Low-bit linear layer; see the module docstring."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        quant_config: Union[BitQuantConfig, dict, None] = None,
        *,
        fused_activation: str = "none",
        backend: Optional[str] = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BitLinear {name}: got {value!r}; expected a positive integer")
        if fused_activation not in EPILOGUES:
            raise ValueError(f"fused_activation: got {fused_activation!r}; allowed values are {list(EPILOGUES)}")
        self.in_features = in_features
        self.out_features = out_features
        self.quant_config = quant_config
        self.fused_activation = fused_activation
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.register_buffer("qweight", None)
        self.register_buffer("weight_scale", None)
        self._packed_from: Optional[Tuple[int, int]] = None
        self._prepared = PreparedCache()
        self.reset_parameters()

    # ------------------------------------------------------------ state
    @property
    def quant_config(self) -> BitQuantConfig:
        return self._quant_config

    @quant_config.setter
    def quant_config(self, value: Union[BitQuantConfig, dict, None]) -> None:
        cfg = _as_config(value)
        object.__setattr__(self, "_quant_config", cfg)
        object.__setattr__(self, "_config_spec", config_spec(cfg))  # the string the dispatch op carries
        if getattr(self, "_prepared", None) is not None:
            self._prepared.clear()

    def reset_parameters(self) -> None:
        """nn.Linear's initialization."""
        if self.weight is None:
            return
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)
        self._invalidate_packed()

    @property
    def frozen(self) -> bool:
        """True once ``freeze()`` dropped the latent weight."""
        return self.weight is None

    @property
    def packed(self) -> bool:
        return self.qweight is not None

    def _weight_stamp(self) -> Tuple[int, int]:
        return (self.weight._version, self.weight.data_ptr())

    def _invalidate_packed(self) -> None:
        self._packed_from = None
        self._prepared.clear()

    def quantize_weights(self) -> None:
        """Quantize and pack the latent weight into ``qweight`` / ``weight_scale``."""
        if self.frozen:
            return
        cfg = self.quant_config
        with torch.no_grad():
            values, scale = quantize_weight(self.weight, cfg)
            packed = pack_weight(values, scale, cfg.weight_bits, cfg.weight_granularity, cfg.group_size)
        self.qweight = packed.data
        self.weight_scale = packed.scale
        self._packed_from = self._weight_stamp()
        self._prepared.clear()

    def _ensure_packed(self) -> None:
        if self.frozen:
            return
        if self.qweight is None or self._packed_from != self._weight_stamp():
            self.quantize_weights()

    def train(self, mode: bool = True) -> "BitLinear":
        super().train(mode)
        if not mode:
            self._ensure_packed()
        return self

    def freeze(self) -> "BitLinear":
        """Pack the weights and drop the latent full-precision copy (for deployment)."""
        self._ensure_packed()
        if self.weight is not None:
            del self._parameters["weight"]
            self.register_parameter("weight", None)
        self._packed_from = None
        return self.eval()

    def packed_weight(self) -> PackedWeight:
        """The canonical packed weight (quantizing first when needed)."""
        self._ensure_packed()
        cfg = self.quant_config
        return PackedWeight(
            data=self.qweight,
            scale=self.weight_scale,
            weight_bits=cfg.weight_bits,
            in_features=self.in_features,
            out_features=self.out_features,
            granularity=cfg.weight_granularity,
            group_size=cfg.group_size if cfg.weight_granularity == "per_group" else None,
        )

    def weight_memory_bytes(self) -> int:
        """True bytes of the packed weight and its scales (ternary counts 2 bits per weight)."""
        return self.packed_weight().nbytes()

    # --------------------------------------------------------- dispatch
    def _device(self) -> torch.device:
        t = self.weight if self.weight is not None else self.qweight
        return t.device

    def kernel(self, device: Union[str, torch.device, None] = None) -> BitKernel:
        """The kernel the registry picks for this layer on ``device`` (default: the layer's)."""
        return KernelRegistry.get_kernel_for_config(
            self.quant_config,
            device or self._device(),
            backend=self.backend,
            in_features=self.in_features,
            out_features=self.out_features,
        )

    def explain(self, device: Union[str, torch.device, None] = None):
        return KernelRegistry.explain(
            self.quant_config,
            device or self._device(),
            backend=self.backend,
            in_features=self.in_features,
            out_features=self.out_features,
        )

    # ---------------------------------------------------------- forward
    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"BitLinear expects a torch.Tensor, got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise TypeError(
                f"BitLinear expects a floating-point input (float32/float16/bfloat16/float64), got {x.dtype}"
            )
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"BitLinear expected input with last dimension in_features={self.in_features}, "
                f"got shape {tuple(x.shape)}"
            )
        device = self._device()
        if x.device != device and not (x.device.type == device.type and device.index is None):
            raise RuntimeError(
                f"BitLinear input is on {x.device} but the layer's weights are on {device}; "
                f"move one of them (layer.to({str(x.device)!r}) or x.to({str(device)!r}))"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self.training and not self.frozen:
            return self._forward_fake_quant(x)
        if not torch.compiler.is_compiling():
            self._ensure_packed()  # reads data pointers: not traceable, and done by eval() already
        elif self.qweight is None:
            raise RuntimeError(
                "BitLinear: no packed weights to compile against; call layer.eval() (or quantize_weights()) "
                "before running the compiled model"
            )
        # Kernel selection, prepare-once and the kernel run are one custom op (see bitcore.kernels.ops),
        # so torch.compile sees a single node with a known output shape instead of breaking the graph.
        x2, bias = x.reshape(-1, self.in_features), self.bias
        if x2.dtype not in KERNEL_INPUT_DTYPES:
            # Kernels take float32/float16/bfloat16 (the contract computes in float32 anyway): a float64 model
            # runs its packed layers through float32 and gets float64 back.
            x2 = x2.float()
            bias = None if bias is None else bias.float()
        y = torch.ops.bitlab.bitlinear(
            x2, self.qweight, self.weight_scale, bias,
            self._config_spec, self.in_features, self.fused_activation, self.backend or "", self._prepared.id,
        )
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _forward_fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.quant_config
        w = fake_quantize_weight(self.weight, cfg)
        xq = fake_quantize_activation(x, cfg)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        y = F.linear(xq.to(dtype), w.to(dtype), bias)
        if self.fused_activation == "relu":
            y = torch.relu(y)
        elif self.fused_activation == "relu2":
            y = torch.relu(y).square()
        return y

    # ----------------------------------------------------- module hooks
    def _apply(self, fn, recurse=True):
        scale = self.weight_scale
        super()._apply(fn, recurse)
        if scale is not None:
            # Scales stay float32 whatever dtype the module moves to; only the device follows.
            self.weight_scale = scale.to(device=fn(scale).device)
        if self.weight is not None and self._packed_from is not None:
            self._packed_from = self._weight_stamp()
        self._prepared.clear()
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        qkey, skey, wkey = prefix + "qweight", prefix + "weight_scale", prefix + "weight"
        if qkey in state_dict:
            cfg = self.quant_config
            expected = (self.out_features, row_bytes(self.in_features, cfg.weight_bits))
            _check_tensor(state_dict, qkey, expected, torch.uint8)
            expected_scale = scale_shape(
                cfg.weight_granularity, self.out_features, self.in_features, cfg.group_size
            )
            if skey not in state_dict:
                raise CheckpointError(f"{skey}: missing from the checkpoint (it holds {qkey})")
            _check_tensor(state_dict, skey, expected_scale, torch.float32)
            _check_packed_contents(state_dict[qkey], state_dict[skey], qkey, skey, cfg)
            device = self._device()
            self.qweight = torch.empty(expected, dtype=torch.uint8, device=device)
            self.weight_scale = torch.empty(expected_scale, dtype=torch.float32, device=device)
            if wkey not in state_dict and self.weight is not None:
                del self._parameters["weight"]
                self.register_parameter("weight", None)
        elif wkey in state_dict and self.weight is None:
            self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features, device=self._device()))
            self.qweight = None
            self.weight_scale = None
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._prepared.clear()
        if qkey in state_dict and self.weight is not None:
            self._packed_from = self._weight_stamp()  # trust the checkpoint's packed weights
        elif self.weight is not None:
            self._packed_from = None

    def extra_repr(self) -> str:
        cfg = self.quant_config
        try:
            kernel = self.kernel().name
        except Exception as exc:  # repr must never raise; say why there is no kernel
            kernel = f"none ({type(exc).__name__})"
        state = "frozen" if self.frozen else ("packed" if self.packed else "latent")
        extra = f", fused_activation={self.fused_activation}" if self.fused_activation != "none" else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant={cfg.describe()}, storage_bits={cfg.storage_bits}, state={state}, kernel={kernel}{extra}"
        )


def _check_tensor(state_dict: dict, key: str, shape: tuple, dtype: torch.dtype) -> None:
    t = state_dict[key]
    if tuple(t.shape) != tuple(shape):
        raise CheckpointError(f"{key}: shape {tuple(t.shape)} does not match the layer, expected {tuple(shape)}")
    if t.dtype != dtype:
        raise CheckpointError(f"{key}: dtype {t.dtype} does not match the layer, expected {dtype}")


def _check_packed_contents(qweight: torch.Tensor, scale: torch.Tensor, qkey: str, skey: str, cfg: BitQuantConfig) -> None:
    """Reject bit patterns no quantizer writes: a corrupted checkpoint must fail at load, not compute garbage."""
    if qweight.device.type == "meta":
        return
    if cfg.weight_bits == 1.58:
        q = qweight.to(torch.uint8)
        bad = int(((q & 0x55) & ((q >> 1) & 0x55)).ne(0).sum())  # a 2-bit code of 3 (both bits set)
        if bad:
            raise CheckpointError(
                f"{qkey}: {bad} byte(s) hold the ternary code 3, which no ternary weight packs to "
                f"(codes are 0 -> 0, 1 -> +1, 2 -> -1): the checkpoint is corrupted"
            )
    if scale.numel() and not bool(torch.isfinite(scale).all()):
        bad = int((~torch.isfinite(scale)).sum())
        raise CheckpointError(f"{skey}: {bad} NaN/Inf scale value(s); the checkpoint is corrupted")

"""pluggy plugin registering the numba_cuda backend: kernels written in Python with numba.cuda.

Three kernels, all on CUDA devices at priority 50 (below cuda_ext, above torch_ref):

* :class:`NumbaFloatKernel`  ternary / binary weights x float32, float16, bfloat16 activations;
* :class:`NumbaInt8Kernel`   ternary / binary weights x int8 activations (per tensor or per token);
* :class:`NumbaXnorKernel`   binary weights x binary activations (XNOR + popcount).

Weight scales per tensor or per output channel.  ``forward`` works on torch CUDA
tensors in place (``numba.cuda.as_cuda_array``) and launches on torch's current
stream, so it can be captured in a CUDA graph; the only allocation per call is
the output (plus, for int8 / binary activations, the quantized activation that
:mod:`bitcore.quantize` computes with torch ops, so it matches bit for bit).

``run`` is the same path with the array conversion and stream passed in: tests
call it under numba's CUDA simulator with NumPy views of CPU tensors.

Importing this module does not import numba; availability says why the backend
cannot run (numba missing, simulator active, no GPU, no driver for numba).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Optional

import torch

from bitcore.config import BitQuantConfig
from bitcore.hookspecs import BackendSpec, hookimpl
from bitcore.kernels.interface import EPILOGUES, Availability, BitKernel, keys_product
from bitcore.packing import PackedWeight
from bitcore.quantize import quantize_activation_binary, quantize_activation_int8

PRIORITY = 50
WEIGHT_GRANULARITIES = ("per_tensor", "per_channel")
ACTIVATION_GRANULARITIES = ("per_tensor", "per_token")
FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def numba_availability() -> Availability:
    """Whether numba can run kernels on a CUDA device here, and if not, why."""
    if importlib.util.find_spec("numba") is None:
        return Availability.no("numba is not installed (pip install 'bitlab[numba]'; on CUDA 12+ also numba-cuda)")
    try:
        import numba
        from numba import config, cuda
    except Exception as exc:  # a broken numba install must not break dispatch
        return Availability.no(f"numba.cuda cannot be imported: {type(exc).__name__}: {exc}")
    if config.ENABLE_CUDASIM:
        return Availability.no(
            "numba's CUDA simulator is active (NUMBA_ENABLE_CUDASIM=1): the kernels run on NumPy arrays "
            "for tests only, not on a device"
        )
    if not torch.cuda.is_available():
        return Availability.no("torch sees no CUDA device")
    if not cuda.is_available():
        from numba.cuda.cudadrv.driver import driver

        why = getattr(driver, "initialization_error", None) or "no CUDA driver or device found by numba"
        return Availability.no(f"numba.cuda cannot use the GPU: {why} (is numba-cuda installed for this CUDA?)")
    return Availability.yes(f"numba {numba.__version__} on {torch.cuda.get_device_name()}")


@dataclass
class NumbaWeight:
    """A weight re-laid for one numba kernel (see :mod:`backends.numba_cuda.layout`)."""

    words: torch.Tensor  # int64 [out_features, words per row]
    scale: torch.Tensor  # float32 [1] (per tensor) or [out_features] (per channel)
    scale_stride: int  # 0 per tensor, 1 per channel
    in_features: int
    out_features: int
    weight_bits: float
    config: BitQuantConfig
    unused: torch.Tensor  # float32 [1, 1]: stands in for an absent bias / activation scale
    _arrays: dict = field(default_factory=dict, repr=False)

    def arrays(self, as_array: Callable) -> tuple:
        """(words, scale, unused [1, 1], unused [1]) as kernel arrays, converted once per ``as_array``."""
        cached = self._arrays.get(as_array)
        if cached is None:
            cached = tuple(as_array(t) for t in (self.words, self.scale, self.unused, self.unused.view(-1)))
            self._arrays[as_array] = cached
        return cached


def cuda_view(t: torch.Tensor):
    """Zero-copy numba view of a CUDA tensor; no stream sync (we launch on torch's stream anyway)."""
    from numba import cuda

    return cuda.as_cuda_array(t, sync=False)


@lru_cache(maxsize=64)
def numba_stream(handle: int):
    """numba's view of a CUDA stream handle (torch's current stream), made once per handle."""
    from numba import cuda

    return cuda.external_stream(handle)


def numpy_view(t: torch.Tensor):
    """Zero-copy NumPy view of a CPU tensor, for the CUDA simulator."""
    return t.numpy()


def _kind_and_view(t: torch.Tensor) -> tuple:
    """("bf16bits", int16 view) for bfloat16 (numba has no bfloat16 arrays), else ("float", t)."""
    if t.dtype == torch.bfloat16:
        return "bf16bits", t.view(torch.int16)
    return "float", t


class _NumbaKernel(BitKernel):
    backend = "numba_cuda"
    devices = frozenset({"cuda"})
    priority = PRIORITY

    # -------------------------------------------------------------- setup
    def prepare(self, packed: PackedWeight, config: BitQuantConfig) -> NumbaWeight:
        from bitcore.kernels.interface import KernelKey

        key = KernelKey.from_config(config)
        if not self.serves(key):
            raise ValueError(f"{self.name} does not serve {key}; it serves {sorted(map(str, self.keys))}")
        if packed.weight_bits != config.weight_bits or packed.granularity != config.weight_granularity:
            raise ValueError(
                f"packed weight ({packed.weight_bits} bits, {packed.granularity}) does not match the config "
                f"({config.weight_bits} bits, {config.weight_granularity})"
            )
        return NumbaWeight(
            words=self._layout(packed),
            scale=packed.scale.reshape(-1).contiguous(),
            scale_stride=0 if packed.granularity == "per_tensor" else 1,
            in_features=packed.in_features,
            out_features=packed.out_features,
            weight_bits=packed.weight_bits,
            config=config,
            unused=torch.zeros(1, 1, dtype=torch.float32, device=packed.device),
        )

    def _layout(self, packed: PackedWeight) -> torch.Tensor:
        raise NotImplementedError

    def route(self, batch: int) -> str:
        from backends.numba_cuda.kernels import launch_shape

        rows, tokens, warps = launch_shape(1, batch)
        return f"{type(self).__name__}(rows/block={rows}, tokens/block={tokens}, warps/block={warps})"

    def availability(self) -> Availability:
        return numba_availability()

    def self_check(self) -> Optional[str]:
        """One small random problem against the reference, compiled and run on the GPU."""
        from backends.torch_ref.kernels import TorchReferenceKernel
        from bitcore.kernels.registry import config_for_key
        from bitcore.packing import pack_weight
        from bitcore.quantize import quantize_weight

        cfg = config_for_key(min(self.keys))
        gen = torch.Generator().manual_seed(0)
        values, scale = quantize_weight(torch.randn(19, 77, generator=gen), cfg)
        x = torch.randn(3, 77, generator=gen).cuda()
        packed = pack_weight(values.cuda(), scale.cuda(), cfg.weight_bits, cfg.weight_granularity)
        ref_kernel = TorchReferenceKernel()
        want = ref_kernel.forward(x, ref_kernel.prepare(packed, cfg))
        got = self.forward(x, self.prepare(packed, cfg))
        err = float((got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-30))
        if not err < 1e-4:
            return f"relative error {err:.3g} against torch_ref on a 19x77 probe (expected < 1e-4)"
        return None

    # ------------------------------------------------------------ compute
    def forward(self, x, prepared, bias=None, activation="none"):
        if x.device.type != "cuda":
            raise ValueError(f"{self.name} runs on CUDA tensors; got x on {x.device}")
        with torch.cuda.device(x.device):
            stream = numba_stream(torch.cuda.current_stream(x.device).cuda_stream)
            return self.run(x, prepared, bias, activation, as_array=cuda_view, stream=stream)

    def run(
        self,
        x: torch.Tensor,
        prepared: NumbaWeight,
        bias: Optional[torch.Tensor],
        activation: str,
        as_array: Callable,
        stream,
    ) -> torch.Tensor:
        """``forward`` with the tensor-to-array conversion and the stream given (GPU or simulator)."""
        from backends.numba_cuda import kernels as K

        if activation not in EPILOGUES:
            raise ValueError(f"activation: got {activation!r}; allowed values are {list(EPILOGUES)}")
        if x.dim() != 2 or x.shape[1] != prepared.in_features:
            raise ValueError(
                f"x must be [tokens, {prepared.in_features}] for this weight; got shape {tuple(x.shape)}"
            )
        if not x.dtype.is_floating_point:
            raise ValueError(f"x must be floating point; got {x.dtype}")
        if bias is not None and tuple(bias.shape) != (prepared.out_features,):
            raise ValueError(f"bias must have shape ({prepared.out_features},); got {tuple(bias.shape)}")
        x = x.detach()
        n_tok, n_out = x.shape[0], prepared.out_features
        out = torch.empty(n_tok, n_out, dtype=x.dtype, device=x.device)
        if n_tok == 0:
            return out
        out_kind, out_view = _kind_and_view(out)
        words, scale, unused, unused_flat = prepared.arrays(as_array)
        if bias is None:
            bias_kind, bias_array, has_bias = "float", unused_flat, 0
        else:
            bias_kind, bias_view = _kind_and_view(bias.detach())
            bias_array, has_bias = as_array(bias_view), 1
        x_in, x_kind, x_scale = self._activations(x, prepared.config)
        kernel, grid, block = self._kernel_and_grid(prepared, x_kind, out_kind, bias_kind, n_tok)
        x_flat, x_stride = self._flat_rows(x_in)
        K.launch(
            kernel, grid, block, stream,
            as_array(out_view), as_array(x_flat), x_stride, words, scale,
            prepared.scale_stride, unused if x_scale is None else as_array(x_scale),
            bias_array, has_bias, K.EPILOGUE_CODES[activation], n_out, prepared.in_features, n_tok,
        )
        return out

    def _activations(self, x: torch.Tensor, cfg: BitQuantConfig) -> tuple:
        """(activation tensor for the kernel, its x_kind, its [tokens, 1] scale or None)."""
        raise NotImplementedError

    @staticmethod
    def _flat_rows(x: torch.Tensor) -> tuple:
        """(flat view, row stride) of ``x [tokens, k]``: token t's input k is ``flat[t * stride + k]``."""
        if x.stride(1) != 1 and x.shape[1] > 1:
            x = x.contiguous()  # the only copy: an activation whose inputs are not adjacent
        stride = x.stride(0) if x.shape[0] > 1 else x.shape[1]
        return x.as_strided(((x.shape[0] - 1) * stride + x.shape[1],), (1,)), stride

    def _kernel_and_grid(self, prepared: NumbaWeight, x_kind: str, out_kind: str, bias_kind: str, n_tok: int):
        """(compiled kernel, grid, block) for this problem."""
        from backends.numba_cuda import kernels as K

        bits = 2 if prepared.weight_bits == 1.58 else 1
        rows, tokens, warps = K.launch_shape(prepared.out_features, n_tok)
        kernel = K.sign_code_kernel(bits, x_kind, out_kind, bias_kind, rows, tokens, warps)
        return (kernel, *K.sign_code_grid(prepared.out_features, n_tok, rows, tokens, warps))


class NumbaFloatKernel(_NumbaKernel):
    """Ternary / binary weights with float activations: float32 accumulation of sign codes."""

    keys = keys_product([1.58, 1], list(FLOAT_DTYPES), WEIGHT_GRANULARITIES)

    def _layout(self, packed):
        from backends.numba_cuda.layout import interleave_sign_codes

        return interleave_sign_codes(packed)

    def _activations(self, x, cfg):
        act_dtype = FLOAT_DTYPES[cfg.activation_dtype]
        if x.dtype != act_dtype:  # the reference rounds x to the activation dtype first
            x = x.to(act_dtype)
        kind, view = _kind_and_view(x)
        return view, kind, None


class NumbaInt8Kernel(_NumbaKernel):
    """Ternary / binary weights with int8 absmax activations: exact int32 accumulation."""

    keys = keys_product([1.58, 1], ["int8"], WEIGHT_GRANULARITIES, ACTIVATION_GRANULARITIES)

    def _layout(self, packed):
        from backends.numba_cuda.layout import interleave_sign_codes

        return interleave_sign_codes(packed)

    def _activations(self, x, cfg):
        xq, x_scale = quantize_activation_int8(x, cfg.activation_granularity)
        return xq, "int8", x_scale


class NumbaXnorKernel(_NumbaKernel):
    """Binary weights with binary activations: XNOR + popcount, exact."""

    keys = keys_product([1], ["binary"], WEIGHT_GRANULARITIES, ACTIVATION_GRANULARITIES)

    def _layout(self, packed):
        from backends.numba_cuda.layout import weight_sign_words

        return weight_sign_words(packed)

    def _activations(self, x, cfg):
        signs, x_scale = quantize_activation_binary(x, cfg.activation_granularity)
        return signs, "int8", x_scale

    def _kernel_and_grid(self, prepared, x_kind, out_kind, bias_kind, n_tok):
        from backends.numba_cuda import kernels as K
        from backends.numba_cuda import xnor

        rows, tokens, _ = K.launch_shape(prepared.out_features, n_tok)
        kernel = xnor.xnor_kernel(out_kind, bias_kind, rows, tokens)
        return (kernel, *xnor.xnor_grid(prepared.out_features, n_tok, rows, tokens))


KERNELS = (NumbaFloatKernel, NumbaInt8Kernel, NumbaXnorKernel)


@hookimpl
def bitlab_register_backend() -> BackendSpec:
    version = ""
    try:
        from importlib import metadata

        version = metadata.version("numba")
    except Exception:
        version = "numba not installed"
    return BackendSpec(
        name="numba_cuda",
        kernels=[k() for k in KERNELS],
        description="numba.cuda kernels (Python): ternary/binary weights, float/int8/binary activations, CUDA",
        version=version,
        availability=numba_availability,
    )

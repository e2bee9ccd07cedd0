"""cpp_cpu kernels: weight re-layout (``prepare``) and calls into the ``bitlab::cpu_*`` ops.

Three kernel families, one C++ file each (the prepared layouts are documented at the top
of those files):

* :class:`CppInt8ActivationKernel` -- binary / ternary / int2 / int4 / int8 weights with
  int8 activations (``csrc/lowbit_gemm.cpp``, ``csrc/int8_gemm.cpp``); the activation is
  quantized in C++ exactly as :func:`bitcore.quantize.quantize_activation_int8` does.
* :class:`CppFloatActivationKernel` -- binary / ternary / int2 / int4 weights with float
  activations (``csrc/float_gemm.cpp``).
* :class:`CppXnorKernel` -- binary weights with binary activations, XNOR + popcount
  (``csrc/xnor_gemm.cpp``).

Nothing here compiles at import: the extension is built (or loaded from the cache) the
first time the registry asks a kernel for its availability.

Example::

    kernel = CppInt8ActivationKernel()
    prepared = kernel.prepare(packed, BitQuantConfig(weight_bits=1.58))
    y = kernel.forward(torch.randn(8, packed.in_features), prepared, activation="relu")
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Optional

import torch

from bitcore.config import BitQuantConfig
from bitcore.errors import BackendUnavailableError
from bitcore.extensions import extension_status, load_extension
from bitcore.kernels.interface import EPILOGUES, Availability, BitKernel, keys_product
from bitcore.packing import PackedWeight, unpack_values

from backends.cpp_cpu.build import SPEC

# weight_bits -> (format name of the C++ ops, bits per code in the prepared layout, alpha, beta);
# value = alpha * code - beta (see the table in csrc/lowbit_gemm.cpp).
FORMATS = {
    1: ("binary", 1, 2, 1),
    1.58: ("ternary", 2, 1, 1),
    2: ("int2", 2, 2, 3),
    4: ("int4", 4, 1, 8),
    8: ("int8", 8, 1, 0),
}
WEIGHT_GRANULARITIES = ("per_tensor", "per_channel")
ACTIVATION_GRANULARITIES = ("per_tensor", "per_token")
FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

_fakes_lock = threading.Lock()
_fakes_registered = False


def load_ops() -> None:
    """Build or load the extension (raises BackendUnavailableError with the reason)."""
    load_extension(SPEC)
    _register_fakes()


def backend_availability() -> Availability:
    try:
        load_ops()
    except BackendUnavailableError as exc:
        return Availability.no(str(exc))
    return Availability.yes(f"CPU features: {torch.ops.bitlab.cpu_features()}")


def status() -> str:
    """One line for ``bitlab info``: loaded / cached / not built / why it cannot build."""
    return extension_status(SPEC)


def _register_fakes() -> None:
    """Shape-only implementations so torch.compile / export can trace through the ops."""
    global _fakes_registered
    with _fakes_lock:
        if _fakes_registered:
            return

        def _out(x, weight):
            return x.new_empty((x.shape[0], weight.shape[0]))

        @torch.library.register_fake("bitlab::cpu_linear_a8")
        def _fake_a8(x, weight, w_scale, bias, in_features, weight_format, per_token, group_size, epilogue):
            return _out(x, weight)

        @torch.library.register_fake("bitlab::cpu_linear_float")
        def _fake_float(x, weight, w_scale, bias, in_features, weight_format, epilogue):
            return _out(x, weight)

        @torch.library.register_fake("bitlab::cpu_linear_a1")
        def _fake_a1(x, weight, w_scale, bias, in_features, per_token, epilogue):
            return _out(x, weight)

        @torch.library.register_fake("bitlab::cpu_quantize_int8")
        def _fake_quantize(x, per_token):
            return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((x.shape[0], 1), dtype=torch.float32)

        @torch.library.register_fake("bitlab::cpu_rms_norm")
        def _fake_rms_norm(a, b, weight, eps, mode):
            return (torch.empty_like(a) if mode == 1 else a.new_empty((0,))), torch.empty_like(a)

        @torch.library.register_fake("bitlab::cpu_decode_attention")
        def _fake_decode_attention(q, k, v, cos, sin, k_cache, v_cache, slots, mask, scale):
            return q.new_empty((q.shape[0], 1, q.shape[2] * q.shape[3]))

        _fakes_registered = True


# ------------------------------------------------------------------ re-layout
# Rows re-laid out per step in prepare: bounds the int32/int64 temporaries (~1024 x in x 8 bytes).
_PREPARE_ROWS = 1024


def _by_row_chunks(values: torch.Tensor, convert) -> torch.Tensor:
    return torch.cat([convert(values[i : i + _PREPARE_ROWS]) for i in range(0, values.shape[0], _PREPARE_ROWS)])


def interleave_codes(values: torch.Tensor, weight_bits) -> torch.Tensor:
    """int8 values ``[out, in]`` -> uint8 ``[out, Kp * bits / 8]`` in the interleaved layout.

    Byte j of 32-byte block b holds, at bits ``[n*s, n*s + n)``, the code of input
    ``b * 32 * (8 // n) + 32 * s + j`` (code = (value + beta) / alpha); see csrc/lowbit_gemm.cpp.
    """
    if values.shape[0] > _PREPARE_ROWS:
        return _by_row_chunks(values, lambda v: interleave_codes(v, weight_bits))
    _, nbits, alpha, beta = FORMATS[weight_bits]
    per = 8 // nbits
    block = 32 * per
    out_f, in_f = values.shape
    kp = -(-in_f // block) * block
    codes = torch.zeros(out_f, kp, dtype=torch.int32)
    codes[:, :in_f] = (values.to(torch.int32) + beta) // alpha
    codes = codes.view(out_f, kp // block, per, 32)
    shifts = (torch.arange(per, dtype=torch.int32) * nbits).view(1, 1, per, 1)
    return (codes << shifts).sum(dim=2).to(torch.uint8).reshape(out_f, kp // per).contiguous()


def dword_codes(values: torch.Tensor, weight_bits) -> torch.Tensor:
    """int8 values ``[out, in]`` -> int32 ``[out, Kp * bits / 32]`` in the dword-interleaved layout.

    Bits ``[n*s, n*s + n)`` of word i of 8-word block b hold, as n-bit two's complement, the
    code of input ``b * 8 * (32 // n) + 8 * s + i`` (code = value, or (value - 1) / 2 for
    binary and int2); see csrc/float_gemm.cpp.
    """
    if values.shape[0] > _PREPARE_ROWS:
        return _by_row_chunks(values, lambda v: dword_codes(v, weight_bits))
    _, nbits, alpha, _ = FORMATS[weight_bits]
    per = 32 // nbits
    block = 8 * per
    out_f, in_f = values.shape
    kp = -(-in_f // block) * block
    codes = torch.zeros(out_f, kp, dtype=torch.int64)
    v = values.to(torch.int64)
    codes[:, :in_f] = (v - 1).div(2, rounding_mode="floor") if alpha == 2 else v
    codes = (codes & ((1 << nbits) - 1)).view(out_f, kp // block, per, 8)
    shifts = (torch.arange(per, dtype=torch.int64) * nbits).view(1, 1, per, 1)
    words = (codes << shifts).sum(dim=2).reshape(out_f, kp // per)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


def group_padded(values: torch.Tensor, group_size: int, group_len: int) -> torch.Tensor:
    """``[out, in]`` -> ``[out, groups * group_len]``: each group of ``group_size`` inputs zero-padded to ``group_len``."""
    out_f, in_f = values.shape
    groups = -(-in_f // group_size)
    full = torch.zeros(out_f, groups * group_size, dtype=values.dtype)
    full[:, :in_f] = values
    padded = torch.zeros(out_f, groups, group_len, dtype=values.dtype)
    padded[:, :, :group_size] = full.view(out_f, groups, group_size)
    return padded.view(out_f, groups * group_len)


def padded_int8_rows(values: torch.Tensor) -> torch.Tensor:
    """int8 values ``[out, in]`` -> int8 ``[out, Kp]``, rows zero-padded to a multiple of 32."""
    out_f, in_f = values.shape
    rows = torch.zeros(out_f, -(-in_f // 32) * 32, dtype=torch.int8)
    rows[:, :in_f] = values
    return rows


def sign_words(packed: PackedWeight) -> torch.Tensor:
    """Canonical binary packing ``[out, row_bytes]`` -> int64 words ``[out, Kw]``, Kw a multiple of 4.

    The canonical format is little-endian along in_features, so 8 consecutive bytes are
    one 64-bit word with input ``64 * i + j`` at bit j (x86 is little-endian).
    """
    out_f, in_f = packed.out_features, packed.in_features
    kw = -(-in_f // 256) * 4
    data = torch.zeros(out_f, kw * 8, dtype=torch.uint8)
    data[:, : packed.data.shape[1]] = packed.data.cpu()
    return data.view(torch.int64).contiguous()


@dataclass
class CppPrepared:
    """A weight re-laid out for one cpp_cpu kernel plus what its op needs per call."""

    weight: torch.Tensor
    scale: torch.Tensor  # float32 [1] or [out_features]
    weight_format: str
    group_size: int  # 0 unless the weights are per_group
    in_features: int
    out_features: int
    activation_dtype: str
    per_token: bool

    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size() + self.scale.numel() * 4


# -------------------------------------------------------------------- kernels
class _CppKernel(BitKernel):
    backend = "cpp_cpu"
    devices = frozenset({"cpu"})
    priority = 100
    has_cpp_backend = True

    def availability(self) -> Availability:
        return backend_availability()

    def route(self, batch: int) -> str:
        path = "gemv" if batch <= 1 else "gemm (4-token groups)"
        return f"{type(self).__name__}: {path}"

    def _check_inputs(self, x, prepared: CppPrepared, bias, activation: str) -> None:
        # Checked here as well as in the op: on some machines (seen on the GPU machine's torch 2.11
        # build) an error thrown inside a BitLab extension ends the process instead of raising.
        if x.dim() != 2 or x.shape[1] != prepared.in_features:
            raise ValueError(f"{self.name}: x must be 2-D [tokens, in_features={prepared.in_features}], "
                             f"got shape {tuple(x.shape)}")
        if x.device.type != "cpu":
            raise ValueError(f"{self.name}: x must be on the CPU, got {x.device}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"{self.name}: x must be floating point, got {x.dtype}")
        if activation not in EPILOGUES:
            raise ValueError(f"activation: got {activation!r}; allowed values are {list(EPILOGUES)}")
        if bias is not None and (bias.numel() != prepared.out_features or bias.device.type != "cpu"):
            raise ValueError(f"{self.name}: bias must have out_features={prepared.out_features} elements on the CPU; "
                             f"got {tuple(bias.shape)} on {bias.device}")

    def _prepared(self, weight: torch.Tensor, packed: PackedWeight, config: BitQuantConfig) -> CppPrepared:
        return CppPrepared(
            weight=weight,
            scale=packed.scale.detach().to("cpu", torch.float32).contiguous().reshape(-1),
            weight_format=FORMATS[packed.weight_bits][0],
            group_size=packed.group_size if packed.granularity == "per_group" else 0,
            in_features=packed.in_features,
            out_features=packed.out_features,
            activation_dtype=config.activation_dtype,
            per_token=config.activation_granularity == "per_token",
        )


class CppInt8ActivationKernel(_CppKernel):
    """Binary / ternary / int2 / int4 / int8 weights x int8 activations (exact integer accumulation).

    per_group weights: every group is padded on its own to a whole number of kernel blocks
    (32 inputs for int8, 64 int4, 128 ternary / int2, 256 binary), so any group size works;
    sizes that are multiples of the block waste nothing.
    """

    keys = keys_product(FORMATS, ["int8"], WEIGHT_GRANULARITIES + ("per_group",), ACTIVATION_GRANULARITIES)

    def prepare(self, packed: PackedWeight, config: BitQuantConfig) -> CppPrepared:
        values = unpack_values(packed).cpu()
        if packed.granularity == "per_group":
            per = 8 // FORMATS[packed.weight_bits][1]
            block = 32 if packed.weight_bits == 8 else 32 * per
            values = group_padded(values, packed.group_size, -(-packed.group_size // block) * block)
        weight = padded_int8_rows(values) if packed.weight_bits == 8 else interleave_codes(values, packed.weight_bits)
        return self._prepared(weight, packed, config)

    def forward(self, x, prepared: CppPrepared, bias: Optional[torch.Tensor] = None, activation: str = "none"):
        self._check_inputs(x, prepared, bias, activation)
        return torch.ops.bitlab.cpu_linear_a8(
            x, prepared.weight, prepared.scale, bias, prepared.in_features, prepared.weight_format,
            prepared.per_token, prepared.group_size, activation
        )


class CppFloatActivationKernel(_CppKernel):
    """Binary / ternary / int2 / int4 weights x float activations (float32 accumulation)."""

    keys = keys_product([1, 1.58, 2, 4], list(FLOAT_DTYPES), WEIGHT_GRANULARITIES, ["none"])

    def prepare(self, packed: PackedWeight, config: BitQuantConfig) -> CppPrepared:
        weight = dword_codes(unpack_values(packed).cpu(), packed.weight_bits)
        return self._prepared(weight, packed, config)

    def forward(self, x, prepared: CppPrepared, bias: Optional[torch.Tensor] = None, activation: str = "none"):
        self._check_inputs(x, prepared, bias, activation)
        act = FLOAT_DTYPES[prepared.activation_dtype]
        # Round to the activation dtype as the reference does; the op then computes in float32.
        xin = x if act == torch.float32 else x.to(act).to(torch.float32)
        y = torch.ops.bitlab.cpu_linear_float(
            xin, prepared.weight, prepared.scale, bias, prepared.in_features, prepared.weight_format, activation
        )
        return y if y.dtype == x.dtype else y.to(x.dtype)


class CppXnorKernel(_CppKernel):
    """Binary weights x binary activations: XNOR + popcount."""

    keys = keys_product([1], ["binary"], WEIGHT_GRANULARITIES, ACTIVATION_GRANULARITIES)

    def prepare(self, packed: PackedWeight, config: BitQuantConfig) -> CppPrepared:
        return self._prepared(sign_words(packed), packed, config)

    def forward(self, x, prepared: CppPrepared, bias: Optional[torch.Tensor] = None, activation: str = "none"):
        self._check_inputs(x, prepared, bias, activation)
        return torch.ops.bitlab.cpu_linear_a1(
            x, prepared.weight, prepared.scale, bias, prepared.in_features, prepared.per_token, activation
        )


KERNELS = (CppInt8ActivationKernel, CppFloatActivationKernel, CppXnorKernel)

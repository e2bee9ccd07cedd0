"""``bitlab::cuda_ext_linear_int8_norm_tail``: a W*A8 projection and the residual add + RMSNorm + int8
quantization after it in one kernel (``csrc/linear_norm_tail.cu``), for a few tokens.

In a BitNet decode step the o projection is followed by ``h = h + o`` and ``post_attention_layernorm``, whose
output the MLP takes quantized.  As its own kernel (``cuda_ext_rms_norm_quant``) that norm costs a kernel
boundary; here the projection's blocks take tickets from a counter when their outputs are written, and the last
one runs the norm::

    y = W . (xq, x_scale)                         # the registry's cuda_ext int8-path lane tiles
    h = res + y                                   # rounded to the dtype of res
    q, q_scale = quantize_per_token(RMSNorm(h) * norm_weight)

The bits are those of ``cuda_ext_linear_int8`` then ``cuda_ext_rms_norm_quant`` (mode 1).  Served: half / bf16
rows, N (out_features) a multiple of 8 up to 8192, 1 to 8 rows whose staged norm fits 48 KB of shared memory
(:func:`max_rows`: 4 rows at N = 2560).  Each :class:`NormTailLinear` owns its counter (one int32, zero
between launches), so two of them never share one.

Example::

    tail = NormTailLinear.prepare(o_proj_binding.prepared, post_attention_layernorm.weight, eps)
    h, x = tail(QuantizedActivation(aq, a_scale), h)     # x: QuantizedActivation for the MLP
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from backends.cuda_ext import ops
from backends.cuda_ext.norm_linear import norm_weight_problem

MAX_TOKENS = 8  # kNormRowsMaxTokens (csrc/bitlab_norm_rows.cuh)
MAX_N = 8192  # kNormRowsMaxK
MAX_STAGE_BYTES = 48 * 1024  # kNormTailMaxSmem (csrc/linear_norm_tail.cu)
_STAT_BYTES = (2 * MAX_TOKENS * 32 + 16 * MAX_TOKENS) * 4  # kNormRowsStatFloats * 4


def _fake(xq, x_scale, wq, w_scale, fmt, N, res, norm_weight, eps, counter):
    m = xq.shape[0]
    return torch.empty_like(res), res.new_empty((m, N), dtype=torch.int8), res.new_empty((m,), dtype=torch.float32)


def register_fake() -> None:
    torch.library.register_fake("bitlab::cuda_ext_linear_int8_norm_tail")(_fake)


def stage_bytes(rows: int, n: int) -> int:
    """Shared memory the last block stages the norm in (norm_rows_stage_bytes, mode 1)."""
    return _STAT_BYTES + 2 * n + 4 * rows * n


def max_rows(n: int) -> int:
    """Rows of ``n`` outputs the kernel takes (0 where it takes none)."""
    if n < 8 or n % 8 or n > MAX_N:
        return 0
    rows = 0
    while rows < MAX_TOKENS and stage_bytes(rows + 1, n) <= MAX_STAGE_BYTES:
        rows += 1
    return rows


def why_not(prepared, norm_weight: torch.Tensor) -> str:
    """Empty when the kernel can take the norm after ``prepared`` (a cuda_ext :class:`CudaExtWeight`), else why not."""
    def size_problem(n: int) -> str:
        if n < 8 or n % 8 or n > MAX_N:
            return f"out_features {n} is not a multiple of 8 up to {MAX_N}"
        return "" if max_rows(n) else f"out_features {n}: one row's staged norm is over {MAX_STAGE_BYTES} bytes"

    return norm_weight_problem(prepared, norm_weight, "out_features", size_problem)


@dataclass
class NormTailLinear:
    """One projection (a cuda_ext int8-path weight) with the residual add and the norm after it."""

    prepared: object  # CudaExtWeight
    norm_weight: torch.Tensor
    eps: float
    counter: torch.Tensor  # int32 [1], zero between launches

    @classmethod
    def prepare(cls, prepared, norm_weight: torch.Tensor, eps: float) -> "NormTailLinear":
        why = why_not(prepared, norm_weight)
        if why:
            raise ValueError(f"NormTailLinear: {why}")
        device = prepared.wq.device
        weight = norm_weight.detach().to(device).contiguous()
        return cls(prepared, weight, float(eps), torch.zeros(1, dtype=torch.int32, device=device))

    @property
    def max_tokens(self) -> int:
        return max_rows(self.prepared.out_features)

    def serves(self, xq: torch.Tensor, res: torch.Tensor) -> bool:
        """Whether ``self(QuantizedActivation(xq, ...), res)`` runs: CUDA int8 rows of in_features and residual
        rows of out_features in the norm weight's dtype (contiguous, 16-byte aligned), as many, at most max_tokens."""
        n, k = self.prepared.out_features, self.prepared.in_features
        rows = res.numel() // max(n, 1)
        return (xq.is_cuda and xq.dtype == torch.int8 and xq.shape[-1] == k and xq.numel() == rows * k
                and res.is_cuda and res.shape[-1] == n and res.dtype == self.norm_weight.dtype and _dense(res)
                and 1 <= rows <= self.max_tokens)

    def __call__(self, x, res: torch.Tensor):
        """``(h, QuantizedActivation(q, q_scale))``: ``h = res + W . x`` and its norm quantized per token;
        ``x`` a :class:`~bitmodels.bitnet.bindings.QuantizedActivation` (``q [..., in]`` int8, ``scale [..., 1]``)."""
        q, scale = x
        check_inputs(q, scale, res, self)
        p = self.prepared
        n, k = p.out_features, p.in_features
        h, yq, y_scale = ops._op("cuda_ext_linear_int8_norm_tail")(
            q.reshape(-1, k), scale.reshape(-1), p.wq, p.scale, p.fmt, n, res.reshape(-1, n), self.norm_weight,
            self.eps, self.counter)
        lead = res.shape[:-1]
        return h.view(res.shape), (yq.view(*lead, n), y_scale.view(*lead, 1))


def _dense(t: torch.Tensor) -> bool:
    """Contiguous and 16-byte aligned (the kernel reads rows 16 bytes at a time)."""
    return t.is_contiguous() and t.data_ptr() % 16 == 0


def check_inputs(q: torch.Tensor, scale: torch.Tensor, res: torch.Tensor, tail: NormTailLinear) -> None:
    """ValueError naming what the kernel does not take (the op checks again)."""
    n, k = tail.prepared.out_features, tail.prepared.in_features
    dtype = tail.norm_weight.dtype
    if not res.is_cuda or res.dtype != dtype or res.shape[-1] != n or not _dense(res):
        layout = "" if _dense(res) else " (not contiguous or aligned)"
        raise ValueError(f"res must be contiguous, 16-byte aligned [..., {n}] {dtype} on CUDA; got {res.dtype} "
                         f"{tuple(res.shape)} on {res.device}{layout}")
    rows = res.numel() // n
    if not 1 <= rows <= tail.max_tokens:
        raise ValueError(f"{rows} rows of {n} outputs: the kernel takes 1 to {tail.max_tokens}")
    if q.dtype != torch.int8 or q.shape[-1] != k or q.numel() != rows * k or q.device != res.device:
        raise ValueError(f"x.q must be int8 [..., {k}] with {rows} rows on {res.device}; got {q.dtype} "
                         f"{tuple(q.shape)} on {q.device}")
    if scale.dtype != torch.float32 or scale.numel() not in (1, rows) or scale.device != res.device:
        raise ValueError(f"x.scale must be float32 with 1 or {rows} values on {res.device}; got {scale.dtype} "
                         f"{tuple(scale.shape)} on {scale.device}")

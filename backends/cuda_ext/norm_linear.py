"""``bitlab::cuda_ext_linear_int8_norm``: the RMSNorm + int8 quantization before a W*A8 projection and the
projection in one kernel (``csrc/linear_norm.cu``), for a few tokens.

A decode step runs a norm before each projection group; as its own kernel (``cuda_ext_rms_norm_quant``) each
norm costs a kernel boundary.  Here every block of the projection's GEMV normalizes the (short) input rows
itself and quantizes them into shared memory::

    h = a + b                       # mode 1 (residual add; block 0 writes h), else the rows are a
    x = quantize_per_token(RMSNorm(h) * norm_weight)
    y = x . W                       # the registry's cuda_ext int8-path lane tiles, its epilogue

The bits are those of ``cuda_ext_rms_norm_quant`` then ``cuda_ext_linear_int8`` (the kernel adds the sums
of squares in the norm kernel's order).  Served: half / bf16 rows, K a multiple of 8 up to 8192, at most 8
rows and ``rows * K <= 8192`` (:func:`max_rows`).

Example::

    fused = NormLinear.prepare(qkv_binding.prepared, input_layernorm.weight, eps, out_dtype=torch.bfloat16)
    h, y = fused(residual, mlp_out)      # h = residual + mlp_out, y = qkv(norm(h))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from backends.cuda_ext import ops

MAX_TOKENS = 8  # kNormGemvMaxTokens (csrc/bitlab_launch.h)
MAX_K = 8192  # kNormGemvMaxK
MAX_ELEMENTS = 8192  # kNormGemvMaxElements: rows x K


def _fake(a, b, norm_weight, eps, mode, wq, w_scale, bias, fmt, epilogue, N, out_dtype):
    h = torch.empty_like(a) if mode == 1 else a.new_empty((0,))
    return h, a.new_empty((a.shape[0], N), dtype=out_dtype)


def register_fake() -> None:
    torch.library.register_fake("bitlab::cuda_ext_linear_int8_norm")(_fake)


def max_rows(k: int) -> int:
    """Rows of ``k`` columns the kernel takes (0 where it takes none)."""
    if k < 8 or k % 8 or k > MAX_K:
        return 0
    return min(MAX_TOKENS, MAX_ELEMENTS // k)


def why_not(prepared, norm_weight: torch.Tensor) -> str:
    """Empty when the kernel can take the norm before ``prepared`` (a cuda_ext :class:`CudaExtWeight`), else why not."""
    def size_problem(k: int) -> str:
        return "" if max_rows(k) else f"in_features {k} is not a multiple of 8 up to {MAX_K}"

    return norm_weight_problem(prepared, norm_weight, "in_features", size_problem)


def norm_weight_problem(prepared, norm_weight: torch.Tensor, side: str, size_problem) -> str:
    """Why a kernel that runs a norm over ``prepared``'s ``side`` ("in_features" before the projection,
    "out_features" after it) cannot take ``prepared`` and ``norm_weight`` ("" when it can); ``size_problem(size)``:
    why the kernel takes no rows of that size ("" when it takes some)."""
    if getattr(prepared, "act_mode", None) != ops.ACT_INT8_PER_TOKEN:
        return "the projection does not take int8 per-token activations"
    size = getattr(prepared, side)
    why = size_problem(size)
    if why:
        return why
    if norm_weight.dtype not in (torch.float16, torch.bfloat16):
        return f"the norm's weight is {norm_weight.dtype}, not float16 / bfloat16"
    if norm_weight.shape != (size,):
        return f"the norm's weight has shape {tuple(norm_weight.shape)}, expected ({size},)"
    if not prepared.wq.is_cuda:
        return "the prepared weight is not on a CUDA device"
    return ""


@dataclass
class NormLinear:
    """One projection (a cuda_ext int8-path weight, possibly fused rows) with the norm before it."""

    prepared: object  # CudaExtWeight
    norm_weight: torch.Tensor
    eps: float
    bias: Optional[torch.Tensor]
    out_dtype: torch.dtype

    @classmethod
    def prepare(cls, prepared, norm_weight: torch.Tensor, eps: float, bias: Optional[torch.Tensor] = None,
                out_dtype: torch.dtype = torch.bfloat16) -> "NormLinear":
        why = why_not(prepared, norm_weight)
        if why:
            raise ValueError(f"NormLinear: {why}")
        weight = norm_weight.detach().to(prepared.wq.device).contiguous()
        if bias is not None:  # the kernel's epilogue reads it on the weight's device
            bias = bias.detach().to(prepared.wq.device)
        return cls(prepared, weight, float(eps), bias, out_dtype)

    @property
    def in_features(self) -> int:
        return self.prepared.in_features

    @property
    def max_tokens(self) -> int:
        return max_rows(self.in_features)

    def serves(self, a: torch.Tensor, b: Optional[torch.Tensor] = None) -> bool:
        """Whether ``self(a, b)`` runs: CUDA rows in the norm weight's dtype, contiguous and 16-byte aligned, at
        most max_tokens."""
        rows = a.numel() // max(a.shape[-1], 1)
        return (a.is_cuda and a.shape[-1] == self.in_features and a.dtype == self.norm_weight.dtype
                and _dense(a) and 1 <= rows <= self.max_tokens
                and (b is None or (b.shape == a.shape and b.dtype == a.dtype and _dense(b))))

    def __call__(self, a: torch.Tensor, b: Optional[torch.Tensor] = None):
        """``(h, y)``: ``h = a + b`` (None without ``b``) and ``y = W . quantize(RMSNorm(h or a) * w)``,
        ``[..., out_features]`` in ``out_dtype``."""
        check_inputs(a, b, self.norm_weight)
        lead, k = a.shape[:-1], self.in_features
        p = self.prepared
        rows_b, mode = (None, 0) if b is None else (b.reshape(-1, k), 1)
        h, y = ops._op("cuda_ext_linear_int8_norm")(a.reshape(-1, k), rows_b, self.norm_weight, self.eps, mode, p.wq,
                                                    p.scale, self.bias, p.fmt, 0, p.out_features, self.out_dtype)
        return (None if b is None else h.view(a.shape)), y.view(*lead, p.out_features)


def _dense(t: torch.Tensor) -> bool:
    """Contiguous and 16-byte aligned (the kernel reads rows 16 bytes at a time)."""
    return t.is_contiguous() and t.data_ptr() % 16 == 0


def check_inputs(a: torch.Tensor, b: Optional[torch.Tensor], norm_weight: torch.Tensor) -> None:
    """ValueError naming what the kernel does not take (the op checks again)."""
    k = norm_weight.numel()
    if not a.is_cuda or a.dtype != norm_weight.dtype or a.shape[-1] != k or not _dense(a):
        layout = "" if _dense(a) else " (not contiguous or aligned)"
        raise ValueError(f"a must be contiguous, 16-byte aligned [..., {k}] {norm_weight.dtype} on CUDA; got "
                         f"{a.dtype} {tuple(a.shape)} on {a.device}{layout}")
    rows = a.numel() // k
    if not 1 <= rows <= max_rows(k):
        raise ValueError(f"{rows} rows of {k} columns: the kernel takes 1 to {max_rows(k)}")
    if b is not None and (b.shape != a.shape or b.dtype != a.dtype or not _dense(b) or b.device != a.device):
        raise ValueError(f"b must be shaped like a ({a.dtype} {tuple(a.shape)}, contiguous, aligned, {a.device}); got "
                         f"{b.dtype} {tuple(b.shape)} on {b.device}")

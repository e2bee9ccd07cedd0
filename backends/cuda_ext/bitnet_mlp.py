"""``bitlab::cuda_ext_bitnet_mlp``: BitNet's whole MLP for a few tokens in one persistent CUDA kernel
(``csrc/bitnet_mlp.cu``, sm_90).

For int8 per-token activations ``xq, x_scale`` (the post-attention norm's output) it computes what
the three separate kernels compute (:func:`bitmodels.bitnet.ops.relu2_gate_norm` between two W1.58A8
projections)::

    g, u = gate(xq), up(xq)                           # rounded to the model dtype, as the GEMV outputs
    m    = T(T(relu(g) ** 2) * u)                      # written to the layer's scratch `mid`
    mq   = quantize_per_token(ffn_sub_norm(m))         # int8, every block of the grid computes it
    y    = down(mq)                                    # [M, hidden] in the model dtype

The kernel reuses the lane tiles the registry's ``cuda_ext`` int8 kernel prepared for the fused
``gate_up`` and for ``down_proj`` (no second copy of the weights).  Everything is exact against the
separate kernels except the sub-norm's sum of squares, which is added in another order (so ``mq`` can
differ by one step where the mean differs in its last bit).

Example::

    fused = prepare_bitnet_mlp(gate_up.prepared, down.prepared, sub_norm_weight, eps)
    y = fused(xq, x_scale)          # xq [M, hidden] int8, M <= fused.max_tokens
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from backends.cuda_ext import ops

MAX_TOKENS = 8  # kBitnetMlpMaxTokens (csrc/bitlab_launch.h)
NORM_ELEMENTS = 4 * 8 * 512  # kBitnetMlpNormElements: most tokens x hidden the kernel norms itself
NORM_MAX_HIDDEN = 8192  # kNormRowsMaxK: the norm's reduction order is norm_quant's up to this row length
TERNARY_FORMAT = 1  # layout.FORMAT_CODE[1.58]
WORDS_PER_TILE_CHUNK = 128  # ternary int8-path lane tile of 16 rows x 128 inputs


def _fake(xq, x_scale, gate_wq, up_wq, down_wq, gate_scale, up_scale, down_scale, sub_weight, mid, barrier, eps, H, I):
    return xq.new_empty((xq.shape[0], H), dtype=sub_weight.dtype)


def _norm_fake(res, delta, norm_weight, norm_eps, gate_wq, up_wq, down_wq, gate_scale, up_scale, down_scale,
               sub_weight, mid, barrier, eps, H, I):
    return torch.empty_like(res), res.new_empty((res.shape[0], H))


def register_fake() -> None:
    torch.library.register_fake("bitlab::cuda_ext_bitnet_mlp")(_fake)
    torch.library.register_fake("bitlab::cuda_ext_bitnet_mlp_norm")(_norm_fake)


def smem_bytes(tokens: int, hidden: int, intermediate: int, dtype: torch.dtype, norm: bool = False) -> int:
    """Shared memory the kernel needs for ``tokens`` on the current device (with ``norm``: also taking the
    post-attention norm, whose rows it stages); 0 where it cannot run."""
    ops.load()
    return int(torch.ops.bitlab.cuda_ext_bitnet_mlp_smem(tokens, hidden, intermediate, dtype, norm))


@dataclass
class FusedBitnetMLP:
    """The prepared MLP of one layer: views of the bound projections' lane tiles, per-row scales,
    the sub-norm, and the layer's scratch (``mid`` between the phases, the grid barrier's counter)."""

    gate_wq: torch.Tensor
    up_wq: torch.Tensor
    down_wq: torch.Tensor
    gate_scale: torch.Tensor
    up_scale: torch.Tensor
    down_scale: torch.Tensor
    sub_weight: torch.Tensor
    eps: float
    hidden: int
    intermediate: int
    max_tokens: int
    mid: torch.Tensor
    barrier: torch.Tensor
    # The post-attention norm's weight where the kernel also takes that norm (norm_and_mlp), else None.
    norm_weight: Optional[torch.Tensor] = None
    norm_eps: float = 0.0
    # Most tokens whose staged rows fit the kernel's shared memory with the norm (prepare_bitnet_mlp measures it).
    norm_fits_tokens: int = MAX_TOKENS

    @property
    def norm_max_tokens(self) -> int:
        """Most tokens :meth:`norm_and_mlp` takes (0: not this layer)."""
        if self.norm_weight is None or self.hidden % 8 or self.hidden > NORM_MAX_HIDDEN:
            return 0
        return min(self.max_tokens, NORM_ELEMENTS // self.hidden, self.norm_fits_tokens)

    def __call__(self, xq: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
        """``y [*lead, hidden]`` for ``xq [*lead, hidden]`` int8 and ``x_scale [*lead, 1]`` (or ``[*lead]``)."""
        lead = xq.shape[:-1]
        q = xq.reshape(-1, xq.shape[-1])
        s = x_scale.reshape(-1)
        check_inputs(q, s, self)
        y = torch.ops.bitlab.cuda_ext_bitnet_mlp(q, s, self.gate_wq, self.up_wq, self.down_wq, self.gate_scale,
                                                 self.up_scale, self.down_scale, self.sub_weight, self.mid,
                                                 self.barrier, self.eps, self.hidden, self.intermediate)
        return y.view(*lead, self.hidden)

    def norm_and_mlp(self, res: torch.Tensor, delta: torch.Tensor) -> tuple:
        """``(h, mlp(x))`` for ``h = res + delta`` (in the model dtype) and ``x`` the post-attention norm of ``h``
        quantized per token, all in the one kernel (every block norms ``h``, with the norm_quant kernel's bits).
        ``res``, ``delta``: contiguous ``[*lead, hidden]``."""
        lead = res.shape[:-1]
        a, b = res.reshape(-1, self.hidden), delta.reshape(-1, self.hidden)
        check_norm_inputs(a, b, self)
        h, y = torch.ops.bitlab.cuda_ext_bitnet_mlp_norm(a, b, self.norm_weight, self.norm_eps, self.gate_wq,
                                                         self.up_wq, self.down_wq, self.gate_scale, self.up_scale,
                                                         self.down_scale, self.sub_weight, self.mid, self.barrier,
                                                         self.eps, self.hidden, self.intermediate)
        return h.view(*lead, self.hidden), y.view(*lead, self.hidden)


def check_norm_inputs(res: torch.Tensor, delta: torch.Tensor, fused: FusedBitnetMLP) -> None:
    """ValueError naming the problem with :meth:`FusedBitnetMLP.norm_and_mlp`'s inputs."""
    if fused.norm_max_tokens == 0:
        if fused.norm_weight is None:
            raise ValueError("bitnet_mlp: this layer's kernel was prepared without the post-attention norm")
        if fused.hidden % 8 or fused.hidden > NORM_MAX_HIDDEN:
            raise ValueError(f"bitnet_mlp: hidden size {fused.hidden} is not a multiple of 8 (the norm's 16-byte "
                             f"loads) up to {NORM_MAX_HIDDEN}")
        raise ValueError(f"bitnet_mlp: hidden size {fused.hidden}: the norm's rows do not fit the kernel's shared "
                         "memory for one token")
    for name, t in (("res", res), ("delta", delta)):
        if t.dtype != fused.sub_weight.dtype or t.dim() != 2 or t.shape[1] != fused.hidden:
            raise ValueError(f"bitnet_mlp: {name} must be {fused.sub_weight.dtype} [tokens, {fused.hidden}], got "
                             f"{t.dtype} {tuple(t.shape)}")
        if t.device != fused.gate_wq.device:
            raise ValueError(f"bitnet_mlp: {name} on {t.device}, weights on {fused.gate_wq.device}")
        if not t.is_contiguous():
            raise ValueError(f"bitnet_mlp: {name} must be contiguous, got strides {t.stride()}")
    if res.shape[0] != delta.shape[0]:
        raise ValueError(f"bitnet_mlp: res has {res.shape[0]} rows, delta {delta.shape[0]}")
    if res.shape[0] > fused.norm_max_tokens:
        raise ValueError(f"bitnet_mlp: {res.shape[0]} tokens; with the norm this layer's kernel takes at most "
                         f"{fused.norm_max_tokens}")


def check_inputs(xq: torch.Tensor, x_scale: torch.Tensor, fused: FusedBitnetMLP) -> None:
    """ValueError naming the problem (the op checks again; a C++ error would be harder to read)."""
    if xq.dtype != torch.int8 or xq.dim() != 2 or xq.shape[1] != fused.hidden:
        raise ValueError(f"bitnet_mlp: xq must be int8 [tokens, {fused.hidden}], got {xq.dtype} {tuple(xq.shape)}")
    if xq.shape[0] > fused.max_tokens:
        raise ValueError(f"bitnet_mlp: {xq.shape[0]} tokens; this layer's kernel takes at most {fused.max_tokens}")
    if xq.device != fused.gate_wq.device or x_scale.device != xq.device:
        raise ValueError(f"bitnet_mlp: inputs on {xq.device} / {x_scale.device}, weights on {fused.gate_wq.device}")
    if xq.stride(-1) != 1:
        raise ValueError(f"bitnet_mlp: xq rows must be contiguous, got strides {xq.stride()}")
    if x_scale.dtype != torch.float32 or x_scale.numel() != xq.shape[0]:
        raise ValueError(f"bitnet_mlp: x_scale must be float32 with one value per token ({xq.shape[0]}), got "
                         f"{x_scale.dtype} with {x_scale.numel()}")


def why_not(gate_up, down, sub_weight: torch.Tensor) -> str:
    """Empty when the kernel serves these prepared projections (``CudaExtWeight`` of the fused
    ``gate_up`` and of ``down_proj``), else why not."""
    from backends.cuda_ext.kernels import CudaExtWeight

    if not isinstance(gate_up, CudaExtWeight) or not isinstance(down, CudaExtWeight):
        return "the projections are not prepared by the cuda_ext kernels"
    if gate_up.fmt != TERNARY_FORMAT or down.fmt != TERNARY_FORMAT:
        return "the kernel takes ternary (1.58-bit) weights only"
    if gate_up.act_mode != ops.ACT_INT8_PER_TOKEN or down.act_mode != ops.ACT_INT8_PER_TOKEN:
        return "the kernel takes int8 per-token activations only"
    hidden, intermediate = gate_up.in_features, gate_up.out_features // 2
    if gate_up.out_features % 2 or down.in_features != intermediate or down.out_features != hidden:
        return (f"shapes do not chain: gate_up {gate_up.in_features} -> {gate_up.out_features}, down "
                f"{down.in_features} -> {down.out_features}")
    if intermediate % 16:
        return f"intermediate size {intermediate} is not a multiple of 16 (the up rows must start a tile)"
    if sub_weight.dtype not in (torch.float16, torch.bfloat16):
        return f"model dtype {sub_weight.dtype}; the kernel takes float16 or bfloat16"
    device = gate_up.wq.device
    why = ops.sm90_why_not(device, "weights", "bulk copies into shared memory")
    if why:
        return why
    with torch.cuda.device(device):
        if smem_bytes(1, hidden, intermediate, sub_weight.dtype) == 0:
            return (f"hidden {hidden} x intermediate {intermediate} needs more than 4 tiles of 16 rows per "
                    "multiprocessor or more shared memory than the GPU has")
    return ""


def prepare_bitnet_mlp(gate_up, down, sub_weight: torch.Tensor, eps: float,
                       norm_weight: Optional[torch.Tensor] = None, norm_eps: float = 0.0) -> FusedBitnetMLP:
    """The fused MLP over the prepared ``gate_up`` (gate rows then up rows) and ``down`` weights; with
    ``norm_weight`` (the post-attention norm's, ``[hidden]``) it can take that norm too (norm_and_mlp)."""
    why = why_not(gate_up, down, sub_weight)
    if why:
        raise ValueError(f"bitnet_mlp: {why}")
    hidden, intermediate = gate_up.in_features, gate_up.out_features // 2
    device = gate_up.wq.device
    with torch.cuda.device(device):
        max_tokens = max(m for m in range(1, MAX_TOKENS + 1)
                         if smem_bytes(m, hidden, intermediate, sub_weight.dtype) > 0)
        norm_fits = 0 if norm_weight is None else max(
            (m for m in range(1, max_tokens + 1) if smem_bytes(m, hidden, intermediate, sub_weight.dtype, norm=True)),
            default=0)
    tile_words = (hidden + 127) // 128 * WORDS_PER_TILE_CHUNK
    up_start = intermediate // 16 * tile_words
    scale = gate_up.scale.expand(gate_up.out_features) if gate_up.scale.numel() == 1 else gate_up.scale
    return FusedBitnetMLP(
        gate_wq=gate_up.wq[:up_start],
        up_wq=gate_up.wq[up_start:],
        down_wq=down.wq,
        gate_scale=scale[:intermediate].float().contiguous(),
        up_scale=scale[intermediate:].float().contiguous(),
        down_scale=down.scale.float().expand(hidden).contiguous(),
        sub_weight=sub_weight.detach().to(device).contiguous(),
        eps=float(eps),
        hidden=hidden,
        intermediate=intermediate,
        max_tokens=max_tokens,
        mid=torch.empty(MAX_TOKENS * intermediate, dtype=sub_weight.dtype, device=device),
        barrier=torch.zeros(1, dtype=torch.int64, device=device),
        norm_weight=None if norm_weight is None else norm_weight.detach().to(device, sub_weight.dtype).contiguous(),
        norm_eps=float(norm_eps),
        norm_fits_tokens=norm_fits,
    )

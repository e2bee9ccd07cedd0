"""The float operations of the BitNet decoder between its BitLinear layers.

Each function is pure tensor code with the exact math of transformers'
``modeling_bitnet`` (RMSNorm in float32 then cast back before the weight,
rotary ``x * cos + rotate_half(x) * sin``, float32 softmax), written so that
``torch.compile`` can fuse each one into a kernel or two.  ``CompiledOps``
holds compiled copies; the model calls whichever ``Ops`` object it holds.

With ``quantize=True`` the functions that end in a norm return the normed activations int8
quantized per token (:class:`QuantizedActivation`, exactly as the projection's kernel would
quantize them), so the quantization runs fused into the norm's kernel and the projection takes
int8 input (``forward_quantized``) instead of quantizing in a separate pass.

Example::

    h, x = add_rms_norm(h, delta, weight, 1e-5)   # residual add, then the next layer's norm
"""
from __future__ import annotations

import math
import os
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from bitcore.quantize import quantize_activation_int8
from bitmodels.bitnet.bindings import QuantizedActivation


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' BitNetRMSNorm: normalize in float32, cast to x.dtype, then scale."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


# Whether the norms that quantize run as one cuda_ext kernel (RMSNorm + quantization) on CUDA
# tensors; set by use_fused_norm_quant() before any compiled function traces the norms.
_FUSED_NORM_QUANT = {"cuda": False}


def use_fused_norm_quant(device) -> str:
    """Resolve (once per call) whether quantizing norms on ``device`` use the fused cuda_ext kernel.

    Returns what runs them, with the reason: ``"cuda_ext (...)"`` or ``"torch (...)"``.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return "torch (not a CUDA device)"
    from backends.cuda_ext import ops as cuda_ops

    status = cuda_ops.availability()
    _FUSED_NORM_QUANT["cuda"] = bool(status)
    return f"cuda_ext ({status.reason})" if status else f"torch (cuda_ext unavailable: {status.reason})"


def cpp_cpu_or_torch(device, switch: str, what: str) -> Tuple[bool, str]:
    """``(whether, what runs it and why)`` for one CPU step of the decoder: the cpp_cpu op ``what`` where the model
    runs on a CPU and cpp_cpu is available, else torch's operations; ``switch`` set to ``torch`` keeps torch's (for
    A/B timing)."""
    if torch.device(device).type != "cpu":
        return False, "torch (not a CPU device)"
    if os.environ.get(switch) == "torch":
        return False, f"torch ({switch}=torch)"
    from backends.cpp_cpu.kernels import backend_availability

    status = backend_availability()
    if not status:
        return False, f"torch (cpp_cpu unavailable: {status.reason})"
    return True, what


def use_cpu_norm(device) -> Tuple[bool, str]:
    """Whether the norms of a model prepared for ``device`` (a CPU) run as one cpp_cpu call each
    (:class:`CpuNormOps`) instead of torch's ~8 operations; ``BITLAB_CPU_NORM=torch`` keeps torch's."""
    return cpp_cpu_or_torch(device, "BITLAB_CPU_NORM", "cpp_cpu.cpu_rms_norm (one call per norm)")


def cpu_norm_serves(x: torch.Tensor, weight: torch.Tensor, other: Optional[torch.Tensor] = None) -> bool:
    """cpu_rms_norm takes it: CPU float32 / bfloat16 rows, one dtype and shape throughout, nothing to differentiate."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    if weight.dtype != x.dtype or weight.device.type != "cpu" or (other is not None and (
            other.dtype != x.dtype or other.shape != x.shape or other.device.type != "cpu")):
        return False
    tensors = (x, weight) if other is None else (x, weight, other)
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


class CpuNormOps:
    """An ops set whose norms run as one ``cpu_rms_norm`` call each where it takes the rows (else the base set's);
    the other operations are the base set's.  The sum of squares is added in another order than torch's, so the
    normed rows can differ from torch's in the last bit (``backends/cpp_cpu/csrc/norms.cpp``)."""

    def __init__(self, base) -> None:
        self.base = base

    def __getattr__(self, name):
        return getattr(self.base, name)

    def norm_input(self, x, weight, eps, quantize=False):
        if not cpu_norm_serves(x, weight):
            return self.base.norm_input(x, weight, eps, quantize)
        y = torch.ops.bitlab.cpu_rms_norm(x, None, weight, eps, 0)[1]
        return quantize_tokens(y) if quantize else y

    def add_rms_norm(self, residual, delta, weight, eps, quantize=False):
        if not cpu_norm_serves(residual, weight, delta):
            return self.base.add_rms_norm(residual, delta, weight, eps, quantize)
        h, y = torch.ops.bitlab.cpu_rms_norm(residual, delta, weight, eps, 1)
        return h, (quantize_tokens(y) if quantize else y)

    def attention(self, q, k, v, cos, sin, k_cache, v_cache, slots, mask, sub_norm_weight, eps, quantize=False):
        """The base set's attention with ``attn_sub_norm`` taken here where cpu_rms_norm serves it."""
        out = self.base.attention(q, k, v, cos, sin, k_cache, v_cache, slots, mask, None, eps, quantize)
        return out if sub_norm_weight is None else self.norm_input(out, sub_norm_weight, eps, quantize)

    def relu2_gate_norm(self, gate, up, weight, eps, quantize=False):
        if not cpu_norm_serves(gate, weight, up):
            return self.base.relu2_gate_norm(gate, up, weight, eps, quantize)
        y = torch.ops.bitlab.cpu_rms_norm(gate, up, weight, eps, 2)[1]
        return quantize_tokens(y) if quantize else y


def use_cpu_attention(device) -> Tuple[bool, str]:
    """Whether one-token attention on ``device`` (a CPU) runs as one cpp_cpu call per layer
    (:class:`CpuDecodeAttentionOps`) instead of torch's ~15 operations; ``BITLAB_CPU_ATTENTION=torch`` keeps torch's."""
    return cpp_cpu_or_torch(device, "BITLAB_CPU_ATTENTION", "cpp_cpu.cpu_decode_attention (rotary + cache write + "
                            "attention, one call per layer) for one-token steps")


def cpu_attention_serves(q, k, v, cos, k_cache, v_cache, slots, mask) -> bool:
    """cpu_decode_attention takes it: a one-token CPU step over a contiguous float32 / bfloat16 cache, one dtype
    throughout, an even head_dim, a bool mask, nothing to differentiate."""
    if q.device.type != "cpu" or q.shape[1] != 1 or k_cache is None or mask is None or slots is None:
        return False
    tensors = (q, k, v, cos, k_cache, v_cache)
    if q.dtype not in (torch.float32, torch.bfloat16) or any(t.dtype != q.dtype for t in tensors):
        return False
    if mask.dtype != torch.bool or q.shape[-1] % 2 or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


class CpuDecodeAttentionOps:
    """An ops set whose one-token attention over a CPU cache runs as one ``cpu_decode_attention`` call (rotary, cache
    write, grouped-query attention; ``backends/cpp_cpu/csrc/decode_attention.cpp``), then ``attn_sub_norm`` through
    the set's own ``norm_input``; everything else (prefill included) is the base set's.  Its dot products are added
    in another order than torch's matmul, so an output can differ from torch's in the last bit."""

    def __init__(self, base) -> None:
        self.base = base

    def __getattr__(self, name):
        return getattr(self.base, name)

    def attention(self, q, k, v, cos, sin, k_cache, v_cache, slots, mask, sub_norm_weight, eps, quantize=False):
        if not cpu_attention_serves(q, k, v, cos, k_cache, v_cache, slots, mask):
            return self.base.attention(q, k, v, cos, sin, k_cache, v_cache, slots, mask, sub_norm_weight, eps,
                                       quantize)
        B, S = q.shape[0], k_cache.shape[2]
        out = torch.ops.bitlab.cpu_decode_attention(q, k, v, cos, sin, k_cache, v_cache, slots.reshape(1),
                                                    mask.reshape(B, 1, 1, S), 1.0 / math.sqrt(q.shape[-1]))
        return out if sub_norm_weight is None else self.base.norm_input(out, sub_norm_weight, eps, quantize)


def cuda_ext_or_torch(device, switch: str, torch_fn: Callable, torch_name: str, load_kernel: Callable[[], Callable],
                      kernel_name: str) -> Tuple[Callable, str]:
    """``(function, what runs it and why)`` for one step of the decode loop: the cuda_ext kernel that
    ``load_kernel()`` returns where cuda_ext runs on ``device``, else ``torch_fn``; the environment variable
    ``switch`` set to ``torch`` keeps ``torch_fn`` (for A/B timing)."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch_fn, f"{torch_name} (not a CUDA device)"
    if os.environ.get(switch) == "torch":
        return torch_fn, f"{torch_name} ({switch}=torch)"
    from backends.cuda_ext import ops as cuda_ops

    status = cuda_ops.availability()
    if not status:
        return torch_fn, f"{torch_name} (cuda_ext unavailable: {status.reason})"
    return load_kernel(), f"{kernel_name} ({status.reason})"


def _fused_norm_quant(x: torch.Tensor, weight: torch.Tensor, other: Optional[torch.Tensor] = None) -> bool:
    """The fused kernel serves it: CUDA, half / bf16 rows up to 16384 long, one dtype throughout."""
    return (_FUSED_NORM_QUANT["cuda"] and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
            and weight.dtype == x.dtype and (other is None or other.dtype == x.dtype) and x.shape[-1] <= 16 * 1024)


def _norm_quant_kernel(a: torch.Tensor, b: Optional[torch.Tensor], weight: torch.Tensor, eps: float, mode: int):
    from backends.cuda_ext import ops as cuda_ops

    k, lead = a.shape[-1], a.shape[:-1]
    h, q, scale = cuda_ops.rms_norm_quant(a.reshape(-1, k), None if b is None else b.reshape(-1, k), weight, eps, mode)
    quantized = QuantizedActivation(q.view(a.shape), scale.view(*lead, 1))
    return (h.view(a.shape), quantized) if mode == 1 else quantized


def quantize_tokens(x: torch.Tensor) -> QuantizedActivation:
    """Per-token int8 quantization of ``x [..., K]``, exactly as a W*A8 per-token kernel does it."""
    q, scale = quantize_activation_int8(x.reshape(-1, x.shape[-1]), "per_token")
    return QuantizedActivation(q.view(x.shape), scale.view(*x.shape[:-1], 1))


def norm_input(x: torch.Tensor, weight: torch.Tensor, eps: float, quantize: bool = False):
    """``rms_norm(x)``, quantized per token when ``quantize``: the input of a projection."""
    if quantize and _fused_norm_quant(x, weight):
        return _norm_quant_kernel(x, None, weight, eps, 0)
    y = rms_norm(x, weight, eps)
    return quantize_tokens(y) if quantize else y


def add_rms_norm(residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float, quantize: bool = False):
    """``h = residual + delta`` and ``rms_norm(h)``: the end of one sub-block and the start of the next."""
    if quantize and _fused_norm_quant(residual, weight, delta):
        return _norm_quant_kernel(residual, delta, weight, eps, 1)
    h = residual + delta
    return h, norm_input(h, weight, eps, quantize)


def relu2_gate_norm(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor, eps: float, quantize: bool = False):
    """BitNet's MLP middle: ``ffn_sub_norm(relu(gate)**2 * up)``."""
    if quantize and _fused_norm_quant(gate, weight, up):
        return _norm_quant_kernel(gate, up, weight, eps, 2)
    return norm_input(torch.relu(gate).square() * up, weight, eps, quantize)


def rotary_table(head_dim: int, theta: float, n_positions: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """float32 ``cos, sin [n_positions, head_dim]`` computed as transformers' default RoPE does."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.arange(n_positions, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [B, T, heads, D]`` rotated; ``cos, sin [B, T, 1, D]`` already in x.dtype."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rope_and_cache_write(q, k, v, cos, sin, k_cache, v_cache, slots):
    """Rotate ``q [B, T, H, D]`` and ``k [B, T, KVH, D]``, write ``k, v`` into the caches at ``slots``.

    Returns ``q, k, v`` as ``[B, heads, T, D]``; with a cache, ``k, v`` are the whole caches.
    """
    q = apply_rotary(q, cos, sin).transpose(1, 2)
    k = apply_rotary(k, cos, sin).transpose(1, 2)
    v = v.transpose(1, 2)
    if k_cache is not None:
        k_cache.index_copy_(2, slots, k)
        v_cache.index_copy_(2, slots, v)
        k, v = k_cache, v_cache
    return q, k, v


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: Optional[torch.Tensor],
    v_cache: Optional[torch.Tensor],
    slots: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    sub_norm_weight: torch.Tensor,
    eps: float,
    quantize: bool = False,
):
    """Rotary, KV-cache write, grouped-query attention and ``attn_sub_norm`` (quantized when ``quantize``).

    ``q [B, T, H, D]``, ``k, v [B, T, KVH, D]``.  With a cache
    (``[B, KVH, S, D]``), ``k, v`` are written at cache positions ``slots [T]``
    and the queries attend over the whole cache under ``mask [B, 1, T, S]``
    (True = attend).  Without one, attention is causal over the chunk (and
    ``mask``, when given, is ``[B, 1, T, T]``).  Returns ``[B, T, H * D]``; with ``sub_norm_weight`` None
    the output before ``attn_sub_norm`` (for a projection that takes the norm itself).
    """
    B, T, H, D = q.shape
    kvh = k.shape[2]
    q, k, v = rope_and_cache_write(q, k, v, cos, sin, k_cache, v_cache, slots)
    scale = 1.0 / math.sqrt(D)
    if T == 1 and k_cache is not None:
        # Decode: group the H query heads by KV head so each cached K/V is read once (no repeat).
        g = H // kvh
        qg = q.reshape(B, kvh, g, D)
        scores = torch.matmul(qg, k.transpose(-1, -2)) * scale  # [B, KVH, G, S]
        scores = scores.masked_fill(~mask.view(B, 1, 1, -1), float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, v).reshape(B, 1, H * D)
    else:
        if kvh != H:  # prefill: expand K/V heads for SDPA's fused kernels
            k = k[:, :, None].expand(B, kvh, H // kvh, k.shape[2], D).reshape(B, H, k.shape[2], D)
            v = v[:, :, None].expand(B, kvh, H // kvh, v.shape[2], D).reshape(B, H, v.shape[2], D)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        out = out.transpose(1, 2).reshape(B, T, H * D)
    return out if sub_norm_weight is None else norm_input(out, sub_norm_weight, eps, quantize)


def apply_head(linear, x):
    """The output head (``lm_head`` or its quantized binding) on ``x``."""
    return linear(x)


class Ops:
    """The decoder's float operations, eager."""

    norm_input = staticmethod(norm_input)
    add_rms_norm = staticmethod(add_rms_norm)
    relu2_gate_norm = staticmethod(relu2_gate_norm)
    attention = staticmethod(attention)
    head = staticmethod(apply_head)


class CompiledOps(Ops):
    """The same operations through ``torch.compile`` (fused elementwise kernels).

    Use :func:`compiled_ops` to share one set (and its compiled code) across models and engines.
    """

    def __init__(self, **compile_kwargs) -> None:
        for name in ("norm_input", "add_rms_norm", "relu2_gate_norm", "attention"):
            setattr(self, name, torch.compile(getattr(Ops, name), **compile_kwargs))


def decode_rope_write(q, k, v, cos, sin, k_cache, v_cache, slots) -> torch.Tensor:
    """One-token step: rotary + cache write; returns the rotated queries ``[B, H, D]``."""
    q, _, _ = rope_and_cache_write(q, k, v, cos, sin, k_cache, v_cache, slots)
    return q[:, :, 0]


def combine_sub_norm(acc, m, l_sum, weight: torch.Tensor, eps: float, dtype: torch.dtype, quantize: bool = False):
    """Merge split-KV partials (:mod:`bitmodels.bitnet.triton_attention`) and apply ``attn_sub_norm`` (not
    with ``weight`` None)."""
    from bitmodels.bitnet.triton_attention import combine_partials

    out = combine_partials(acc, m, l_sum).to(dtype)
    return out if weight is None else norm_input(out, weight, eps, quantize)


class TritonDecodeOps(CompiledOps):
    """:class:`CompiledOps` whose one-token attention over a bf16/fp16 CUDA cache runs the split-KV
    Triton kernel (3 kernels per layer instead of 5) where head_dim is a power of two >= 16; everything
    else as CompiledOps."""

    def __init__(self, **compile_kwargs) -> None:
        super().__init__(**compile_kwargs)
        self._generic_attention = self.attention
        self._rope_write = torch.compile(decode_rope_write, **compile_kwargs)
        self._combine = torch.compile(combine_sub_norm, **compile_kwargs)
        self.attention = self._attention

    def _attention(self, q, k, v, cos, sin, k_cache, v_cache, slots, mask, sub_norm_weight, eps, quantize=False):
        from bitmodels.bitnet.triton_attention import decode_attention_partials, supports_head_dim

        if (q.shape[1] != 1 or k_cache is None or not q.is_cuda or q.dtype == torch.float32
                or not supports_head_dim(q.shape[-1])):
            return self._generic_attention(q, k, v, cos, sin, k_cache, v_cache, slots, mask, sub_norm_weight, eps,
                                           quantize)
        q_rot = self._rope_write(q, k, v, cos, sin, k_cache, v_cache, slots)
        if q_rot.stride(-1) != 1:
            q_rot = q_rot.contiguous()
        acc, m, l_sum = decode_attention_partials(q_rot, k_cache, v_cache, mask)
        return self._combine(acc, m, l_sum, sub_norm_weight, eps, q.dtype, quantize)


def fused_decode_attention_status(device) -> str:
    """Empty when cuda_ext's one-token attention kernel can run on ``device``, else why not."""
    device = torch.device(device)
    if device.type != "cuda":
        return "not a CUDA device"
    from backends.cuda_ext import ops as cuda_ops

    status = cuda_ops.availability()
    return "" if status else f"cuda_ext unavailable: {status.reason}"


# Rows up to which one-token attention runs fused (H100, BitNet 2B shape, 512-token prompt, decode tokens/s
# fused vs unfused: batch 1 642 vs 595, 8 4040 vs 4052, 32 10282 vs 9879, 64 13168 vs 13999; per layer the
# kernel ties the compiled torch path at 16-32 rows and loses at 64, docs/benchmarks/decode_attention.md).
FUSED_ATTENTION_MAX_BATCH = 32
# Rows up to which it runs when the set beneath is TritonDecodeOps (the Generator's default with compile and
# Triton): past them the split-KV Triton kernel was faster (H200, same model, decode tokens/s fused vs
# Triton: batch 1 765 vs 709, 8 4634 vs 4977, 32 10934 vs 11454; docs/bitnet.md item 12).
FUSED_ATTENTION_MAX_BATCH_BEFORE_TRITON = 4


class GatheredInputsOps:
    """Another ops set whose step inputs (each token's embedding row and rotary rows) come from one lookup
    ``gather(table, ids, cos_table, sin_table, positions) -> (h, cos, sin)`` (cuda_ext's kernel,
    :mod:`backends.cuda_ext.step_inputs`: one launch instead of three at the head of every step); everything else is
    the base set's.  The rows are the tables', bit for bit."""

    def __init__(self, base, gather: Callable) -> None:
        self.base = base
        self.step_inputs = gather

    def __getattr__(self, name):
        return getattr(self.base, name)


def use_step_inputs_kernel(device) -> Tuple[Optional[Callable], str]:
    """The step inputs' lookup for ``device``: cuda_ext's one kernel where it runs (``BITLAB_STEP_INPUTS=torch``
    keeps torch's embedding and index ops, for A/B timing), else None; and what runs it, with the reason."""

    def load():
        from backends.cuda_ext.step_inputs import gather_step_inputs

        return gather_step_inputs

    return cuda_ext_or_torch(device, "BITLAB_STEP_INPUTS", None, "torch (embedding, then rotary rows by index)", load,
                             "cuda_ext.gather_step_inputs (embedding and rotary rows, one kernel)")


class FusedDecodeAttentionOps:
    """Another ops set (eager or compiled) whose one-token attention over a CUDA cache runs as one
    cuda_ext kernel (rotary + cache write + attention, :mod:`backends.cuda_ext.decode_attention`), then
    ``attn_sub_norm`` through the set's own ``norm_input``.  What the kernel does not take (prefill,
    more than ``max_batch`` rows (default FUSED_ATTENTION_MAX_BATCH), float32, head_dim other than 64 /
    128) goes to the set's own ``attention``."""

    def __init__(self, base, max_batch: Optional[int] = None) -> None:
        self.base = base
        self.max_batch = max_batch  # None: FUSED_ATTENTION_MAX_BATCH, read at every call
        self.norm_input, self.add_rms_norm = base.norm_input, base.add_rms_norm
        self.relu2_gate_norm = base.relu2_gate_norm
        self.head = getattr(base, "head", apply_head)

    def attention(self, q, k, v, cos, sin, k_cache, v_cache, slots, mask, sub_norm_weight, eps, quantize=False):
        from backends.cuda_ext import decode_attention as fused

        limit = FUSED_ATTENTION_MAX_BATCH if self.max_batch is None else self.max_batch
        if (q.shape[1] != 1 or q.shape[0] > limit or k_cache is None or mask is None
                or fused.supports(q, k_cache)):
            return self.base.attention(q, k, v, cos, sin, k_cache, v_cache, slots, mask, sub_norm_weight, eps,
                                       quantize)
        B = q.shape[0]
        out = fused.decode_attention(q[:, 0], k[:, 0], v[:, 0], cos.reshape(B, -1), sin.reshape(B, -1), k_cache,
                                     v_cache, slots.reshape(1), mask.reshape(B, -1),
                                     dependent_launch=True)  # after the q/k/v projection, which writes no cache
        if sub_norm_weight is None:
            return out.view(B, 1, -1)
        return self.base.norm_input(out.view(B, 1, -1), sub_norm_weight, eps, quantize)

    def qkv_attention(self, x, qkv, cos, sin, k_cache, v_cache, slots, mask, sub_norm_weight, eps, quantize=False):
        """The attention of one row whose q/k/v projection (``qkv``, a bound ``FusedQkv``) runs inside the kernel on
        ``x``, the input norm's int8 output (:func:`backends.cuda_ext.decode_attention.decode_qkv_attention`), then
        ``attn_sub_norm`` as :meth:`attention`; None where the kernel does not take them (the caller then projects
        and calls :meth:`attention`)."""
        from backends.cuda_ext import decode_attention as fused
        from bitmodels.bitnet.bindings import QuantizedActivation

        if not isinstance(x, QuantizedActivation) or k_cache is None or mask is None or k_cache.shape[0] != 1:
            return None
        xq = x.q.reshape(-1, x.q.shape[-1])
        if xq.shape != (1, qkv.in_features) or fused.qkv_cluster(qkv, k_cache.dtype, k_cache.shape[2]) == 0:
            return None
        out = fused.decode_qkv_attention(xq, x.scale.reshape(1), qkv, cos.reshape(1, -1), sin.reshape(1, -1),
                                         k_cache, v_cache, slots.reshape(1), mask.reshape(1, -1),
                                         dependent_launch=True)  # after the input norm, which writes no cache
        if sub_norm_weight is None:
            return out.view(1, 1, -1)
        return self.base.norm_input(out.view(1, 1, -1), sub_norm_weight, eps, quantize)


_SHARED: dict = {}


def compiled_ops(triton_attention: bool = False) -> CompiledOps:
    """The process-wide :class:`CompiledOps` (or :class:`TritonDecodeOps`), default compile settings."""
    cls = TritonDecodeOps if triton_attention else CompiledOps
    if cls not in _SHARED:
        _SHARED[cls] = cls()
    return _SHARED[cls]

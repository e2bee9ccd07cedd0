"""``bitlab::cuda_ext_decode_attention``: one-token grouped-query attention, rotary and KV-cache write in
one CUDA kernel (``csrc/decode_attention.cu``).

For a decode step (one new token per row) it replaces the rotary kernels, the two cache writes,
the score / softmax / value kernels and the split combine of the unfused path.  Semantics
(those of :func:`bitmodels.bitnet.ops.attention` for ``T == 1`` with a cache):

* ``q_rot = q * cos + rotate_half(q) * sin`` and the same for ``k`` (float32, rounded to the
  cache dtype), ``k_rot`` and ``v`` are written at cache position ``slot``;
* each query head ``i`` attends with KV head ``i // (H / KVH)`` over the cache keys ``<= slot``
  that ``mask`` allows, softmax in float32, ``scale`` on the scores;
* returns ``[B, H * D]`` in the activation dtype.

The keys of each (row, KV head) are split over a thread-block cluster whose blocks merge their
partial softmax sums through distributed shared memory, so the kernel needs sm_90 (Hopper).

Example::

    out = decode_attention(q, k, v, cos, sin, k_cache, v_cache, slot, mask)   # q [B, H, D]
"""
from __future__ import annotations

import math
import torch

from backends.cuda_ext import ops

GROUPS = (1, 2, 4, 8)  # query heads per KV head (csrc/decode_attention.cu instantiations)
HEAD_DIMS = (64, 128)


def _fake(q, k, v, cos, sin, k_cache, v_cache, slot, mask, scale, dependent_launch=False):
    return q.new_empty((q.shape[0], q.shape[1] * q.shape[2]))


def register_fake() -> None:
    torch.library.register_fake("bitlab::cuda_ext_decode_attention")(_fake)


def supports(q: torch.Tensor, k_cache: torch.Tensor) -> str:
    """Empty string when the kernel takes these shapes and dtypes, else why not."""
    if q.dtype not in (torch.float16, torch.bfloat16) or k_cache.dtype != q.dtype:
        return f"dtype {q.dtype} (cache {k_cache.dtype}); the kernel takes float16 or bfloat16"
    d, heads, kv_heads = q.shape[-1], q.shape[-2], k_cache.shape[1]
    if d not in HEAD_DIMS:
        return f"head_dim {d} not in {HEAD_DIMS}"
    if heads % kv_heads or heads // kv_heads not in GROUPS:
        return f"{heads} query heads over {kv_heads} KV heads: the kernel takes groups of {GROUPS}"
    if not q.is_cuda:
        return f"queries on {q.device}, not CUDA"
    major, minor = torch.cuda.get_device_capability(q.device)
    if major < 9:
        return f"GPU compute capability {major}.{minor}: the kernel needs 9.0 (thread-block clusters)"
    return ""


def check_inputs(q, k, v, cos, sin, k_cache, v_cache, slot, mask) -> None:
    """ValueError naming the problem (the op checks again; a C++ error would be harder to read)."""
    why = supports(q, k_cache)
    if why:
        raise ValueError(f"decode_attention: {why}")
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"decode_attention: q [B, H, D], k and v [B, KVH, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, H, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2] != D:
        raise ValueError(f"decode_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must both be [{B}, KVH, {D}]")
    kvh = k.shape[1]
    if k_cache.shape != v_cache.shape or k_cache.dim() != 4 or tuple(k_cache.shape[:2]) != (B, kvh) \
            or k_cache.shape[3] != D or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError(f"decode_attention: caches must be contiguous [{B}, {kvh}, S, {D}]; got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(2) != 1 or t.stride(1) != D or t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"decode_attention: {name} needs contiguous heads (strides (*, {D}, 1)) in {q.dtype} on "
                             f"{q.device}; got strides {t.stride()} {t.dtype} on {t.device}")
    for name, t in (("cos", cos), ("sin", sin), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"decode_attention: {name} is {t.dtype} on {t.device}; expected {q.dtype} on {q.device}")
    if cos.shape != (B, D) or sin.shape != (B, D):
        raise ValueError(f"decode_attention: cos and sin must be [{B}, {D}]; got {tuple(cos.shape)}, {tuple(sin.shape)}")
    S = k_cache.shape[2]
    if mask.shape != (B, S) or mask.dtype not in (torch.bool, torch.uint8) or mask.stride(1) != 1 \
            or mask.device != q.device:
        raise ValueError(f"decode_attention: mask must be bool/uint8 [{B}, {S}] with unit column stride on "
                         f"{q.device}; got {mask.dtype} {tuple(mask.shape)} strides {mask.stride()}")
    if slot.dtype != torch.int64 or slot.numel() != 1 or slot.device != q.device:
        raise ValueError(f"decode_attention: slot must be one int64 on {q.device}; got {slot.dtype} "
                         f"{tuple(slot.shape)} on {slot.device}")


def decode_attention(q, k, v, cos, sin, k_cache, v_cache, slot, mask, scale=None,
                     dependent_launch: bool = False) -> torch.Tensor:
    """``[B, H * D]`` attention output of one new token per row; writes ``k``, ``v`` at ``slot`` (module docstring).

    ``dependent_launch=True`` promises that no kernel that may still run when this one starts writes the
    caches: neither the kernel just before this call on the stream nor one that kernel lets start before it
    waits itself (BitNet's q/k/v projection and the norm before it write none).  The kernel then launches as
    a programmatic dependent and starts loading cache rows before it waits for q, k, v."""
    check_inputs(q, k, v, cos, sin, k_cache, v_cache, slot, mask)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return ops._op("cuda_ext_decode_attention")(q, k, v, cos, sin, k_cache, v_cache, slot, mask, scale,
                                                bool(dependent_launch))

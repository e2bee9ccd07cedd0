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

``decode_qkv_attention`` is the same for one row with the fused q/k/v projection inside: from the int8 input
``xq`` (the input norm's output) each cluster computes its KV head's query, key and value rows itself (the
projection's lane tiles, copied into shared memory before the kernel waits for its input), with the int8 GEMV's
rounding, so its output is the projection's kernel followed by :func:`decode_attention`, bit for bit, where
both take the same cluster size (it may take more blocks, so that each holds at most 96 KB of weight tiles).

Example::

    out = decode_attention(q, k, v, cos, sin, k_cache, v_cache, slot, mask)   # q [B, H, D]
    qkv = prepare_qkv_attention(layer.bound["qkv"].prepared, heads=20, kv_heads=5, head_dim=128)
    out = decode_qkv_attention(xq, x_scale, qkv, cos, sin, k_cache, v_cache, slot, mask)   # xq [1, K] int8
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from backends.cuda_ext import ops

GROUPS = (1, 2, 4, 8)  # query heads per KV head (csrc/decode_attention.cu instantiations)
HEAD_DIMS = (64, 128)


TERNARY_FORMAT = 1  # layout.FORMAT_CODE[1.58]


def _fake(q, k, v, cos, sin, k_cache, v_cache, slot, mask, scale, dependent_launch=False):
    return q.new_empty((q.shape[0], q.shape[1] * q.shape[2]))


def _qkv_fake(xq, x_scale, wq, w_scale, cos, sin, k_cache, v_cache, slot, mask, scale, H, dependent_launch=False):
    return k_cache.new_empty((1, H * k_cache.shape[3]))


def register_fake() -> None:
    torch.library.register_fake("bitlab::cuda_ext_decode_attention")(_fake)
    torch.library.register_fake("bitlab::cuda_ext_decode_qkv_attention")(_qkv_fake)


def supports(q: torch.Tensor, k_cache: torch.Tensor) -> str:
    """Empty string when the kernel takes these shapes and dtypes, else why not."""
    if q.dtype not in (torch.float16, torch.bfloat16) or k_cache.dtype != q.dtype:
        return f"dtype {q.dtype} (cache {k_cache.dtype}); the kernel takes float16 or bfloat16"
    d, heads, kv_heads = q.shape[-1], q.shape[-2], k_cache.shape[1]
    if d not in HEAD_DIMS:
        return f"head_dim {d} not in {HEAD_DIMS}"
    if heads % kv_heads or heads // kv_heads not in GROUPS:
        return f"{heads} query heads over {kv_heads} KV heads: the kernel takes groups of {GROUPS}"
    return ops.sm90_why_not(q.device, "queries", "thread-block clusters")


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


@dataclass
class FusedQkv:
    """A layer's fused q/k/v projection as :func:`decode_qkv_attention` takes it: the prepared ternary lane tiles
    (rows: ``heads * head_dim`` queries, then ``kv_heads * head_dim`` keys, then as many values) and their
    per-row float32 scales."""

    wq: torch.Tensor
    w_scale: torch.Tensor
    in_features: int
    heads: int
    kv_heads: int
    head_dim: int


def qkv_why_not(prepared, heads: int, kv_heads: int, head_dim: int) -> str:
    """Empty when the kernel takes this prepared projection (``CudaExtWeight`` of the fused q/k/v), else why not."""
    from backends.cuda_ext.kernels import CudaExtWeight

    if not isinstance(prepared, CudaExtWeight):
        return "the q/k/v projection is not prepared by the cuda_ext kernels"
    if prepared.fmt != TERNARY_FORMAT or prepared.act_mode != ops.ACT_INT8_PER_TOKEN:
        return "the kernel takes ternary (1.58-bit) weights on int8 per-token activations only"
    if head_dim not in HEAD_DIMS or kv_heads < 1 or heads % kv_heads or heads // kv_heads not in GROUPS:
        return f"{heads} heads over {kv_heads} KV heads of dim {head_dim}: the kernel takes {GROUPS} / {HEAD_DIMS}"
    if prepared.out_features != (heads + 2 * kv_heads) * head_dim:
        return (f"the fused projection has {prepared.out_features} rows; q, k, v of {heads} / {kv_heads} heads of "
                f"{head_dim} need {(heads + 2 * kv_heads) * head_dim}")
    return ops.sm90_why_not(prepared.wq.device, "weights", "thread-block clusters, bulk copies")


def prepare_qkv_attention(prepared, heads: int, kv_heads: int, head_dim: int) -> FusedQkv:
    """The fused projection's tiles and per-row scales for :func:`decode_qkv_attention` (no copy of the tiles)."""
    why = qkv_why_not(prepared, heads, kv_heads, head_dim)
    if why:
        raise ValueError(f"decode_qkv_attention: {why}")
    n = prepared.out_features
    scale = prepared.scale.float().reshape(-1)
    scale = (scale.expand(n) if scale.numel() == 1 else scale).contiguous()
    return FusedQkv(prepared.wq, scale, prepared.in_features, heads, kv_heads, head_dim)


def qkv_cluster(qkv: FusedQkv, dtype: torch.dtype, cache_len: int) -> int:
    """Blocks per cluster the kernel takes for a cache of ``cache_len`` positions in ``dtype`` on the weights'
    device (0: it does not run them: the tiles of a KV head need more than 16 blocks, or no such cluster fits)."""
    ops.load()
    with torch.cuda.device(qkv.wq.device):
        return int(torch.ops.bitlab.cuda_ext_decode_qkv_attention_cluster(
            dtype, qkv.heads, qkv.kv_heads, qkv.head_dim, qkv.in_features, cache_len))


def check_qkv_inputs(xq, x_scale, qkv: FusedQkv, cos, sin, k_cache, v_cache, slot, mask) -> None:
    """ValueError naming the problem (the op checks again)."""
    K, D = qkv.in_features, qkv.head_dim
    if xq.dtype != torch.int8 or xq.shape != (1, K) or xq.stride(-1) != 1:
        raise ValueError(f"decode_qkv_attention: xq must be one contiguous int8 row [1, {K}], got {xq.dtype} "
                         f"{tuple(xq.shape)} strides {xq.stride()}")
    if xq.data_ptr() % 16:
        raise ValueError("decode_qkv_attention: xq must start on a 16-byte boundary")
    if x_scale.dtype != torch.float32 or x_scale.numel() != 1:
        raise ValueError(f"decode_qkv_attention: x_scale must be one float32, got {x_scale.dtype} with "
                         f"{x_scale.numel()} values")
    if k_cache.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"decode_qkv_attention: cache dtype {k_cache.dtype}; the kernel takes float16 or bfloat16")
    shape = (1, qkv.kv_heads, k_cache.shape[2] if k_cache.dim() == 4 else -1, D)
    if k_cache.dim() != 4 or tuple(k_cache.shape) != shape or v_cache.shape != k_cache.shape \
            or not (k_cache.is_contiguous() and v_cache.is_contiguous()) or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"decode_qkv_attention: caches must be contiguous [1, {qkv.kv_heads}, S, {D}] of one dtype; "
                         f"got {tuple(k_cache.shape)} {k_cache.dtype} and {tuple(v_cache.shape)} {v_cache.dtype}")
    for name, t in (("xq", xq), ("x_scale", x_scale), ("cos", cos), ("sin", sin), ("k_cache", k_cache),
                    ("v_cache", v_cache), ("slot", slot), ("mask", mask)):
        if t.device != qkv.wq.device:
            raise ValueError(f"decode_qkv_attention: {name} on {t.device}, weights on {qkv.wq.device}")
    if cos.dtype != k_cache.dtype or sin.dtype != k_cache.dtype or cos.numel() != D or sin.numel() != D:
        raise ValueError(f"decode_qkv_attention: cos and sin must be [1, {D}] in {k_cache.dtype}; got "
                         f"{cos.dtype} {tuple(cos.shape)}, {sin.dtype} {tuple(sin.shape)}")
    S = k_cache.shape[2]
    if mask.shape != (1, S) or mask.dtype not in (torch.bool, torch.uint8) or mask.stride(1) != 1:
        raise ValueError(f"decode_qkv_attention: mask must be bool/uint8 [1, {S}] with unit column stride; got "
                         f"{mask.dtype} {tuple(mask.shape)} strides {mask.stride()}")
    if slot.dtype != torch.int64 or slot.numel() != 1:
        raise ValueError(f"decode_qkv_attention: slot must be one int64; got {slot.dtype} {tuple(slot.shape)}")


def decode_qkv_attention(xq, x_scale, qkv: FusedQkv, cos, sin, k_cache, v_cache, slot, mask, scale=None,
                         dependent_launch: bool = False) -> torch.Tensor:
    """``[1, H * D]`` attention output of one row, its q/k/v projected inside from ``xq [1, K]`` int8 and its
    scale (module docstring); writes this step's key and value at ``slot``.  ``dependent_launch`` as for
    :func:`decode_attention` (the norm before it writes no cache)."""
    check_qkv_inputs(xq, x_scale, qkv, cos, sin, k_cache, v_cache, slot, mask)
    scale = 1.0 / math.sqrt(qkv.head_dim) if scale is None else float(scale)
    return ops._op("cuda_ext_decode_qkv_attention")(
        xq, x_scale.reshape(1), qkv.wq, qkv.w_scale, cos.reshape(1, -1), sin.reshape(1, -1), k_cache, v_cache,
        slot.reshape(1), mask, scale, qkv.heads, bool(dependent_launch))

"""Split-KV decode attention in Triton (flash-decoding) for grouped-query attention over a static cache.

One query token per row attends over the cache ``[B, KVH, S, D]`` under a boolean mask
``[B, S]``.  Program ``(b * KVH + kvh, split)`` takes the ``G = H / KVH`` query heads that share
KV head ``kvh`` (padded to 16 rows for ``tl.dot``) and keys ``split * SPLIT .. + SPLIT``, and
writes an online-softmax partial: the running max ``m``, the sum ``l`` of ``exp(s - m)`` and the
unnormalized ``acc = sum exp(s - m) * v`` (float32).  :func:`combine_partials` merges the splits
(plain tensor code, fused by ``torch.compile`` with the ``attn_sub_norm`` that follows).

Why: the grouped ``matmul -> softmax -> matmul`` of the eager decode path is three kernels per
layer that each read their operands again; this is one, spread over ``B * KVH * S / SPLIT``
programs so that batch 1 still fills the GPU.  Masked keys are never loaded.

Scores use float32 (``q . k`` of bf16 operands accumulated in float32), probabilities are
rounded to the value dtype for the ``p @ v`` product, as the eager path does.

Example::

    acc, m, l = decode_attention_partials(q_rot, k_cache, v_cache, mask)   # q_rot [B, H, D]
    out = combine_partials(acc, m, l)                                    # [B, 1, H * D] float32
"""
from __future__ import annotations

import math

import torch

try:  # Triton ships with CUDA builds of torch; the CPU-only build has none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

SPLIT = 128  # keys per program
BLOCK_N = 64  # keys per inner step
def available() -> bool:
    return triton is not None


if triton is not None:
    NEG = tl.constexpr(-1.0e30)  # "minus infinity" that keeps exp() and max() finite for fully masked splits

    @triton.jit
    def _decode_partials_kernel(
        Q, K, V, MASK, ACC, M, L,
        stride_qb, stride_qh,
        stride_kb, stride_kh, stride_ks,
        stride_vb, stride_vh, stride_vs,
        stride_mb,
        S, KVH, NSPLIT, scale,
        G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, SPLIT_: tl.constexpr, BLOCK: tl.constexpr,
    ):
        pid_bh = tl.program_id(0)
        pid_s = tl.program_id(1)
        b = pid_bh // KVH
        h = pid_bh % KVH
        offs_g = tl.arange(0, G_PAD)
        offs_d = tl.arange(0, D)
        g_ok = offs_g < G
        q = tl.load(Q + b * stride_qb + (h * G + offs_g)[:, None] * stride_qh + offs_d[None, :],
                    mask=g_ok[:, None], other=0.0)
        m_i = tl.full([G_PAD], NEG, dtype=tl.float32)
        l_i = tl.zeros([G_PAD], dtype=tl.float32)
        acc = tl.zeros([G_PAD, D], dtype=tl.float32)
        for n0 in range(0, SPLIT_, BLOCK):
            offs_n = pid_s * SPLIT_ + n0 + tl.arange(0, BLOCK)
            in_range = offs_n < S
            valid = tl.load(MASK + b * stride_mb + offs_n, mask=in_range, other=0) != 0
            k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :],
                        mask=valid[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale
            s = tl.where(valid[None, :], s, NEG)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.where(valid[None, :], tl.exp(s - m_new[:, None]), 0.0)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :],
                        mask=valid[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        row = (pid_bh * NSPLIT + pid_s) * G + offs_g  # partials are [B, KVH, NSPLIT, G(, D)]
        tl.store(M + row, m_i, mask=g_ok)
        tl.store(L + row, l_i, mask=g_ok)
        tl.store(ACC + row[:, None] * D + offs_d[None, :], acc, mask=g_ok[:, None])


def supports_head_dim(head_dim: int) -> bool:
    """Whether the split-KV kernel takes this head_dim (a power of two >= 16)."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def decode_attention_partials(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, mask: torch.Tensor):
    """Partials ``(acc [B, KVH, NSPLIT, G, D], m [B, KVH, NSPLIT, G], l [B, KVH, NSPLIT, G])``, float32.

    ``q [B, H, D]`` (rotated), caches ``[B, KVH, S, D]`` with unit stride along D, ``mask [B, S]``
    (bool or uint8; True = attend).  Every row needs at least one attended key.
    """
    B, H, D = q.shape
    _, KVH, S, _ = k_cache.shape
    G = H // KVH
    if not supports_head_dim(D):
        raise ValueError(f"head_dim {D}: the Triton decode kernel needs a power of two >= 16")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q and the caches need unit stride along head_dim")
    mask = mask.reshape(B, S)
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    nsplit = triton.cdiv(S, SPLIT)
    acc = torch.empty(B, KVH, nsplit, G, D, device=q.device, dtype=torch.float32)
    m = torch.empty(B, KVH, nsplit, G, device=q.device, dtype=torch.float32)
    l_sum = torch.empty_like(m)
    _decode_partials_kernel[(B * KVH, nsplit)](
        q, k_cache, v_cache, mask, acc, m, l_sum,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        mask.stride(0),
        S, KVH, nsplit, 1.0 / math.sqrt(D),
        G=G, G_PAD=max(16, triton.next_power_of_2(G)), D=D, SPLIT_=SPLIT, BLOCK=BLOCK_N,
    )
    return acc, m, l_sum


def combine_partials(acc: torch.Tensor, m: torch.Tensor, l_sum: torch.Tensor) -> torch.Tensor:
    """Merge the splits' online-softmax partials: ``[B, 1, H * D]`` float32 attention output."""
    B, KVH, _, G, D = acc.shape
    w = torch.exp(m - m.amax(dim=2, keepdim=True))
    out = (acc * w[..., None]).sum(2) / (l_sum * w).sum(2)[..., None]
    return out.reshape(B, 1, KVH * G * D)

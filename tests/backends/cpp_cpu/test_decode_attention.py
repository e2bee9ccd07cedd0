"""cpu_decode_attention (csrc/decode_attention.cpp): one-token rotary + cache write + grouped-query attention, against
the torch operations it replaces (bitmodels.bitnet.ops.attention's decode branch) on fresh random inputs: the rotated
key written to the cache with torch's bits, the outputs within a unit in the last place of bf16 (the dot products
are added in another order than torch's matmul), on every instruction set the CPU has."""
from __future__ import annotations

import math
import os

import pytest
import torch

from bitmodels.bitnet import ops

SHAPES = [  # B, H, KVH, S, D
    (1, 20, 5, 64, 128),  # BitNet 2B's heads
    (3, 8, 2, 37, 64),
    (2, 4, 4, 5, 6),  # one query head per KV head, a head_dim that is no multiple of 8
    (1, 6, 1, 130, 40),  # every query head on one KV head, a tail of 8 in the dot products
    (2, 2, 1, 1, 2),  # one cache position
]


def fresh_generator():
    seed = int.from_bytes(os.urandom(4), "little")
    return torch.Generator().manual_seed(seed), seed


def make_inputs(gen, B, H, KVH, S, D, dtype, slot=None):
    q = torch.randn(B, 1, H, D, generator=gen).to(dtype)
    k = torch.randn(B, 1, KVH, D, generator=gen).to(dtype)
    v = torch.randn(B, 1, KVH, D, generator=gen).to(dtype)
    angles = torch.rand(B, 1, 1, D, generator=gen) * 50
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    k_cache = torch.randn(B, KVH, S, D, generator=gen).to(dtype)
    v_cache = torch.randn(B, KVH, S, D, generator=gen).to(dtype)
    slot = torch.randint(S, (1,), generator=gen) if slot is None else torch.tensor([slot])
    mask = torch.rand(B, 1, 1, S, generator=gen) > 0.3
    mask[..., int(slot)] = True  # the new token attends to itself, as in decoding
    return q, k, v, cos, sin, k_cache, v_cache, slot, mask


def both_paths(inputs):
    """(torch path's output and caches, cpu_decode_attention's), each on its own copy of the caches."""
    q, k, v, cos, sin, k_cache, v_cache, slot, mask = inputs
    kc_t, vc_t, kc_c, vc_c = k_cache.clone(), v_cache.clone(), k_cache.clone(), v_cache.clone()
    want = ops.attention(q, k, v, cos, sin, kc_t, vc_t, slot, mask, None, 1e-5)
    got = torch.ops.bitlab.cpu_decode_attention(q, k, v, cos, sin, kc_c, vc_c, slot, mask, 1 / math.sqrt(q.shape[-1]))
    return (want, kc_t, vc_t), (got, kc_c, vc_c)


def assert_close_to_torch(got, want, dtype, seed):
    assert got.shape == want.shape and got.dtype == want.dtype
    if dtype == torch.bfloat16:
        # a score a unit off in bf16 moves the softmax by ~0.4 %, so the outputs by a few units at most
        assert torch.allclose(got.float(), want.float(), rtol=2**-6, atol=2**-9), f"seed {seed}"
        assert (got == want).float().mean() > 0.97, f"seed {seed}: {(got != want).sum().item()} of {got.numel()} differ"
    else:
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), f"seed {seed}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_the_torch_operations(cpp_ops, isa, shape, dtype):
    gen, seed = fresh_generator()
    (want, kc_t, vc_t), (got, kc_c, vc_c) = both_paths(make_inputs(gen, *shape, dtype))
    assert torch.equal(kc_c, kc_t), f"seed {seed}: the rotated key written to the cache differs from torch's"
    assert torch.equal(vc_c, vc_t), f"seed {seed}"
    assert_close_to_torch(got, want, dtype, seed)


@pytest.mark.parametrize("slot", ["first", "last"])
def test_writes_the_first_and_last_slot(cpp_ops, slot):
    gen, seed = fresh_generator()
    B, H, KVH, S, D = 2, 8, 2, 33, 64
    inputs = make_inputs(gen, B, H, KVH, S, D, torch.bfloat16, slot=0 if slot == "first" else S - 1)
    (want, kc_t, vc_t), (got, kc_c, vc_c) = both_paths(inputs)
    assert torch.equal(kc_c, kc_t) and torch.equal(vc_c, vc_t), f"seed {seed}"
    assert_close_to_torch(got, want, torch.bfloat16, seed)


def test_masked_positions_are_never_read(cpp_ops):
    """NaN in cache positions no row attends to changes nothing (torch's matmul would spread it: 0 * NaN)."""
    gen, seed = fresh_generator()
    q, k, v, cos, sin, k_cache, v_cache, slot, mask = make_inputs(gen, 2, 8, 2, 40, 64, torch.bfloat16, slot=39)
    mask[..., :10] = False
    clean = torch.ops.bitlab.cpu_decode_attention(q, k, v, cos, sin, k_cache.clone(), v_cache.clone(), slot, mask,
                                                  0.125)
    k_cache[:, :, :10], v_cache[:, :, :10] = float("nan"), float("nan")
    dirty = torch.ops.bitlab.cpu_decode_attention(q, k, v, cos, sin, k_cache, v_cache, slot, mask, 0.125)
    assert torch.equal(dirty, clean), f"seed {seed}"


def test_a_row_attending_nowhere_is_nan_as_in_torch(cpp_ops):
    gen, _ = fresh_generator()
    q, k, v, cos, sin, k_cache, v_cache, slot, mask = make_inputs(gen, 2, 4, 2, 8, 16, torch.float32)
    mask[1] = False
    (want, _, _), (got, _, _) = both_paths((q, k, v, cos, sin, k_cache, v_cache, slot, mask))
    assert torch.isnan(want[1]).all() and torch.isnan(got[1]).all()
    assert torch.isfinite(got[0]).all()


def test_strided_rows_of_one_projection_output(cpp_ops):
    """q, k and v as views of one fused q/k/v output row (their batch strides are the row's), as the model passes
    them."""
    gen, seed = fresh_generator()
    B, H, KVH, S, D = 3, 8, 2, 20, 32
    _, _, _, cos, sin, k_cache, v_cache, slot, mask = make_inputs(gen, B, H, KVH, S, D, torch.bfloat16)
    qkv = torch.randn(B, 1, (H + 2 * KVH) * D, generator=gen).bfloat16()
    q, k, v = qkv.split([H * D, KVH * D, KVH * D], dim=-1)
    q, k, v = q.view(B, 1, H, D), k.view(B, 1, KVH, D), v.view(B, 1, KVH, D)
    assert not q.is_contiguous()
    (want, kc_t, _), (got, kc_c, _) = both_paths((q, k, v, cos, sin, k_cache, v_cache, slot, mask))
    assert torch.equal(kc_c, kc_t), f"seed {seed}"
    assert_close_to_torch(got, want, torch.bfloat16, seed)


def test_the_same_result_on_one_and_two_threads(cpp_ops):
    from backends.cpp_cpu.threads import pinned_threads

    gen, seed = fresh_generator()
    inputs = make_inputs(gen, 3, 20, 5, 50, 128, torch.bfloat16)
    results = []
    for n in (1, 2):
        q, k, v, cos, sin, k_cache, v_cache, slot, mask = inputs
        with pinned_threads(n):
            results.append(torch.ops.bitlab.cpu_decode_attention(q, k, v, cos, sin, k_cache.clone(), v_cache.clone(),
                                                                 slot, mask, 0.088))
    assert torch.equal(results[0], results[1]), f"seed {seed}"


@pytest.mark.parametrize("case, match", [
    ("float16", "float32 or bfloat16"),
    ("two tokens", r"q must be \[2, 1, 8, 16\]"),
    ("cache not contiguous", "k_cache must be a contiguous"),
    ("kv heads not dividing", "KVH dividing H=8"),
    ("v cache shape", "v_cache must be contiguous and shaped like k_cache"),
    ("slot outside", "slot 9 is outside the cache's 9 positions"),
    ("two slots", "slots must hold one int64"),
    ("mask dtype", "mask must be bool"),
    ("odd head_dim", "head_dim 15 must be even"),
])
def test_bad_inputs_name_the_problem(cpp_ops, case, match):
    gen, _ = fresh_generator()
    B, H, KVH, S, D = 2, 8, 2, 9, 16
    q, k, v, cos, sin, k_cache, v_cache, slot, mask = make_inputs(gen, B, H, KVH, S, D, torch.float32)
    if case == "float16":
        q = q.half()
    elif case == "two tokens":
        q = torch.cat([q, q], dim=1)
    elif case == "cache not contiguous":
        k_cache = k_cache.transpose(2, 3).contiguous().transpose(2, 3)
    elif case == "kv heads not dividing":
        k_cache = v_cache = torch.randn(B, 3, S, D)
    elif case == "v cache shape":
        v_cache = torch.randn(B, KVH, S + 1, D)
    elif case == "slot outside":
        slot = torch.tensor([S])
    elif case == "two slots":
        slot = torch.tensor([0, 1])
    elif case == "mask dtype":
        mask = mask.to(torch.uint8)
    elif case == "odd head_dim":
        D = 15
        q, k, v, cos, sin, k_cache, v_cache, slot, mask = make_inputs(gen, B, H, KVH, S, D, torch.float32)
    before = k_cache.clone()
    with pytest.raises(RuntimeError, match=match):
        torch.ops.bitlab.cpu_decode_attention(q, k, v, cos, sin, k_cache, v_cache, slot, mask, 0.25)
    assert torch.equal(k_cache, before), "a refused call must not write the cache"


def test_traces_under_torch_compile(cpp_ops):
    """A fake implementation is registered: torch.compile(fullgraph=True) traces through the op (mutating the
    caches as the eager call does)."""
    gen, seed = fresh_generator()
    q, k, v, cos, sin, k_cache, v_cache, slot, mask = make_inputs(gen, 2, 8, 2, 24, 32, torch.bfloat16)

    def step(kc, vc):
        return torch.ops.bitlab.cpu_decode_attention(q, k, v, cos, sin, kc, vc, slot, mask, 0.17)

    kc_e, vc_e, kc_c, vc_c = k_cache.clone(), v_cache.clone(), k_cache.clone(), v_cache.clone()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(kc_c, vc_c), step(kc_e, vc_e)), f"seed {seed}"
    assert torch.equal(kc_c, kc_e) and torch.equal(vc_c, vc_e)

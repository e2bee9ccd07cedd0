"""cuda_ext's one-token attention kernel (rotary + KV-cache write + grouped-query attention) against a
float32 reference on fresh random inputs; bad inputs named before the op (those run without a GPU)."""
import math

import pytest
import torch

from backends.cuda_ext import decode_attention as fused
from bitmodels.bitnet.ops import rotary_table
from tests.backends.cuda_ext.int8_weights import fresh_generator, prepared_weight


def reference(q, k, v, cos, sin, k_cache, v_cache, slot, mask):
    """float32 math with the kernel's rounding points: rotated q and k rounded to the cache dtype."""
    B, H, D = q.shape
    KVH, S = k_cache.shape[1], k_cache.shape[2]

    def rotate(x):
        half = D // 2
        turned = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return (x.float() * cos[:, None].float() + turned.float() * sin[:, None].float()).to(x.dtype)

    kc, vc = k_cache.clone(), v_cache.clone()
    kc[:, :, slot] = rotate(k)
    vc[:, :, slot] = v
    qg = rotate(q).float().view(B, KVH, H // KVH, D)
    scores = torch.einsum("bhgd,bhsd->bhgs", qg, kc.float()) / math.sqrt(D)
    attend = mask.bool() & (torch.arange(S, device=q.device) <= slot)[None]
    scores = scores.masked_fill(~attend[:, None, None], float("-inf"))
    out = torch.einsum("bhgs,bhsd->bhgd", scores.softmax(-1), vc.float())
    return out.reshape(B, H * D), kc, vc


def capture(step):
    """``(graph, output)`` of ``step`` captured after one run on a side stream."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


def make_inputs(B, H, KVH, D, S, slot, dtype, seed, pads=None):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, device="cuda", generator=gen).to(dtype)  # noqa: E731
    qkv = rnd(B, (H + 2 * KVH) * D)  # q, k, v are views of one projection output, as in the model
    q = qkv[:, : H * D].view(B, H, D)
    k = qkv[:, H * D: (H + KVH) * D].view(B, KVH, D)
    v = qkv[:, (H + KVH) * D:].view(B, KVH, D)
    cos, sin = rotary_table(D, 500000.0, S)
    positions = torch.tensor([slot - (0 if pads is None else p) for p in (pads or [0] * B)])
    cos, sin = cos[positions].to("cuda", dtype), sin[positions].to("cuda", dtype)
    k_cache, v_cache = rnd(B, KVH, S, D), rnd(B, KVH, S, D)
    key = torch.arange(S, device="cuda")
    pad = torch.tensor(pads or [0] * B, device="cuda")
    mask = (key[None] >= pad[:, None]) & (key[None] <= slot)
    return q, k, v, cos, sin, k_cache, v_cache, torch.tensor([slot], device="cuda"), mask


@pytest.mark.gpu
@pytest.mark.parametrize("keys", [None, "full", "half"])  # the launch rule; chunks of D keys; of D / 2 keys
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,H,KVH,D,S,slot,pads", [
    (1, 20, 5, 128, 640, 511, None),      # BitNet 2B: 5 KV heads of 4 queries, many splits
    (3, 20, 5, 128, 333, 300, [0, 17, 150]),  # padded batch, last split partial
    (2, 8, 8, 64, 64, 0, None),           # first token: one chunk, one key, groups of 1
    (2, 16, 2, 64, 200, 64, [3, 0]),      # groups of 8, slot on a split boundary
    (1, 4, 4, 128, 129, 128, None),       # slot is the last cache position
    (1, 20, 5, 128, 2500, 2400, None),    # 20 chunks of 128 keys over a cluster of 8 blocks
    (2, 16, 2, 64, 1000, 999, [0, 500]),  # 16 chunks of 64 keys, groups of 8
    (1, 2, 1, 128, 1100, 700, None),      # groups of 2, the blocks past the new token idle
])
def test_matches_reference_and_writes_the_cache(cuda_ext_ops, monkeypatch, keys, dtype, B, H, KVH, D, S, slot, pads):
    if keys:
        monkeypatch.setenv("BITLAB_ATTN_KEYS", keys)
    inputs = make_inputs(B, H, KVH, D, S, slot, dtype, seed=S + slot, pads=pads)
    q, k, v, cos, sin, k_cache, v_cache, slot_t, mask = inputs
    untouched = k_cache.clone(), v_cache.clone()
    ref, ref_k, ref_v = reference(q, k, v, cos, sin, *untouched, slot, mask)
    out = fused.decode_attention(q, k, v, cos, sin, k_cache, v_cache, slot_t, mask)
    assert out.shape == (B, H * D) and out.dtype == dtype
    err = float((out.float() - ref).norm() / ref.norm())
    assert err < 8e-3, err
    # every other position untouched; the written key within a rounding step of the reference's
    others = torch.arange(S, device="cuda") != slot
    assert torch.equal(k_cache[:, :, others], untouched[0][:, :, others])
    assert torch.equal(v_cache, ref_v)
    torch.testing.assert_close(k_cache, ref_k, rtol=1.6e-2, atol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("keys", ["full", "half"])
@pytest.mark.parametrize("cap", ["1", "2", "3", "8", "12", "16"])
def test_cluster_sizes_and_many_rows(cuda_ext_ops, monkeypatch, keys, cap):
    # Fewer blocks per cluster than key chunks (each block walks several chunks, the next chunk's keys in
    # flight), one block per (row, KV head) at 1, and the default rule at 64 rows (one block per pair).
    # Chunks of D keys take at most 8 blocks per cluster, chunks of D / 2 keys up to 16 (non-portable).
    monkeypatch.setenv("BITLAB_ATTN_KEYS", keys)
    monkeypatch.setenv("BITLAB_ATTN_MAX_CLUSTER", cap)
    for B, H, KVH, D, S, slot, pads in ((2, 20, 5, 128, 1000, 900, [0, 333]), (3, 16, 2, 64, 700, 650, None)):
        q, k, v, cos, sin, k_cache, v_cache, slot_t, mask = make_inputs(B, H, KVH, D, S, slot, torch.bfloat16,
                                                                         seed=B + int(cap), pads=pads)
        ref, _, ref_v = reference(q, k, v, cos, sin, k_cache.clone(), v_cache.clone(), slot, mask)
        out = fused.decode_attention(q, k, v, cos, sin, k_cache, v_cache, slot_t, mask)
        assert float((out.float() - ref).norm() / ref.norm()) < 8e-3, (B, cap)
        assert torch.equal(v_cache, ref_v)
    monkeypatch.delenv("BITLAB_ATTN_MAX_CLUSTER")
    monkeypatch.delenv("BITLAB_ATTN_KEYS")
    q, k, v, cos, sin, k_cache, v_cache, slot_t, mask = make_inputs(64, 20, 5, 128, 640, 600, torch.bfloat16, seed=64)
    ref, _, _ = reference(q, k, v, cos, sin, k_cache.clone(), v_cache.clone(), 600, mask)
    out = fused.decode_attention(q, k, v, cos, sin, k_cache, v_cache, slot_t, mask)
    assert float((out.float() - ref).norm() / ref.norm()) < 8e-3


@pytest.mark.gpu
@pytest.mark.parametrize("keys", ["full", "half"])
def test_pushed_merge_equals_the_pull_merges(cuda_ext_ops, monkeypatch, keys):
    # The blocks push their partial sums to the block that merges each slice of the outputs; the pull merges
    # (each block reading its slice from every block: BITLAB_ATTN_MERGE=spread; block 0 reading all of them:
    # block0) add the same numbers in the same order: the outputs are bit for bit the same, the caches too.
    monkeypatch.setenv("BITLAB_ATTN_KEYS", keys)
    for B, H, KVH, D, S, slot, pads in ((1, 20, 5, 128, 640, 600, None), (3, 16, 2, 64, 700, 650, [0, 5, 300]),
                                        (2, 8, 8, 64, 200, 150, None), (5, 32, 4, 128, 333, 301, [0, 0, 7, 0, 290]),
                                        (48, 20, 5, 128, 300, 280, None)):  # the last: one block per cluster
        inputs = make_inputs(B, H, KVH, D, S, slot, torch.bfloat16, seed=B + S, pads=pads)
        q, k, v, cos, sin, k_cache, v_cache, slot_t, mask = inputs
        outputs = {}
        for merge in ("push", "spread", "block0"):
            if merge == "push":
                monkeypatch.delenv("BITLAB_ATTN_MERGE", raising=False)
            else:
                monkeypatch.setenv("BITLAB_ATTN_MERGE", merge)
            k_run, v_run = k_cache.clone(), v_cache.clone()
            outputs[merge] = (fused.decode_attention(q, k, v, cos, sin, k_run, v_run, slot_t, mask), k_run, v_run)
        for merge in ("spread", "block0"):
            for pushed, pulled in zip(outputs["push"], outputs[merge]):
                assert torch.equal(pushed, pulled), (merge, B, H, KVH, D, S)
        ref, _, _ = reference(q, k, v, cos, sin, k_cache.clone(), v_cache.clone(), slot, mask)
        assert float((outputs["push"][0].float() - ref).norm() / ref.norm()) < 8e-3


@pytest.mark.gpu
def test_cluster_weights_match_the_reference(cuda_ext_ops):
    # The merge's weights come from a thread per (head, rank), the weighted sum of l added in tree order over
    # the ranks: padded rows, 8 and 4 query heads per KV head, 64 and 128 dimensions.
    for B, H, KVH, D, S, slot, pads in ((1, 20, 5, 128, 640, 600, None), (3, 8, 8, 64, 300, 250, [0, 4, 100]),
                                        (2, 32, 4, 128, 500, 480, None)):
        q, k, v, cos, sin, k_cache, v_cache, slot_t, mask = make_inputs(B, H, KVH, D, S, slot, torch.bfloat16,
                                                                        seed=7 * B + S, pads=pads)
        out = fused.decode_attention(q, k, v, cos, sin, k_cache.clone(), v_cache.clone(), slot_t, mask)
        ref, _, _ = reference(q, k, v, cos, sin, k_cache.clone(), v_cache.clone(), slot, mask)
        assert float((out.float() - ref).norm() / ref.norm()) < 8e-3, (B, H, KVH, D, S)


@pytest.mark.gpu
def test_dependent_launch_after_the_projection_equals_a_plain_launch(cuda_ext_ops):
    # As in the model: a kernel writes the projection output q, k, v are views of, then the attention launches
    # as its programmatic dependent (its first cache loads before the wait for q, k, v), in a CUDA graph with
    # new projection outputs each replay.  Same outputs and caches as plain launches.
    B, H, KVH, D, S, slot = 1, 20, 5, 128, 640, 600
    q, k, v, cos, sin, k_cache, v_cache, slot_t, mask = make_inputs(B, H, KVH, D, S, slot, torch.bfloat16, seed=11)
    qkv = q.view(B, -1).as_strided((B, (H + 2 * KVH) * D), (q.stride(0), 1))  # the projection output
    source = torch.randn_like(qkv)
    kc0, vc0 = k_cache.clone(), v_cache.clone()

    def step():
        torch.mul(source, 0.5, out=qkv)  # the "projection": writes q, k, v right before the attention
        return fused.decode_attention(q, k, v, cos, sin, k_cache, v_cache, slot_t, mask, dependent_launch=True)

    graph, out = capture(step)
    for i in range(3):
        source.copy_(torch.randn_like(source))
        k_cache.copy_(kc0)
        v_cache.copy_(vc0)
        graph.replay()
        got, kc, vc = out.clone(), k_cache.clone(), v_cache.clone()
        k_cache.copy_(kc0)
        v_cache.copy_(vc0)
        torch.mul(source, 0.5, out=qkv)
        torch.cuda.synchronize()
        plain = fused.decode_attention(q, k, v, cos, sin, k_cache, v_cache, slot_t, mask)
        torch.cuda.synchronize()
        assert torch.equal(got, plain), i
        assert torch.equal(kc, k_cache) and torch.equal(vc, v_cache), i


@pytest.mark.gpu
def test_cuda_graph_replay_follows_the_slot_tensor(cuda_ext_ops):
    B, H, KVH, D, S = 2, 20, 5, 128, 256
    q, k, v, cos, sin, k_cache, v_cache, slot_t, mask = make_inputs(B, H, KVH, D, S, 100, torch.bfloat16, seed=5)
    fused.decode_attention(q, k, v, cos, sin, k_cache.clone(), v_cache.clone(), slot_t, mask)  # eager first
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused.decode_attention(q, k, v, cos, sin, k_cache, v_cache, slot_t, mask)
    for slot in (100, 101, 180):
        slot_t.fill_(slot)
        mask.copy_(torch.arange(S, device="cuda")[None].expand(B, S) <= slot)
        before = k_cache.clone(), v_cache.clone()
        graph.replay()
        ref, _, _ = reference(q, k, v, cos, sin, *before, slot, mask)
        assert float((out.float() - ref).norm() / ref.norm()) < 8e-3, slot


def test_bad_inputs_are_named_before_the_op():
    B, H, KVH, D, S = 1, 4, 2, 64, 32
    half = dict(dtype=torch.float16)
    q, k, v = torch.randn(B, H, D, **half), torch.randn(B, KVH, D, **half), torch.randn(B, KVH, D, **half)
    cache = torch.randn(B, KVH, S, D, **half)
    rest = (torch.randn(B, D, **half), torch.randn(B, D, **half), cache, cache.clone(), torch.tensor([3]),
            torch.ones(B, S, dtype=torch.bool))
    with pytest.raises(ValueError, match="not CUDA"):
        fused.decode_attention(q, k, v, *rest)
    with pytest.raises(ValueError, match="head_dim 96"):
        fused.decode_attention(torch.randn(B, H, 96, **half), k, v, *rest)
    with pytest.raises(ValueError, match="groups of"):
        fused.decode_attention(torch.randn(B, 20, D, **half), k, v, *rest)
    with pytest.raises(ValueError, match="dtype torch.float32"):
        fused.decode_attention(q.float(), k, v, *rest)
    assert fused.supports(q, cache) == "queries on cpu, not CUDA"


def qkv_case(H, KVH, D, K, S, slot, dtype, gen):
    """A prepared ternary q/k/v projection, an int8 input row and a cache: the kernel's inputs."""
    from bitcore.quantize import quantize_activation_int8

    w = prepared_weight((H + 2 * KVH) * D, K, gen)
    x = torch.randn(1, K, generator=gen).to("cuda", dtype)
    xq, xs = quantize_activation_int8(x, "per_token")
    cos, sin = rotary_table(D, 500000.0, S)
    cos, sin = cos[slot:slot + 1].to("cuda", dtype), sin[slot:slot + 1].to("cuda", dtype)
    k_cache = torch.randn(1, KVH, S, D, generator=gen).to("cuda", dtype)
    v_cache = torch.randn(1, KVH, S, D, generator=gen).to("cuda", dtype)
    mask = (torch.arange(S) <= slot)[None].cuda()
    slot_t = torch.tensor([slot], device="cuda")
    return w, xq.contiguous(), xs.reshape(1).float(), cos, sin, k_cache, v_cache, slot_t, mask


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H,KVH,D,K,S,slot,exact", [
    (20, 5, 128, 2560, 640, 600, True),   # BitNet 2B: 10 blocks of 64 keys per KV head, 4-5 m-tiles each
    (20, 5, 128, 2560, 2500, 2400, True),  # long cache: chunks of 128 keys over clusters of 8
    (8, 8, 64, 1000, 300, 299, True),      # groups of 1, an input length that is not a multiple of 128
    (16, 2, 128, 512, 64, 10, False),      # groups of 8, one chunk of keys: more blocks than chunks for the tiles
    (4, 2, 64, 4096, 40, 39, False),       # long rows: the tiles need more blocks than the keys
])
def test_qkv_inside_equals_the_projection_then_the_kernel(cuda_ext_ops, dtype, H, KVH, D, K, S, slot, exact):
    from backends.cuda_ext.kernels import CudaExtInt8Kernel

    gen, seed = fresh_generator()
    w, xq, xs, cos, sin, k_cache, v_cache, slot_t, mask = qkv_case(H, KVH, D, K, S, slot, dtype, gen)
    qkv = fused.prepare_qkv_attention(w, H, KVH, D)
    assert fused.qkv_cluster(qkv, dtype, S) > 0
    proj = CudaExtInt8Kernel().forward_quantized(xq, xs.view(1, 1), w, out_dtype=dtype)  # [1, (H + 2 KVH) D]
    q = proj[:, : H * D].view(1, H, D)
    k = proj[:, H * D: (H + KVH) * D].view(1, KVH, D)
    v = proj[:, (H + KVH) * D:].view(1, KVH, D)
    kc, vc = k_cache.clone(), v_cache.clone()
    want = fused.decode_attention(q, k, v, cos, sin, kc, vc, slot_t, mask)
    got = fused.decode_qkv_attention(xq, xs, qkv, cos, sin, k_cache, v_cache, slot_t, mask)
    torch.cuda.synchronize()
    assert torch.equal(k_cache, kc) and torch.equal(v_cache, vc), seed  # the same key and value written
    if exact:
        assert torch.equal(got, want), seed
    else:  # another cluster size: the partial softmax sums merge in another order
        assert float((got.float() - want.float()).norm() / want.float().norm()) < 2e-3, seed


@pytest.mark.gpu
def test_qkv_inside_replays_in_a_graph_after_its_input(cuda_ext_ops):
    # As in the model: the input norm writes xq right before the kernel, which launches as its programmatic
    # dependent (weight tiles and the first cache rows copied before the wait); new inputs each replay.
    from backends.cuda_ext.kernels import CudaExtInt8Kernel

    gen, seed = fresh_generator()
    H, KVH, D, K, S, slot = 20, 5, 128, 2560, 640, 600
    w, xq, xs, cos, sin, k_cache, v_cache, slot_t, mask = qkv_case(H, KVH, D, K, S, slot, torch.bfloat16, gen)
    qkv = fused.prepare_qkv_attention(w, H, KVH, D)
    source = xq.clone()
    kc0, vc0 = k_cache.clone(), v_cache.clone()

    def step():
        xq.copy_(source)
        return fused.decode_qkv_attention(xq, xs, qkv, cos, sin, k_cache, v_cache, slot_t, mask, dependent_launch=True)

    graph, out = capture(step)
    for i in range(3):
        source.copy_(torch.randint(-127, 128, source.shape, generator=gen).to(source.device, torch.int8))
        k_cache.copy_(kc0)
        v_cache.copy_(vc0)
        graph.replay()
        got = out.clone()
        proj = CudaExtInt8Kernel().forward_quantized(source, xs.view(1, 1), w, out_dtype=torch.bfloat16)
        kc, vc = kc0.clone(), vc0.clone()
        want = fused.decode_attention(proj[:, : H * D].view(1, H, D), proj[:, H * D: (H + KVH) * D].view(1, KVH, D),
                                      proj[:, (H + KVH) * D:].view(1, KVH, D), cos, sin, kc, vc, slot_t, mask)
        torch.cuda.synchronize()
        assert torch.equal(got, want), (i, seed)
        assert torch.equal(k_cache, kc) and torch.equal(v_cache, vc), (i, seed)


@pytest.mark.gpu
def test_qkv_inside_names_bad_input(cuda_ext_ops):
    gen, _ = fresh_generator()
    w, xq, xs, cos, sin, k_cache, v_cache, slot_t, mask = qkv_case(8, 4, 64, 256, 32, 5, torch.bfloat16, gen)
    qkv = fused.prepare_qkv_attention(w, 8, 4, 64)
    rest = (cos, sin, k_cache, v_cache, slot_t, mask)
    with pytest.raises(ValueError, match=r"xq must be one contiguous int8 row \[1, 256\]"):
        fused.decode_qkv_attention(xq.float(), xs, qkv, *rest)
    with pytest.raises(ValueError, match="x_scale must be one float32"):
        fused.decode_qkv_attention(xq, xs.repeat(2), qkv, *rest)
    with pytest.raises(ValueError, match=r"caches must be contiguous \[1, 4, S, 64\]"):
        fused.decode_qkv_attention(xq, xs, qkv, cos, sin, k_cache[:, :2], v_cache[:, :2], slot_t, mask)
    with pytest.raises(ValueError, match="q, k, v of 8 / 2 heads"):
        fused.prepare_qkv_attention(w, 8, 2, 64)


def test_qkv_inside_refuses_weights_it_cannot_take():
    assert fused.qkv_why_not(object(), 20, 5, 128) == "the q/k/v projection is not prepared by the cuda_ext kernels"
    with pytest.raises(ValueError, match="not prepared by the cuda_ext kernels"):
        fused.prepare_qkv_attention(object(), 20, 5, 128)

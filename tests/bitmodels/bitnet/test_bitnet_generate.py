"""The generation engine: cached decoding equals full recomputation, sampling, stop tokens, batching, streaming."""
from __future__ import annotations

import math

import pytest
import torch

from bitcore.errors import ConfigError
from bitmodels.bitnet import BitNetConfig, BitNetForCausalLM
from bitmodels.bitnet.generate import Generator, graph_sizes, graph_steps_choice
from bitmodels.bitnet.ops import use_cpu_attention
from bitmodels.bitnet.sampling import SamplingConfig, filter_logits, sample


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    fields = dict(vocab_size=71, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=3, max_position_embeddings=192, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    fields.update(overrides)
    model = BitNetForCausalLM(BitNetConfig(**fields))
    with torch.no_grad():  # transformers' init scale: small embeddings, so the layers matter
        model.model.embed_tokens.weight.normal_(0, 0.02)
        model.lm_head.weight.normal_(0, 0.02)
    return model.eval()


def _greedy_by_recomputation(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def _prompts(seed, lengths, vocab=71):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


def test_cached_greedy_decoding_equals_full_recomputation_for_a_padded_batch():
    model = _model(seed=1)
    prompts = _prompts(1, (7, 3, 12))
    out = Generator(model).generate(prompts, max_new_tokens=9, stop_token_ids=[])
    assert out.decode_steps == 8
    for prompt, tokens in zip(prompts, out.tokens):
        assert tokens == _greedy_by_recomputation(model, prompt, 9)


def test_decode_logits_equal_a_full_forward():
    """The KV-cache path (prefill + one-token steps) computes the same logits as one causal forward."""
    model = _model(seed=2)
    model.prepare_for_inference("cpu")
    gen = Generator(model)
    prompt = _prompts(2, (10,))[0]
    tokens = gen.generate([prompt], max_new_tokens=5, stop_token_ids=[]).tokens[0]
    full = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(full)[0]
    assert logits[len(prompt) - 1:-1].argmax(-1).tolist() == tokens


def test_fused_and_unfused_projections_compute_the_same_logits():
    model = _model(seed=3)
    ids = torch.randint(3, 71, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = model(ids)
        model.prepare_for_inference("cpu", fuse=True)
        assert "qkv" in model.model.layers[0].bound and "gate_up" in model.model.layers[0].bound
        fused = model(ids)
        model.prepare_for_inference("cpu", fuse=False)
        assert "qkv" not in model.model.layers[0].bound
        unfused = model(ids)
    assert torch.equal(plain, unfused)
    assert torch.equal(fused, unfused)


def test_quantizing_in_the_norms_computes_the_same_logits(monkeypatch):
    """With kernels that take int8 input, the norms quantize and the projections skip their own
    quantization (up to 64 tokens, the GEMV range with the wide cluster GEMV): the same quantization, so the same logits,
    bit for bit (torch_ref on the CPU)."""
    from backends.torch_ref.kernels import TorchReferenceKernel
    from bitcore.kernels import KernelRegistry

    calls = []
    original = TorchReferenceKernel.forward_quantized

    def spy(self, xq, *args, **kwargs):
        calls.append(xq.shape[0])
        return original(self, xq, *args, **kwargs)

    monkeypatch.setattr(TorchReferenceKernel, "forward_quantized", spy)
    model = _model(seed=5)
    ids = torch.randint(3, 71, (2, 7), generator=torch.Generator().manual_seed(5))
    mid_ids = torch.randint(3, 71, (2, 9), generator=torch.Generator().manual_seed(7))
    long_ids = torch.randint(3, 71, (2, 33), generator=torch.Generator().manual_seed(6))
    with torch.no_grad(), KernelRegistry.force_backend("torch_ref"):
        model.prepare_for_inference("cpu", quantize_in_norms=False)
        assert not any(layer.quantized_inputs for layer in model.model.layers)
        plain, plain_long, plain_mid = model(ids), model(long_ids), model(mid_ids)
        assert calls == []
        model.prepare_for_inference("cpu")
        assert all(layer.quantized_inputs for layer in model.model.layers)
        assert all(b.takes_quantized for b in model.model.layers[0].bound.values())
        quantized = model(ids)
        assert calls == [14] * 4 * 2  # 4 bindings (qkv, o, gate_up, down) x 2 layers, all 14 tokens
        assert model.quantize_in_norms_max_tokens == 64
        quantized_long = model(long_ids)  # 66 tokens: the projections quantize themselves
        assert len(calls) == 8
        quantized_mid = model(mid_ids)  # 18 tokens: the wide GEMV range, quantized in the norms
        assert calls[8:] == [18] * 8
        model.quantize_in_norms_max_tokens = 16
        assert torch.equal(model(mid_ids), quantized_mid) and len(calls) == 16
        model.quantize_in_norms_max_tokens = 64
        out = Generator(model, bind=False).generate([ids[0].tolist()], max_new_tokens=4, stop_token_ids=[])
    assert torch.equal(plain, quantized) and torch.equal(plain_long, quantized_long)
    assert torch.equal(plain_mid, quantized_mid)
    assert out.tokens[0] == _greedy_by_recomputation(model, ids[0].tolist(), 4)


def test_quantized_lm_head_is_the_dequantized_product():
    from bitcore.config import BitQuantConfig
    from bitcore.quantize import quantize_weight
    from bitmodels.bitnet.bindings import bind_quantized_dense

    torch.manual_seed(8)
    weight = torch.randn(257, 96) * 0.02
    x = torch.randn(3, 5, 96)
    for bits in (8, 4, 2):
        values, scale = quantize_weight(weight, BitQuantConfig(weight_bits=bits, weight_granularity="per_channel"))
        expected = x @ (values.float() * scale.view(-1, 1)).T
        got = bind_quantized_dense(weight, bits, torch.device("cpu"))(x)
        assert got.shape == (3, 5, 257) and torch.allclose(got, expected, rtol=1e-5, atol=1e-6), bits
    with pytest.raises(ConfigError, match=r"bits: got 3; allowed values are \[2, 4, 8\]"):
        bind_quantized_dense(weight, 3, torch.device("cpu"))


def test_int8_activation_lm_head_multiplies_the_quantized_input():
    from bitcore.config import BitQuantConfig
    from bitcore.quantize import quantize_activation_int8, quantize_weight
    from bitmodels.bitnet.bindings import bind_quantized_dense

    torch.manual_seed(18)
    weight = torch.randn(131, 80) * 0.02
    x = torch.randn(2, 3, 80)
    xq, xs = quantize_activation_int8(x.reshape(-1, 80), "per_token")
    for bits in (8, 4):
        values, scale = quantize_weight(weight, BitQuantConfig(weight_bits=bits, weight_granularity="per_channel"))
        expected = ((xq.float() * xs) @ (values.float() * scale.view(-1, 1)).T).view(2, 3, 131)
        got = bind_quantized_dense(weight, bits, torch.device("cpu"), "int8")(x)
        assert got.shape == (2, 3, 131) and torch.allclose(got, expected, rtol=1e-4, atol=1e-6), bits
    with pytest.raises(ConfigError, match=r"activations: got 'int4'; allowed values are \['float', 'int8'\]"):
        bind_quantized_dense(weight, 4, torch.device("cpu"), "int4")


def test_generation_with_an_int8_activation_lm_head():
    model = _model(seed=19)
    ids = torch.randint(3, 71, (2, 9), generator=torch.Generator().manual_seed(19))
    with torch.no_grad():
        gen = Generator(model, lm_head_bits=4)
        float_inputs = model(ids)
        gen = Generator(model, lm_head_bits=4, lm_head_activations="int8")
        assert gen.head_kernel.endswith("(quantized per row: 4-bit weights, int8 per-token activations)"), gen.head_kernel
        int8_inputs = model(ids)
        out = gen.generate([ids[0].tolist()], max_new_tokens=4, stop_token_ids=[])
        assert out.tokens[0] == _greedy_by_recomputation(model, ids[0].tolist(), 4)
    bound = model.head_binding
    with pytest.raises(ConfigError, match="activations='int8' needs a quantized head"):
        Generator(model, lm_head_activations="int8")
    with pytest.raises(ConfigError, match=r"lm_head activations: got 'fp8'; allowed values are \['float', 'int8'\]"):
        model.prepare_for_inference(lm_head_bits=4, lm_head_activations="fp8")
    with pytest.raises(ConfigError, match=r"lm_head bits: got 3; allowed values are \[2, 4, 8\] or None"):
        model.bind_lm_head(3)
    assert model.head_binding is bound  # refused before anything was rebound
    # one more rounding (the head's input to int8 per token) on top of the 4-bit weights
    assert ((int8_inputs - float_inputs).norm() / float_inputs.norm()).item() < 2e-2
    assert (int8_inputs.argmax(-1) == float_inputs.argmax(-1)).float().mean().item() > 0.9


def test_a_head_that_takes_int8_input_gets_it_from_the_final_norm():
    """Where the head's kernel takes pre-quantized input, the final norm quantizes (as before the projections)
    and the logits equal those of the same kernel quantizing the float input itself; prefill's last-token
    slice keeps the quantized rows and their scales together."""
    from bitcore.config import BitQuantConfig
    from bitcore.kernels import KernelRegistry
    from bitcore.packing import pack_weight
    from bitcore.quantize import quantize_weight
    from bitmodels.bitnet.bindings import PreparedLinear, QuantizedActivation

    model = _model(seed=20)
    cfg = BitQuantConfig(weight_bits=4, activation_dtype="int8", activation_granularity="per_token",
                         weight_granularity="per_channel")
    kernel = KernelRegistry.get_kernel_for_config(cfg, "cpu", backend="torch_ref")
    values, scale = quantize_weight(model.lm_head.weight.detach(), cfg)
    head = PreparedLinear(kernel, kernel.prepare(pack_weight(values, scale, 4, "per_channel"), cfg), 48, 71,
                          config=cfg)
    assert head.takes_quantized
    seen = []

    class Recording:
        takes_quantized = True

        def __call__(self, x):
            seen.append(type(x))
            return head(x)

    ids = torch.randint(3, 71, (2, 7), generator=torch.Generator().manual_seed(20))
    with torch.no_grad():
        model.head_binding = Recording()
        quantized = model(ids)
        last = model(ids, last_only=True)
        model.quantize_in_norms_max_tokens = 0  # the norm gives float rows: the kernel quantizes them
        floats = model(ids)
    assert seen == [QuantizedActivation, QuantizedActivation, torch.Tensor]
    assert torch.equal(quantized, floats)
    assert torch.equal(last, quantized[:, -1:])


def test_generation_with_an_8_bit_lm_head():
    model = _model(seed=9)
    ids = torch.randint(3, 71, (2, 9), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        dense = model(ids)
        gen = Generator(model, lm_head_bits=8)
        assert model.head_binding is not None and "quantized per row" in gen.head_kernel
        quantized = model(ids)
        out = gen.generate([ids[0].tolist()], max_new_tokens=4, stop_token_ids=[])
        assert out.tokens[0] == _greedy_by_recomputation(model, ids[0].tolist(), 4)  # the same head both ways
        assert model.bind_lm_head(None) == "dense (nn.Linear)"
        assert torch.equal(model(ids), dense)
    assert ((quantized - dense).norm() / dense.norm()).item() < 2e-2
    assert (quantized.argmax(-1) == dense.argmax(-1)).float().mean().item() > 0.9


def test_kernels_without_int8_input_keep_the_norms_float():
    model = _model(seed=6)
    model.prepare_for_inference("cpu")  # the C++ CPU kernels quantize inside forward
    if all(b.takes_quantized for b in model.model.layers[0].bound.values()):
        pytest.skip("every CPU kernel here takes int8 input")
    assert not any(layer.quantized_inputs for layer in model.model.layers)


def test_stop_token_ends_a_row_and_pads_the_rest():
    model = _model(seed=4)
    prompts = _prompts(4, (5, 8))
    free = Generator(model).generate(prompts, max_new_tokens=10, stop_token_ids=[])
    stop = free.tokens[0][3]  # the 4th token of row 0 becomes a stop token
    out = Generator(model).generate(prompts, max_new_tokens=10, stop_token_ids=[stop], sync_every=2)
    first = free.tokens[0].index(stop)
    assert out.tokens[0] == free.tokens[0][: first + 1]
    expected_1 = free.tokens[1][: free.tokens[1].index(stop) + 1] if stop in free.tokens[1] else free.tokens[1]
    assert out.tokens[1] == expected_1


def test_all_rows_stopped_ends_decoding_early():
    model = _model(seed=5)
    prompt = _prompts(5, (6,))
    first = Generator(model).generate(prompt, max_new_tokens=1, stop_token_ids=[]).tokens[0][0]
    out = Generator(model).generate(prompt, max_new_tokens=50, stop_token_ids=[first], sync_every=4)
    assert out.tokens == [[first]]
    assert out.decode_steps <= 4


def test_streaming_delivers_every_token_in_order():
    model = _model(seed=6)
    prompts = _prompts(6, (4, 9))
    chunks = []
    out = Generator(model).generate(prompts, max_new_tokens=11, stop_token_ids=[], stream=chunks.append, sync_every=3)
    streamed = [sum((c[i] for c in chunks), []) for i in range(2)]
    assert streamed == out.tokens
    assert len(chunks) == 1 + math.ceil(10 / 3)


def test_sampling_is_seeded_and_respects_top_k():
    model = _model(seed=7)
    prompts = _prompts(7, (5, 5))
    cfg = SamplingConfig(temperature=1.5, top_k=3)
    gen = Generator(model)
    a = gen.generate(prompts, max_new_tokens=8, sampling=cfg, seed=11, stop_token_ids=[])
    b = gen.generate(prompts, max_new_tokens=8, sampling=cfg, seed=11, stop_token_ids=[])
    assert a.tokens == b.tokens
    # every sampled token is among the 3 most likely next tokens
    for prompt, tokens in zip(prompts, a.tokens):
        ids = prompt + tokens
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0, len(prompt) - 1:-1]
        top3 = logits.topk(3, dim=-1).indices
        assert all(t in top3[i].tolist() for i, t in enumerate(tokens))


def test_sample_matches_the_softmax_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    n = 40000
    torch.manual_seed(0)
    draws = sample(logits.expand(n, -1).clone(), SamplingConfig(temperature=1.0))
    freq = torch.bincount(draws, minlength=5).float() / n
    expected = torch.softmax(logits, -1)
    assert torch.allclose(freq, expected, atol=0.01), (freq, expected)
    torch.manual_seed(1)
    hot = sample(logits.expand(n, -1).clone(), SamplingConfig(temperature=2.0))
    freq_hot = torch.bincount(hot, minlength=5).float() / n
    assert torch.allclose(freq_hot, torch.softmax(logits / 2, -1), atol=0.01)


def test_filter_logits_top_k_and_top_p():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0, -1.0]])
    k2 = filter_logits(logits, top_k=2, top_p=1.0)
    assert torch.isfinite(k2).tolist() == [[True, False, True, False, False]]
    probs = torch.softmax(logits, -1)[0]  # ~[0.64, 0.09, 0.24, 0.03, 0.01]
    p = filter_logits(logits, top_k=0, top_p=0.8)  # 0.64 < 0.8, so the second (0.24) stays; then the mass is 0.88
    assert torch.isfinite(p).tolist() == [[True, False, True, False, False]]
    assert float(probs[0]) < 0.8 < float(probs[0] + probs[2])
    tiny = filter_logits(logits, top_k=0, top_p=0.1)  # the most likely token always stays
    assert torch.isfinite(tiny).tolist() == [[True, False, False, False, False]]


@pytest.mark.parametrize("vocab", [7, 4097, 5000, 128256])
def test_chunked_argmax_is_torchs_argmax_ties_included(vocab):
    from bitmodels.bitnet.sampling import argmax_rows

    gen = torch.Generator().manual_seed(vocab)
    for dtype in (torch.float32, torch.bfloat16):
        ties = torch.randint(-4, 4, (3, vocab), generator=gen).to(dtype)  # the maximum repeats in every row
        spread = torch.randn(3, vocab, generator=gen).to(dtype)
        spread[1] = float("-inf")
        spread[1, -1] = 0.0  # the only finite value sits in the padded last chunk
        for x in (ties, spread):
            assert torch.equal(argmax_rows(x), torch.argmax(x, dim=-1))


def test_argmax_dispatch_says_what_runs_it(monkeypatch):
    from bitmodels.bitnet.sampling import argmax_rows, use_argmax_kernel

    assert use_argmax_kernel("cpu") == (argmax_rows, "torch.argmax (not a CUDA device)")
    monkeypatch.setenv("BITLAB_ARGMAX", "torch")
    assert use_argmax_kernel("cuda") == (argmax_rows, "torch, chunked (BITLAB_ARGMAX=torch)")
    monkeypatch.delenv("BITLAB_ARGMAX")
    if not torch.cuda.is_available():
        fn, why = use_argmax_kernel("cuda")
        assert fn is argmax_rows and why.startswith("torch, chunked (cuda_ext unavailable: ")
    gen = Generator(_model(seed=12))
    assert gen.argmax_kernel == "torch.argmax (not a CUDA device)"
    assert gen.advance_kernel == "torch (not a CUDA device)"
    assert gen.inputs_kernel == "torch (embedding, then rotary rows by index) (not a CUDA device)"


@pytest.mark.gpu
def test_step_inputs_in_one_kernel_give_the_same_logits_and_tokens(cuda_device, monkeypatch):
    from bitmodels.bitnet.ops import GatheredInputsOps, Ops

    model = _model(seed=14, vocab_size=1000).to(cuda_device, torch.bfloat16)
    prompts = _prompts(14, (4, 11), vocab=1000)
    ids = torch.tensor([prompts[1]], device=cuda_device)
    monkeypatch.setenv("BITLAB_STEP_INPUTS", "torch")
    with torch.no_grad():
        plain = Generator(model)
        assert plain.inputs_kernel.endswith("(BITLAB_STEP_INPUTS=torch)")
        expected = plain.generate(prompts, 12, stop_token_ids=[]).tokens
        monkeypatch.delenv("BITLAB_STEP_INPUTS")
        gen = Generator(model)
        assert gen.inputs_kernel.startswith("cuda_ext.gather_step_inputs")
        assert isinstance(gen.decode_ops, GatheredInputsOps) and isinstance(gen.prefill_ops, GatheredInputsOps)
        positions = torch.arange(ids.shape[1], device=cuda_device)[None] + 7  # rows past position 0 too
        assert torch.equal(model(ids, positions, ops=GatheredInputsOps(Ops(), gen.decode_ops.step_inputs)),
                           model(ids, positions, ops=Ops()))
        assert gen.generate(prompts, 12, stop_token_ids=[]).tokens == expected  # prefill and graph-replayed decode


def test_sample_uses_the_argmax_it_is_given():
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(4))
    calls = []

    def argmax(x):
        calls.append(tuple(x.shape))
        return torch.argmax(x, dim=-1)

    assert torch.equal(sample(logits, SamplingConfig(), argmax), logits.argmax(-1))
    sample(logits, SamplingConfig(temperature=0.7), argmax)
    assert calls == [(2, 50), (2, 50)]  # the greedy pick, then the race's winner


def test_greedy_is_argmax():
    logits = torch.randn(4, 33, generator=torch.Generator().manual_seed(8))
    assert torch.equal(sample(logits, SamplingConfig()), logits.argmax(-1))


@pytest.mark.parametrize("field,value,match", [
    ("temperature", -0.5, "temperature"), ("top_k", -1, "top_k"), ("top_p", 0.0, "top_p"), ("top_p", 1.5, "top_p"),
])
def test_sampling_config_names_bad_values(field, value, match):
    with pytest.raises(ConfigError, match=match):
        SamplingConfig(**{field: value})


def test_generate_rejects_bad_requests():
    model = _model(seed=9, max_position_embeddings=64)
    gen = Generator(model)
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen.generate([[3, 4]], max_new_tokens=0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        gen.generate([[3, 400]], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        gen.generate([[3] * 40], max_new_tokens=30)
    with pytest.raises(ValueError, match="at least one token"):
        gen.generate([[]], max_new_tokens=2)
    with pytest.raises(ValueError, match="cuda_graph=True"):
        Generator(model, cuda_graph=True)


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_graph_decode_equals_eager_decode(cuda_device, compile):
    model = _model(seed=10).to(cuda_device, torch.bfloat16)
    prompts = _prompts(10, (6, 11, 2))
    # the same float ops eagerly (compiled ops round bf16 intermediates differently from eager ones)
    eager = Generator(model, cuda_graph=False, compile=compile).generate(prompts, max_new_tokens=12, stop_token_ids=[])
    fast = Generator(model, cuda_graph=True, compile=compile)
    graph = fast.generate(prompts, max_new_tokens=12, stop_token_ids=[])
    again = fast.generate(prompts, max_new_tokens=12, stop_token_ids=[])  # replays the captured graph
    assert graph.tokens == eager.tokens == again.tokens
    sampled = fast.generate(prompts, 12, SamplingConfig(temperature=0.9, top_p=0.9), seed=3, stop_token_ids=[])
    assert all(len(t) == 12 for t in sampled.tokens)


def test_graph_sizes_cover_every_decode_step():
    assert graph_sizes(127, 8) == [8, 1]  # 15 graphs of 8, then 7 of 1
    assert graph_sizes(16, 8) == [8]
    assert graph_sizes(5, 8) == [1]
    assert graph_sizes(0, 8) == []
    assert graph_sizes(9, 1) == [1]


def test_steps_per_graph_comes_from_the_argument_or_the_environment(monkeypatch):
    monkeypatch.delenv("BITLAB_GRAPH_STEPS", raising=False)
    assert graph_steps_choice(None, True) == (1, "1 decode step per CUDA graph (default)")
    assert graph_steps_choice(4, True) == (4, "4 decode steps per CUDA graph (steps_per_graph)")
    monkeypatch.setenv("BITLAB_GRAPH_STEPS", "8")
    assert graph_steps_choice(None, True)[0] == 8
    assert graph_steps_choice(2, True)[0] == 2  # the argument wins
    assert graph_steps_choice(None, False) == (8, "no CUDA graph: one eager step at a time")
    monkeypatch.setenv("BITLAB_GRAPH_STEPS", "eight")
    with pytest.raises(ValueError, match="BITLAB_GRAPH_STEPS='eight'"):
        graph_steps_choice(None, True)
    for bad in (0, -2, True, 2.0):
        with pytest.raises(ValueError, match="steps_per_graph: got"):
            graph_steps_choice(bad, True)


def test_generator_on_cpu_runs_eager_steps_whatever_the_graph_size():
    model = _model(seed=12)
    prompts = _prompts(12, (4, 7))
    gen = Generator(model, steps_per_graph=4)
    assert gen.graph_steps == "no CUDA graph: one eager step at a time"
    out = gen.generate(prompts, max_new_tokens=7, stop_token_ids=[])
    assert out.tokens == Generator(model).generate(prompts, max_new_tokens=7, stop_token_ids=[]).tokens
    assert out.decode_steps == 6


@pytest.mark.gpu
@pytest.mark.parametrize("steps", [1, 3, 8])
def test_several_steps_per_graph_decode_as_one_step_graphs_do(cuda_device, steps):
    model = _model(seed=13).to(cuda_device, torch.bfloat16)
    prompts = _prompts(13, (6, 11, 2))
    one = Generator(model, steps_per_graph=1)
    many = Generator(model, steps_per_graph=steps, bind=False)
    assert many.graph_steps.startswith(f"{steps} decode step")
    for n in (12, 17):  # 11 and 16 decode steps: a tail of one-step graphs, then none for 8
        expected = one.generate(prompts, max_new_tokens=n, stop_token_ids=[])
        got = many.generate(prompts, max_new_tokens=n, stop_token_ids=[])
        again = many.generate(prompts, max_new_tokens=n, stop_token_ids=[])
        assert got.tokens == expected.tokens == again.tokens
        assert got.decode_steps == n - 1 and got.stats["steps_per_graph"] == steps
    stop = expected.tokens[1][4]
    chunks = []
    stopped = many.generate(prompts, 17, stop_token_ids=[stop], stream=chunks.append, sync_every=steps)
    want = one.generate(prompts, 17, stop_token_ids=[stop])
    assert stopped.tokens == want.tokens
    assert [sum((c[i] for c in chunks), []) for i in range(3)][1][: len(want.tokens[1])] == want.tokens[1]
    # seeded sampling: the call that captures the graphs (its warm-up steps sample too) draws what a replay does
    sampling = SamplingConfig(temperature=0.9, top_k=20)
    a = many.generate(prompts, 12, sampling, seed=5, stop_token_ids=[])
    b = many.generate(prompts, 12, sampling, seed=5, stop_token_ids=[])
    assert a.tokens == b.tokens and all(len(t) == 12 for t in a.tokens)
    assert a.tokens != many.generate(prompts, 12, sampling, seed=6, stop_token_ids=[]).tokens


@pytest.mark.gpu
@pytest.mark.parametrize("bits, activations, tolerance", [(8, "float", 3e-2), (4, "int8", 0.3)])
def test_quantized_lm_head_on_the_gpu_replays_in_a_graph(cuda_device, bits, activations, tolerance):
    model = _model(seed=11, vocab_size=1000).to(cuda_device, torch.bfloat16)
    prompts = _prompts(11, (5, 9), vocab=1000)
    ids = torch.tensor([prompts[1]], device=cuda_device)
    with torch.no_grad():
        dense = model(ids).float()
        eager = Generator(model, cuda_graph=False, lm_head_bits=bits, lm_head_activations=activations)
        assert eager.head_kernel.startswith("cuda_ext."), eager.head_kernel
        # an int8-activation head takes the final norm's int8 rows, as the projections do
        assert model.head_binding.takes_quantized == (activations == "int8")
        quantized = model(ids).float()
        model.quantize_in_norms_max_tokens = 0  # float rows: the head's kernel quantizes them itself
        apart = model(ids).float()  # (the layers' norms then run in torch too: their sums in another order)
        model.quantize_in_norms_max_tokens = 64
        graph = Generator(model, cuda_graph=True, bind=False)
        assert graph.generate(prompts, 10, stop_token_ids=[]).tokens == eager.generate(prompts, 10, stop_token_ids=[]).tokens
    assert ((quantized - dense).norm() / dense.norm()).item() < tolerance
    assert ((apart - quantized).norm() / quantized.norm()).item() < 1e-2


def test_embedding_offload_is_refused_where_it_cannot_help():
    model = _model(seed=12, tie_word_embeddings=True)
    with pytest.raises(ValueError, match="is on cpu: its embedding already lives in host memory"):
        model.offload_embedding()
    assert model.host_embedding is None and model.offload_embedding(False) == "on cpu"
    with pytest.raises(ValueError, match="already lives in host memory"):
        Generator(model, lm_head_bits=8, embedding_on_host=True)


@pytest.mark.gpu
def test_embedding_on_host_with_a_quantized_head_generates_the_same_tokens(cuda_device):
    model = _model(seed=13, vocab_size=1000, tie_word_embeddings=True).to(cuda_device, torch.bfloat16)
    prompts = _prompts(13, (5, 9), vocab=1000)
    ids = torch.tensor([prompts[1]], device=cuda_device)
    with pytest.raises(ValueError, match="tied to the embedding and dense"):
        model.offload_embedding()
    with torch.no_grad():
        on_gpu = Generator(model, lm_head_bits=4)
        logits = model(ids)
        expected = on_gpu.generate(prompts, 10, stop_token_ids=[]).tokens
        before = model.weight_memory()["float_gpu"]
        off = Generator(model, lm_head_bits=4, embedding_on_host=True)
        assert off.embedding.startswith("pinned host memory") and model.model.embed_tokens.weight.is_pinned()
        assert before - model.weight_memory()["float_gpu"] == 1000 * 48 * 2  # the table left the GPU
        assert torch.equal(model(ids), logits)  # the lookup copies the table's values
        assert off.generate(prompts, 10, stop_token_ids=[]).tokens == expected  # in a CUDA graph
        assert model.bind_lm_head(None) == "dense (nn.Linear)"  # the dense head needs the table back
        assert model.host_embedding is None and model.model.embed_tokens.weight.is_cuda


def _decode_attention_case(device, seed):
    """One decode step's attention inputs (2B-shape heads, a padded batch of 3, 333 cache slots) and
    the eager grouped-matmul result on copies of the caches: ``(args, ref, ref_caches)``."""
    from bitmodels.bitnet import ops

    gen = torch.Generator(device=device).manual_seed(seed)
    B, H, KVH, D, S = 3, 20, 5, 128, 333  # S spans several key blocks, the last one partial
    rnd = lambda *shape: torch.randn(*shape, device=device, generator=gen, dtype=torch.bfloat16)  # noqa: E731
    q, k, v = rnd(B, 1, H, D), rnd(B, 1, KVH, D), rnd(B, 1, KVH, D)
    cos, sin = (t.to(device, torch.bfloat16) for t in ops.rotary_table(D, 500000.0, 512))
    pos, pad = 300, torch.tensor([0, 17, 150], device=device)
    c, s = cos[pos - pad].view(B, 1, 1, D), sin[pos - pad].view(B, 1, 1, D)
    key = torch.arange(S, device=device)
    mask = ((key[None] >= pad[:, None]) & (key[None] <= pos)).view(B, 1, 1, S)
    weight = torch.rand(H * D, device=device, generator=gen).to(torch.bfloat16) + 0.5
    caches = rnd(B, KVH, S, D), rnd(B, KVH, S, D)
    slots = torch.tensor([pos], device=device)
    ref_caches = [t.clone() for t in caches]
    ref = ops.attention(q, k, v, c, s, *ref_caches, slots, mask, weight, 1e-5).float()
    return (q, k, v, c, s, *caches, slots, mask, weight, 1e-5), ref, ref_caches


@pytest.mark.gpu
def test_triton_split_kv_decode_attention_matches_the_grouped_matmul_path(cuda_device):
    from bitmodels.bitnet import ops
    from bitmodels.bitnet import triton_attention as ta

    if not ta.available():
        pytest.skip("Triton is not installed")
    case, ref, ref_caches = _decode_attention_case(cuda_device, seed=12)
    got = ops.TritonDecodeOps()._attention(*case).float()
    caches = case[5:7]
    # the compiled rotary rounds once where eager rounds per op: the written key may differ by a bf16 ulp
    torch.testing.assert_close(caches[0], ref_caches[0], rtol=1.6e-2, atol=1e-2)
    assert torch.equal(caches[1], ref_caches[1])
    assert float((got - ref).norm() / ref.norm()) < 1e-2


@pytest.mark.gpu
def test_triton_attention_generation_replays_deterministically(cuda_device):
    from bitmodels.bitnet import triton_attention as ta

    if not ta.available():
        pytest.skip("Triton is not installed")
    model = _model(seed=13, hidden_size=64, num_attention_heads=4, num_key_value_heads=2).to(cuda_device, torch.bfloat16)
    prompts = _prompts(13, (5, 9))
    eager = Generator(model, cuda_graph=False, compile=True, triton_attention=True)
    graph = Generator(model, cuda_graph=True, compile=True, triton_attention=True)
    a = eager.generate(prompts, 10, stop_token_ids=[]).tokens
    assert graph.generate(prompts, 10, stop_token_ids=[]).tokens == a
    assert graph.generate(prompts, 10, stop_token_ids=[]).tokens == a


@pytest.mark.gpu
def test_fused_decode_attention_matches_the_grouped_matmul_path(cuda_device):
    from bitmodels.bitnet import ops

    if ops.fused_decode_attention_status(cuda_device):
        pytest.skip(ops.fused_decode_attention_status(cuda_device))
    case, ref, ref_caches = _decode_attention_case(cuda_device, seed=14)
    got = ops.FusedDecodeAttentionOps(ops.Ops()).attention(*case).float()
    caches = case[5:7]
    torch.testing.assert_close(caches[0], ref_caches[0], rtol=1.6e-2, atol=1e-2)
    assert torch.equal(caches[1], ref_caches[1])
    assert float((got - ref).norm() / ref.norm()) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True])
def test_fused_attention_generation_is_used_and_replays_deterministically(cuda_device, compile):
    from bitmodels.bitnet import ops

    if ops.fused_decode_attention_status(cuda_device):
        pytest.skip(ops.fused_decode_attention_status(cuda_device))
    # head_dim 64: the fused kernel's; 4 query heads over 2 KV heads
    model = _model(seed=15, hidden_size=256, num_attention_heads=4, num_key_value_heads=2).to(cuda_device, torch.bfloat16)
    prompts = _prompts(15, (5, 9, 1))
    eager = Generator(model, cuda_graph=False, compile=compile)
    graph = Generator(model, cuda_graph=True, compile=compile)
    unfused = Generator(model, cuda_graph=True, compile=compile, fused_attention=False)
    assert eager.attention_kernel.startswith("cuda_ext.decode_attention")
    assert unfused.attention_kernel == "torch (fused_attention=False)"
    a = eager.generate(prompts, 10, stop_token_ids=[]).tokens
    assert graph.generate(prompts, 10, stop_token_ids=[]).tokens == a
    assert graph.generate(prompts, 10, stop_token_ids=[]).tokens == a
    b = unfused.generate(prompts, 10, stop_token_ids=[]).tokens
    # the two attention paths round differently (bf16); greedy tokens agree on most steps
    agree = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb)) / sum(len(r) for r in a)
    assert agree >= 0.8, (a, b)


@pytest.mark.gpu
def test_triton_kernel_takes_the_rows_past_the_fused_limit(cuda_device):
    from bitmodels.bitnet import ops
    from bitmodels.bitnet import triton_attention as ta

    if ops.fused_decode_attention_status(cuda_device) or not ta.available():
        pytest.skip("needs cuda_ext's attention kernel and Triton")
    model = _model(seed=17, hidden_size=256, num_attention_heads=4, num_key_value_heads=2).to(cuda_device, torch.bfloat16)
    auto = Generator(model, cuda_graph=True, compile=True)
    plain = Generator(model, cuda_graph=True, compile=True, triton_attention=False)
    limit = ops.FUSED_ATTENTION_MAX_BATCH_BEFORE_TRITON
    assert auto.attention_kernel.endswith(f"up to {limit} rows, the split-KV Triton kernel above")
    # the attention set under the one-kernel step inputs' wrapper (GatheredInputsOps, where cuda_ext runs)
    fused = auto.decode_ops.base if isinstance(auto.decode_ops, ops.GatheredInputsOps) else auto.decode_ops
    assert isinstance(fused.base, ops.TritonDecodeOps) and fused.max_batch == limit
    assert plain.attention_kernel.endswith(f"up to {ops.FUSED_ATTENTION_MAX_BATCH} rows, torch above")
    fused_plain = plain.decode_ops.base if isinstance(plain.decode_ops, ops.GatheredInputsOps) else plain.decode_ops
    assert isinstance(fused_plain, ops.FusedDecodeAttentionOps) and not isinstance(fused_plain.base, ops.TritonDecodeOps)
    assert Generator(model, compile=False).attention_kernel.endswith("torch above")  # Triton needs compile
    # 6 rows, past the limit: the same Triton attention as triton_attention=True, token for token; 3 rows: the
    # fused kernel, as without Triton
    everywhere = Generator(model, cuda_graph=True, compile=True, triton_attention=True)
    six, three = _prompts(17, (5, 9, 1, 4, 7, 3)), _prompts(18, (5, 9, 2))
    a = auto.generate(six, 8, stop_token_ids=[]).tokens
    assert auto.generate(six, 8, stop_token_ids=[]).tokens == a
    assert everywhere.generate(six, 8, stop_token_ids=[]).tokens == a
    assert auto.generate(three, 8, stop_token_ids=[]).tokens == plain.generate(three, 8, stop_token_ids=[]).tokens


def test_fused_attention_on_cpu_is_refused_with_the_reason():
    model = _model(seed=16)
    with pytest.raises(ValueError, match="not a CUDA device"):
        Generator(model, fused_attention=True)
    assert Generator(model).attention_kernel == use_cpu_attention("cpu")[1]


@pytest.mark.gpu
def test_fused_attention_hands_large_batches_to_the_unfused_path(cuda_device, monkeypatch):
    from bitmodels.bitnet import ops

    if ops.fused_decode_attention_status(cuda_device):
        pytest.skip(ops.fused_decode_attention_status(cuda_device))
    calls = []
    base = ops.Ops()
    monkeypatch.setattr(base, "attention", lambda *a, **k: calls.append(a[0].shape[0]) or ops.attention(*a, **k))
    fused = ops.FusedDecodeAttentionOps(base)
    B, H, KVH, D, S = ops.FUSED_ATTENTION_MAX_BATCH + 1, 4, 2, 64, 64
    q, k, v = (torch.randn(B, 1, n, D, device=cuda_device, dtype=torch.bfloat16) for n in (H, KVH, KVH))
    c = s = torch.ones(B, 1, 1, D, device=cuda_device, dtype=torch.bfloat16)
    caches = [torch.randn(B, KVH, S, D, device=cuda_device, dtype=torch.bfloat16) for _ in range(2)]
    mask = torch.ones(B, 1, 1, S, dtype=torch.bool, device=cuda_device)
    w = torch.ones(H * D, device=cuda_device, dtype=torch.bfloat16)
    slots = torch.tensor([5], device=cuda_device)
    fused.attention(q, k, v, c, s, *caches, slots, mask, w, 1e-5)
    fused.attention(q[:2], k[:2], v[:2], c[:2], s[:2], *(t[:2].contiguous() for t in caches), slots, mask[:2], w, 1e-5)
    assert calls == [B]  # the 2-row call ran the fused kernel


def test_fused_mlp_on_cpu_says_why_not():
    model = _model(seed=17)
    assert Generator(model).mlp_kernel == (
        "separate kernels (the norms do not quantize (quantize_in_norms=False or a projection takes no int8 input))")
    assert Generator(model, fused_mlp=False).mlp_kernel == "separate kernels (fused_mlp=False)"
    assert all(layer.fused_mlp is None for layer in model.model.layers)


def test_layer_hands_the_norm_to_the_mlp_kernel_only_where_it_takes_it():
    """_norm_and_mlp is None (the norm kernel, then the MLP) for CPU rows or without norm_in_mlp; the GPU test
    below runs the kernel's side."""
    layer = _model(seed=19).model.layers[0]

    class Kernel:  # stands in for FusedBitnetMLP (no GPU here)
        norm_max_tokens, sub_weight, calls = 6, torch.ones(2, dtype=torch.bfloat16), []

        def norm_and_mlp(self, h, o):
            self.calls.append(h.shape)
            return h + o, o

    h = torch.ones(1, 1, 64, dtype=torch.bfloat16)
    layer.fused_mlp, layer.norm_in_mlp = Kernel(), True
    assert layer._norm_and_mlp(h, h, quantize=True) is None  # CPU rows
    layer.norm_in_mlp = False
    assert layer._norm_and_mlp(h, h, quantize=True) is None
    assert Kernel.calls == []


def test_norms_in_the_gemvs_on_cpu_say_why_not(monkeypatch):
    model = _model(seed=20)
    monkeypatch.delenv("BITLAB_NORM_GEMV", raising=False)
    assert Generator(model).norm_gemv == "separate kernels (norm_in_gemv=False)"
    why = Generator(model, norm_in_gemv=True).norm_gemv
    assert why.startswith("separate kernels (") and why != "separate kernels (norm_in_gemv=False)", why
    assert all(layer.norm_linears == {} for layer in model.model.layers)


def test_qkv_in_attention_on_cpu_says_why_not(monkeypatch):
    model = _model(seed=22)
    monkeypatch.delenv("BITLAB_QKV_ATTENTION", raising=False)
    gen = Generator(model, qkv_in_attention=True)
    assert gen.qkv_attention.startswith("separate q/k/v projection ("), gen.qkv_attention
    assert model.qkv_attention_kernel.startswith("separate q/k/v projection ("), model.qkv_attention_kernel
    assert all(layer.qkv_attention is None for layer in model.model.layers)


def test_layer_hands_q_k_v_to_the_attention_only_where_it_takes_it(monkeypatch):
    """One token, quantizing norms, a binding that is wanted and an ops set with the kernel: the layer offers the
    input norm's int8 rows to ``qkv_attention``; where that declines (None), the projection's path runs, so the
    tokens are those of a plain generator."""
    from bitcore.kernels import KernelRegistry
    from bitmodels.bitnet.bindings import QuantizedActivation

    monkeypatch.delenv("BITLAB_QKV_ATTENTION", raising=False)
    model = _model(seed=23)
    prompts = _prompts(23, (5,))
    with KernelRegistry.force_backend("torch_ref"):  # kernels that take int8 input: the norms quantize
        model.prepare_for_inference("cpu")
    assert all(layer.quantized_inputs for layer in model.model.layers)
    want = Generator(model, bind=False).generate(prompts, 6, stop_token_ids=[]).tokens

    class Offered:
        calls = []

        def __init__(self, base):
            self.base = base

        def __getattr__(self, name):
            return getattr(self.base, name)

        def qkv_attention(self, x, qkv, *rest):
            self.calls.append((type(x), tuple(x.q.shape), qkv))
            return None

    for layer in model.model.layers:
        layer.qkv_attention, layer.use_qkv_attention = "bound", True
    gen = Generator(model, bind=False)
    gen.decode_ops = Offered(gen.decode_ops)
    assert gen.generate(prompts, 6, stop_token_ids=[]).tokens == want
    assert len(Offered.calls) == 5 * len(model.model.layers)  # each decode step, each layer
    assert all(c == (QuantizedActivation, (1, 1, 48), "bound") for c in Offered.calls)
    Offered.calls.clear()
    gen.generate(_prompts(24, (5, 3)), 4, stop_token_ids=[])  # two rows: not offered
    monkeypatch.setenv("BITLAB_QKV_ATTENTION", "off")
    gen.generate(prompts, 4, stop_token_ids=[])  # switched off at run time
    assert Offered.calls == []
    monkeypatch.delenv("BITLAB_QKV_ATTENTION")
    for layer in model.model.layers:
        layer.use_qkv_attention = False
    gen.generate(prompts, 4, stop_token_ids=[])  # bound but not wanted
    assert Offered.calls == []
    monkeypatch.setenv("BITLAB_QKV_ATTENTION", "on")
    gen.generate(prompts, 3, stop_token_ids=[])  # turned on at run time
    assert len(Offered.calls) == 2 * len(model.model.layers)


@pytest.mark.gpu
def test_q_k_v_inside_the_attention_kernel_gives_the_same_logits_and_tokens(cuda_device, monkeypatch):
    """The q/k/v projection inside the attention kernel: the same bits as the projection's kernel then the attention
    kernel (where both take the same cluster size), so the same logits and tokens, eager and replayed."""
    from backends.cuda_ext import ops as cuda_ops

    if not cuda_ops.availability():
        pytest.skip("needs cuda_ext")
    monkeypatch.delenv("BITLAB_QKV_ATTENTION", raising=False)
    model = _model(seed=25, hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=2,
                   vocab_size=1000, max_position_embeddings=512).to(cuda_device, torch.bfloat16)
    prompts = [_prompts(25, (300,), vocab=1000)[0]]  # 5 chunks of 64 keys: the cluster size both kernels take
    plain = Generator(model, cuda_graph=True)
    assert plain.qkv_attention.endswith("off by default (BITLAB_QKV_ATTENTION=on turns it on)"), plain.qkv_attention
    want = plain.generate(prompts, 10, stop_token_ids=[]).tokens
    eager_want = Generator(model, cuda_graph=False, bind=False).generate(prompts, 10, stop_token_ids=[]).tokens
    inside = Generator(model, cuda_graph=True, qkv_in_attention=True)
    assert inside.qkv_attention.startswith("cuda_ext.decode_qkv_attention"), inside.qkv_attention
    assert all(layer.qkv_attention is not None and layer.use_qkv_attention for layer in model.model.layers)
    assert inside.generate(prompts, 10, stop_token_ids=[]).tokens == want
    eager = Generator(model, cuda_graph=False, bind=False)
    calls = []
    real = eager.decode_ops.qkv_attention
    eager.decode_ops.qkv_attention = lambda *a, **k: calls.append(1) or real(*a, **k)
    assert eager.generate(prompts, 10, stop_token_ids=[]).tokens == eager_want
    assert len(calls) == 9 * len(model.model.layers)


@pytest.mark.gpu
def test_norms_in_the_gemvs_give_the_same_logits_and_tokens(cuda_device, monkeypatch):
    """input_layernorm inside the q/k/v GEMV and attn_sub_norm inside the o GEMV: the same bits as the norm
    kernels before the GEMVs, so the same logits and tokens, eager and replayed."""
    from backends.cuda_ext import ops as cuda_ops

    if not cuda_ops.availability():
        pytest.skip("needs cuda_ext")
    monkeypatch.delenv("BITLAB_NORM_GEMV", raising=False)
    model = _model(seed=21, hidden_size=256, intermediate_size=688, num_attention_heads=4,
                   num_key_value_heads=2).to(cuda_device, torch.bfloat16)
    prompts = _prompts(21, (5, 9))
    separate = Generator(model, cuda_graph=True)
    assert separate.norm_gemv == "separate kernels (norm_in_gemv=False)"
    want = separate.generate(prompts, 10, stop_token_ids=[]).tokens
    ids = torch.tensor([prompts[1][:2]], device=cuda_device)
    with torch.no_grad():
        want_logits = [model(ids[:, :1]), model(ids.view(2, 1))]
    monkeypatch.setenv("BITLAB_NORM_GEMV", "in")
    eager = Generator(model, cuda_graph=False)
    assert eager.norm_gemv == ("cuda_ext.linear_int8_norm (the norm inside the GEMV: qkv up to 8 tokens, "
                               "o_proj up to 8 tokens)"), eager.norm_gemv
    from backends.cuda_ext.norm_linear import NormLinear

    calls, original = [], NormLinear.__call__
    monkeypatch.setattr(NormLinear, "__call__", lambda self, a, b=None: calls.append(a.shape) or original(self, a, b))
    with torch.no_grad():
        got_logits = [model(ids[:, :1]), model(ids.view(2, 1))]
    assert len(calls) == 2 * 2 * len(model.model.layers)  # q/k/v and o of every layer, two forwards
    for got, logits in zip(got_logits, want_logits):
        assert torch.equal(got, logits)
    assert eager.generate(prompts, 10, stop_token_ids=[]).tokens == want
    graph = Generator(model, cuda_graph=True)
    assert graph.generate(prompts, 10, stop_token_ids=[]).tokens == want


def test_cpu_norms_run_as_one_call_each(monkeypatch):
    """On a CPU the norms run as cpp_cpu.cpu_rms_norm (one call per norm); BITLAB_CPU_NORM=torch keeps torch's
    operations.  The same bits, so the same logits."""
    pytest.importorskip("backends.cpp_cpu.kernels")
    from backends.cpp_cpu.kernels import backend_availability

    if not backend_availability():
        pytest.skip("cpp_cpu unavailable")
    model = _model(seed=24)
    ids = torch.tensor([_prompts(24, (7,))[0]])
    monkeypatch.setenv("BITLAB_CPU_NORM", "torch")
    assert Generator(model).cpu_norm == "torch (BITLAB_CPU_NORM=torch)"
    with torch.no_grad():
        want = model(ids)
    monkeypatch.delenv("BITLAB_CPU_NORM")
    assert Generator(model).cpu_norm == "cpp_cpu.cpu_rms_norm (one call per norm)"
    calls, op = [], torch.ops.bitlab.cpu_rms_norm
    monkeypatch.setattr(torch.ops.bitlab, "cpu_rms_norm", lambda *a: calls.append(a[-1]) or op(*a))
    with torch.no_grad():
        got = model(ids)
    assert sorted(set(calls)) == [0, 1, 2] and len(calls) == 4 * len(model.model.layers) + 1  # + the final norm
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_decode_attention_runs_as_one_call_per_layer(monkeypatch, dtype):
    """On a CPU one-token attention runs as cpp_cpu.cpu_decode_attention (one call per layer and step);
    BITLAB_CPU_ATTENTION=torch keeps torch's operations.  Prompts of different lengths (left padding in the mask):
    the same tokens (the op's outputs against torch's: tests/backends/cpp_cpu/test_decode_attention.py)."""
    from backends.cpp_cpu.kernels import backend_availability

    if not backend_availability():
        pytest.skip("cpp_cpu unavailable")
    model = _model(seed=25).to(dtype)
    prompts = _prompts(25, (4, 9, 6))
    monkeypatch.setenv("BITLAB_CPU_ATTENTION", "torch")
    torch_gen = Generator(model)
    assert torch_gen.attention_kernel == "torch (BITLAB_CPU_ATTENTION=torch)"
    want = torch_gen.generate(prompts, 8, stop_token_ids=[])
    monkeypatch.delenv("BITLAB_CPU_ATTENTION")
    gen = Generator(model)
    assert gen.attention_kernel.startswith("cpp_cpu.cpu_decode_attention"), gen.attention_kernel
    calls, op = [], torch.ops.bitlab.cpu_decode_attention
    monkeypatch.setattr(torch.ops.bitlab, "cpu_decode_attention", lambda *a: calls.append(a[0].shape) or op(*a))
    got = gen.generate(prompts, 8, stop_token_ids=[])
    steps = 8 - 1  # the first token comes from the prefill
    assert len(calls) == steps * len(model.model.layers) and all(shape[:2] == (3, 1) for shape in calls)
    assert got.tokens == want.tokens


def test_the_o_norm_tail_on_cpu_says_why_not(monkeypatch):
    model = _model(seed=22)
    monkeypatch.delenv("BITLAB_NORM_TAIL", raising=False)
    assert Generator(model).norm_tail == "separate kernels (norm_tail=False)"
    why = Generator(model, norm_tail=True).norm_tail
    assert why.startswith("separate kernels (") and why != "separate kernels (norm_tail=False)", why
    assert all(layer.o_norm_tail is None for layer in model.model.layers)
    monkeypatch.setenv("BITLAB_NORM_TAIL", "on")
    assert Generator(model).norm_tail == why


@pytest.mark.gpu
def test_the_o_norm_tail_gives_the_same_logits_and_tokens(cuda_device, monkeypatch):
    """o_proj, the residual add and post_attention_layernorm in one kernel (its last block runs the norm): the same
    bits as the projection and then the norm kernel, so the same logits and tokens, eager and replayed."""
    from backends.cuda_ext import ops as cuda_ops

    if not cuda_ops.availability():
        pytest.skip("needs cuda_ext")
    monkeypatch.delenv("BITLAB_NORM_GEMV", raising=False)
    monkeypatch.delenv("BITLAB_MLP_NORM", raising=False)
    model = _model(seed=23, hidden_size=256, intermediate_size=688, num_attention_heads=4,
                   num_key_value_heads=2).to(cuda_device, torch.bfloat16)
    prompts = _prompts(23, (5, 9))
    monkeypatch.setenv("BITLAB_NORM_TAIL", "off")  # bound (norm_tail=True), switched off at run time
    separate = Generator(model, cuda_graph=True, norm_tail=True)
    assert separate.norm_tail == ("cuda_ext.linear_int8_norm_tail (o_proj, the residual add and "
                                  "post_attention_layernorm in one kernel up to 8 tokens)"), separate.norm_tail
    want = separate.generate(prompts, 10, stop_token_ids=[]).tokens
    ids = torch.tensor([prompts[1][:2]], device=cuda_device)
    from backends.cuda_ext.norm_tail import NormTailLinear

    calls, original = [], NormTailLinear.__call__
    monkeypatch.setattr(NormTailLinear, "__call__", lambda self, x, res: calls.append(res.shape) or original(self, x, res))
    with torch.no_grad():
        want_logits = [model(ids[:, :1]), model(ids.view(2, 1))]
    assert calls == []  # switched off
    monkeypatch.delenv("BITLAB_NORM_TAIL")
    with torch.no_grad():
        got_logits = [model(ids[:, :1]), model(ids.view(2, 1))]
    assert len(calls) == 2 * len(model.model.layers)  # every layer, two forwards
    for got, logits in zip(got_logits, want_logits):
        assert torch.equal(got, logits)
    assert Generator(model, cuda_graph=False, bind=False).generate(prompts, 10, stop_token_ids=[]).tokens == want
    assert Generator(model, cuda_graph=True, bind=False).generate(prompts, 10, stop_token_ids=[]).tokens == want


@pytest.mark.gpu
@pytest.mark.parametrize("norm_in", [False, True])
def test_fused_mlp_generation_is_used_and_replays_deterministically(cuda_device, monkeypatch, norm_in):
    """The one-kernel MLP in generation, eager and replayed; with BITLAB_MLP_NORM=in the kernel also takes the
    residual add and the post-attention norm."""
    from backends.cuda_ext import ops as cuda_ops

    if not cuda_ops.availability() or torch.cuda.get_device_capability(cuda_device)[0] < 9:
        pytest.skip("the fused MLP kernel needs cuda_ext on an sm_90 GPU")
    model = _model(seed=18, hidden_size=256, intermediate_size=688, num_attention_heads=4,
                   num_key_value_heads=2).to(cuda_device, torch.bfloat16)
    prompts = _prompts(18, (5, 9))  # two rows: decode steps run the one-kernel MLP
    separate = Generator(model, cuda_graph=True, fused_mlp=False)
    assert separate.mlp_kernel == "separate kernels (fused_mlp=False)"
    b = separate.generate(prompts, 10, stop_token_ids=[]).tokens
    monkeypatch.setenv("BITLAB_MLP_NORM", "in" if norm_in else "")
    eager = Generator(model, cuda_graph=False)
    assert eager.mlp_kernel == ("cuda_ext.bitnet_mlp (one kernel up to 2 tokens, with the residual add and "
                                "post-attention norm up to 2)" if norm_in else
                                "cuda_ext.bitnet_mlp (one kernel up to 2 tokens)"), eager.mlp_kernel
    assert all(layer.norm_in_mlp == norm_in for layer in model.model.layers)
    a = eager.generate(prompts, 10, stop_token_ids=[]).tokens
    graph = Generator(model, cuda_graph=True)
    assert graph.generate(prompts, 10, stop_token_ids=[]).tokens == a
    assert graph.generate(prompts, 10, stop_token_ids=[]).tokens == a
    # the sub-norm's sum is added in another order (a quantization step apart, rarely): tokens agree mostly
    agree = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb)) / sum(len(r) for r in a)
    assert agree >= 0.8, (a, b)
    ids = torch.tensor([prompts[1]], device=cuda_device)
    with torch.no_grad():
        logits = model(ids[:, :1]).float()  # one token: the fused MLP serves it
        model.prepare_for_inference(cuda_device, fused_mlp=False)
        want = model(ids[:, :1]).float()
    assert ((logits - want).norm() / want.norm()).item() < 2e-2

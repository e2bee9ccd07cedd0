"""A CPU decode loop runs torch's ops on one thread and the cpp_cpu kernels (and the dense head) on all."""
from __future__ import annotations

import pytest
import torch

from bitmodels.bitnet import BitNetConfig, BitNetForCausalLM
from bitmodels.bitnet.cpu_threads import SWITCH, split_status
from bitmodels.bitnet.generate import Generator

pytest.importorskip("backends.cpp_cpu.threads")


def _model(seed=0):
    torch.manual_seed(seed)
    cfg = BitNetConfig(vocab_size=71, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
                       num_key_value_heads=3, max_position_embeddings=128, tie_word_embeddings=False,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = BitNetForCausalLM(cfg)
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 0.02)
        model.lm_head.weight.normal_(0, 0.02)
    return model.eval()


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _cpp_cpu_bound(gen) -> bool:
    return any(name.startswith("cpp_cpu.") for name in gen.kernels.values())


def test_status_says_what_runs_and_why(monkeypatch):
    model = _model()
    assert split_status(model, torch.device("cuda"))[1] == "torch's own setting (cuda device)"
    assert split_status(model, torch.device("cpu")) == (False, "torch's own setting (no projection runs on cpp_cpu)")
    gen = Generator(model)
    if not _cpp_cpu_bound(gen):
        pytest.skip(f"cpp_cpu does not serve the projections here: {gen.kernels}")
    split, why = split_status(model, torch.device("cpu"))
    assert split and why.startswith("torch ops on 1 thread, cpp_cpu kernels") and gen.cpu_threads == why
    monkeypatch.setenv(SWITCH, "torch")
    assert split_status(model, torch.device("cpu")) == (False, f"torch's own setting ({SWITCH}=torch)")


def test_decode_runs_torch_on_one_thread_and_the_head_on_all(two_threads):
    gen = Generator(_model())
    if not _cpp_cpu_bound(gen):
        pytest.skip(f"cpp_cpu does not serve the projections here: {gen.kernels}")
    from backends.cpp_cpu.threads import kernel_threads

    seen = {"attention": set(), "head": set(), "kernels": set()}
    ops = gen.decode_ops
    base_attention, base_head = ops.attention, ops.base.head

    def attention(*args, **kwargs):
        seen["attention"].add(torch.get_num_threads())
        seen["kernels"].add(kernel_threads())
        return base_attention(*args, **kwargs)

    def head(linear, x):
        seen["head"].add(torch.get_num_threads())
        return base_head(linear, x)

    ops.attention = attention
    ops.base.head = head
    gen.generate([[5, 6, 7]], max_new_tokens=4, stop_token_ids=[])
    assert seen == {"attention": {1}, "head": {2}, "kernels": {2}}
    assert torch.get_num_threads() == 2 and kernel_threads() == 2  # both restored (the kernels follow torch)


def test_decode_keeps_the_kernel_helpers_spinning_but_not_beside_a_dense_head(two_threads):
    gen = Generator(_model())
    if not _cpp_cpu_bound(gen):
        pytest.skip(f"cpp_cpu does not serve the projections here: {gen.kernels}")
    from backends.cpp_cpu.threads import DECODE_SPIN_US, pool_spin_us

    outside = pool_spin_us()
    seen = {"attention": set(), "head": set()}
    ops = gen.decode_ops
    base_attention, base_head = ops.attention, ops.base.head

    def attention(*args, **kwargs):
        seen["attention"].add(pool_spin_us())
        return base_attention(*args, **kwargs)

    def head(linear, x):
        seen["head"].add(pool_spin_us())
        return base_head(linear, x)

    ops.attention = attention
    ops.base.head = head
    gen.generate([[5, 6, 7]], max_new_tokens=4, stop_token_ids=[])
    assert seen == {"attention": {DECODE_SPIN_US}, "head": {0}}  # this model's head is dense (nn.Linear)
    assert pool_spin_us() == outside


def test_same_tokens_as_without_the_split(two_threads, monkeypatch):
    prompts = [[5, 9, 11, 3], [7, 8]]
    split = Generator(_model()).generate(prompts, max_new_tokens=8, stop_token_ids=[]).tokens
    monkeypatch.setenv(SWITCH, "torch")
    plain_gen = Generator(_model())
    assert plain_gen.cpu_threads.endswith(f"({SWITCH}=torch)")
    assert plain_gen.generate(prompts, max_new_tokens=8, stop_token_ids=[]).tokens == split


def test_threads_restored_when_a_step_fails(two_threads):
    gen = Generator(_model())
    if not _cpp_cpu_bound(gen):
        pytest.skip(f"cpp_cpu does not serve the projections here: {gen.kernels}")

    def broken(*args, **kwargs):
        raise RuntimeError("step failed")

    gen.decode_ops.attention = broken
    with pytest.raises(RuntimeError, match="step failed"):
        gen.generate([[5, 6]], max_new_tokens=3, stop_token_ids=[])
    assert torch.get_num_threads() == 2
    from backends.cpp_cpu.threads import DECODE_SPIN_US, pool_spin_us

    assert pool_spin_us() != DECODE_SPIN_US

"""Our BitNet decoder against transformers' own BitNetForCausalLM on the same tiny packed checkpoint.

Tolerance: the integer accumulations of every projection are identical; the
float epilogues differ in order (ours ``acc * amax/127 * (1/ws)``, theirs
``acc / (ws * 127/amax)``) and attention runs through a different but
equivalent path, a few float32 ulps per layer.  Observed max |diff| of logits
~3e-7 at logits of magnitude ~1, so we demand rtol = atol = 1e-5, and equal
argmax.  This holds for transformers' ``BitLinear`` (what the published
checkpoints use).  Its ``AutoBitLinear`` multiplies dequantized float
activations by float weights instead of accumulating integers, so now and then
an int8 activation of a later layer rounds the other way: observed max |diff|
~1.4e-3, tested at atol 5e-3.
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo

from tests.bitmodels.bitnet.bitnet_testing import load_transformers_oracle, write_hf_bitnet

from bitcore.errors import CheckpointError
from bitmodels import AutoBitModel
from bitmodels.bitnet import BitNetForCausalLM
from bitmodels.bitnet.generate import Generator

RTOL = ATOL = 1e-5
AUTOBITLINEAR_ATOL = 5e-3


@pytest.fixture(scope="module", params=["untied", "tied"])
def checkpoint(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    write_hf_bitnet(directory, seed=len(request.param), tie_word_embeddings=(request.param == "tied"))
    return directory


@pytest.fixture(scope="module")
def oracle(checkpoint):
    return load_transformers_oracle(checkpoint)


def _their_logits(model, ids, attention_mask=None):
    with torch.no_grad(), torch._dynamo.config.patch(disable=True):
        return model(input_ids=ids, attention_mask=attention_mask).logits


def test_logits_match_transformers(checkpoint, oracle):
    ours = BitNetForCausalLM.from_pretrained(checkpoint)
    assert ours.config.tie_word_embeddings == oracle.config.tie_word_embeddings
    ids = torch.randint(3, 97, (3, 29), generator=torch.Generator().manual_seed(5))
    expected = _their_logits(oracle, ids)
    with torch.no_grad():
        got = ours(ids)
    assert expected.abs().max() > 0.1  # a real comparison, not of zeros
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_autobitlinear_checkpoint_logits_close_to_transformers(tmp_path):
    write_hf_bitnet(tmp_path, seed=4, linear_class="autobitlinear")
    oracle = load_transformers_oracle(tmp_path)
    ours = BitNetForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(3, 97, (2, 19), generator=torch.Generator().manual_seed(4))
    expected = _their_logits(oracle, ids)
    with torch.no_grad():
        got = ours(ids)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, rtol=0, atol=AUTOBITLINEAR_ATOL)


def test_prepared_and_fused_projections_match_transformers(checkpoint, oracle):
    ours = BitNetForCausalLM.from_pretrained(checkpoint)
    kernels = ours.prepare_for_inference("cpu", fuse=True)
    assert {"qkv", "gate_up", "o_proj", "down_proj"} <= set(kernels)
    ids = torch.randint(3, 97, (2, 17), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        got = ours(ids)
    torch.testing.assert_close(got, _their_logits(oracle, ids), rtol=RTOL, atol=ATOL)


def test_greedy_generation_matches_transformers_with_left_padding(checkpoint, oracle):
    ours = BitNetForCausalLM.from_pretrained(checkpoint)
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 97, (n,), generator=gen).tolist() for n in (9, 4, 13)]
    out = Generator(ours).generate(prompts, max_new_tokens=12, stop_token_ids=[2], pad_token_id=0)
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.no_grad(), torch._dynamo.config.patch(disable=True):
        theirs = oracle.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                 pad_token_id=0, eos_token_id=2)
    for row, got in zip(theirs[:, width:].tolist(), out.tokens):
        expected = row[: row.index(2) + 1] if 2 in row else row
        assert got == expected


def test_save_load_roundtrip_is_exact_and_transformers_architecture_reads_it(checkpoint, oracle, tmp_path):
    ours = BitNetForCausalLM.from_pretrained(checkpoint)
    ours.save_pretrained(tmp_path / "saved")
    again = BitNetForCausalLM.from_pretrained(tmp_path / "saved")
    ids = torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert torch.equal(again(ids), ours(ids))
        for (_, a), (_, b) in zip(again.bitlinears(), ours.bitlinears()):
            assert torch.equal(a.qweight, b.qweight) and torch.equal(a.weight_scale, b.weight_scale)
    # the same directory rebuilds transformers' own architecture with BitLab layers
    other = AutoBitModel.from_pretrained(tmp_path / "saved", verbose=False)
    with torch.no_grad():
        torch.testing.assert_close(other(input_ids=ids).logits, ours(ids), rtol=RTOL, atol=ATOL)


def test_missing_projection_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    write_hf_bitnet(tmp_path, seed=3)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["model.layers.1.self_attn.v_proj.weight_scale"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.v_proj\.weight_scale"):
        BitNetForCausalLM.from_pretrained(tmp_path)


def test_not_a_checkpoint_says_what_was_expected(tmp_path):
    with pytest.raises(CheckpointError, match="bitlab_config.json"):
        BitNetForCausalLM.from_pretrained(tmp_path)


@pytest.mark.gpu
def test_gpu_logits_and_cuda_graph_generation(checkpoint, oracle, cuda_device):
    ours = BitNetForCausalLM.from_pretrained(checkpoint).to(cuda_device)
    ids = torch.randint(3, 97, (2, 21), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        got = ours(ids.to(cuda_device)).cpu()
    torch.testing.assert_close(got, _their_logits(oracle, ids), rtol=1e-4, atol=1e-4)
    prompts = [ids[0, :9].tolist(), ids[1, :5].tolist()]
    graph = Generator(ours, cuda_graph=True).generate(prompts, max_new_tokens=10, stop_token_ids=[])
    eager = Generator(ours, cuda_graph=False).generate(prompts, max_new_tokens=10, stop_token_ids=[])
    assert graph.tokens == eager.tokens
    assert all(len(t) == 10 for t in graph.tokens)

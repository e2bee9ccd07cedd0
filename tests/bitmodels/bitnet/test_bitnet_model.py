"""BitNetConfig and the model's structure: registry, transformers naming, packed-only building, weight memory."""
from __future__ import annotations

import pytest
import torch

from bitcore.errors import ConfigError
from bitlayers import BitLinear
from bitmodels import AutoBitModel
from bitmodels.bitnet import BitNetConfig, BitNetForCausalLM

TINY = dict(vocab_size=53, hidden_size=40, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


def test_auto_bit_model_builds_it_from_a_dict_and_yaml():
    model = AutoBitModel.from_config({"model_type": "bitnet", **TINY})
    assert isinstance(model, BitNetForCausalLM)
    again = AutoBitModel.from_config(model.config.to_yaml())
    assert again.config == model.config


def test_default_config_is_the_2b4t_shape_with_w158a8():
    c = BitNetConfig()
    assert (c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.num_attention_heads,
            c.num_key_value_heads, c.vocab_size, c.head_dim) == (2560, 30, 6912, 20, 5, 128256, 128)
    q = c.quant_config
    assert (q.weight_bits, q.activation_dtype, q.activation_granularity) == (1.58, "int8", "per_token")


@pytest.mark.parametrize("change,match", [
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"hidden_act": "silu"}, "hidden_act"),
    ({"hidden_size": 42}, "hidden_size"),
    ({"vocab_size": 0}, "vocab_size"),
])
def test_config_errors_name_the_field(change, match):
    with pytest.raises(ConfigError, match=match):
        BitNetConfig(**{**TINY, **change})


def test_parameter_names_are_transformers_names():
    model = BitNetForCausalLM(BitNetConfig(**TINY)).eval()
    names = set(model.state_dict())
    for expected in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                     "model.layers.1.self_attn.q_proj.qweight", "model.layers.1.self_attn.attn_sub_norm.weight",
                     "model.layers.0.mlp.ffn_sub_norm.weight", "model.layers.0.post_attention_layernorm.weight"):
        assert expected in names
    assert len(model.bitlinears()) == 2 * 7
    assert all(isinstance(m, BitLinear) for _, m in model.bitlinears())


def test_tied_embeddings_share_one_matrix():
    model = BitNetForCausalLM(BitNetConfig(**{**TINY, "tie_word_embeddings": True}))
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_packed_only_model_has_no_latent_weights():
    model = BitNetForCausalLM(BitNetConfig(**TINY), packed_only=True)
    assert all(m.frozen and m.weight is None for _, m in model.bitlinears())
    mem = model.weight_memory()
    # ternary costs 2 bits per weight plus one float32 scale per projection
    per_layer = (40 * 40 + 2 * 40 * 20 + 40 * 40 + 2 * 72 * 40 + 40 * 72) // 4 + 7 * 4
    assert mem["packed"] == 2 * per_layer


def test_offloading_keeps_results_and_moves_packed_weights_off_the_compute_device():
    model = BitNetForCausalLM(BitNetConfig(**TINY)).eval()
    ids = torch.randint(0, 53, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids)
        model.prepare_for_inference("cpu", offload_packed=True)
        after = model(ids)
    assert torch.equal(before, after)
    assert all(m.qweight.device.type == "cpu" for _, m in model.bitlinears())


def test_save_after_offloading_and_reload_computes_the_same(tmp_path):
    model = BitNetForCausalLM(BitNetConfig(**TINY)).eval()
    model.prepare_for_inference("cpu", offload_packed=True)
    model.save_pretrained(tmp_path)
    again = BitNetForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 53, (3, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))
    assert again.config == model.config


def test_training_mode_runs_backward_through_the_bitlinears():
    model = BitNetForCausalLM(BitNetConfig(**TINY)).train()
    ids = torch.randint(0, 53, (2, 9), generator=torch.Generator().manual_seed(2))
    loss = torch.nn.functional.cross_entropy(model(ids)[:, :-1].reshape(-1, 53), ids[:, 1:].reshape(-1))
    loss.backward()
    grad = model.model.layers[0].mlp.down_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0

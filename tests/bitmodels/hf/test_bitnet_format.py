"""transformers' BitNet checkpoint format: our reader against transformers' own BitNet model as the oracle."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch._dynamo

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers.integrations.bitnet import pack_weights, unpack_weights  # noqa: E402

from bitcore.errors import CheckpointError  # noqa: E402
from bitcore.packing import dequantize, unpack_values  # noqa: E402
from bitlayers import BitLinear  # noqa: E402
from bitmodels import AutoBitModel  # noqa: E402
from bitmodels.hf.bitnet_format import (  # noqa: E402
    BITNET_QUANT_CONFIG,
    bitnet_linear_to_packed,
    is_bitnet_checkpoint,
    unpack_bitnet_ternary,
)

# Logits of our loader vs transformers' BitLinear on a float32 checkpoint: the
# integer accumulations are identical, only the epilogue differs
# (acc * (amax/127) * (1/ws) vs acc / (ws * 127/amax)), a few float32 ulps per
# layer; observed max |diff| ~2.5e-7 on logits of size ~0.5.
LOGITS_RTOL, LOGITS_ATOL = 1e-5, 1e-5


def _ternary(shape, gen):
    return torch.randint(-1, 2, shape, generator=gen).to(torch.float32)


@pytest.mark.parametrize("out_features,in_features", [(12, 7), (64, 33), (4, 1), (5, 3), (6, 9)])
def test_unpack_matches_transformers_layout(out_features, in_features):
    gen = torch.Generator().manual_seed(out_features * 31 + in_features)
    values = _ternary((out_features, in_features), gen)
    packed = pack_weights(values.clone())
    ours = unpack_bitnet_ternary(packed, out_features)
    assert torch.equal(ours.to(torch.float32), values)
    # and transformers' own unpacker agrees (run eagerly: no inductor build in tests)
    with torch._dynamo.config.patch(disable=True):
        theirs = unpack_weights(packed, dtype=torch.float32)
    assert torch.equal(theirs[:out_features], values)


def test_linear_to_packed_scale_is_inverse_and_values_survive():
    gen = torch.Generator().manual_seed(3)
    values = _ternary((20, 13), gen)
    ws = torch.tensor([2.5])
    packed = bitnet_linear_to_packed(pack_weights(values.clone()), ws, 13)
    assert packed.weight_bits == 1.58 and packed.granularity == "per_tensor"
    assert torch.equal(unpack_values(packed).to(torch.float32), values)
    assert torch.equal(packed.scale, torch.tensor([0.4], dtype=torch.float32))
    assert torch.allclose(dequantize(packed), values * 0.4)


def test_linear_to_packed_rejects_wrong_in_features_and_bad_codes():
    packed = pack_weights(torch.zeros(8, 5))
    with pytest.raises(CheckpointError, match="in_features=6"):
        bitnet_linear_to_packed(packed, torch.tensor([1.0]), 6)
    bad = packed.clone()
    bad[1, 2] = 0b11
    with pytest.raises(CheckpointError, match="code 3"):
        bitnet_linear_to_packed(bad, torch.tensor([1.0]), 5, name="layers.0.q_proj.weight")
    with pytest.raises(CheckpointError, match="finite non-zero"):
        bitnet_linear_to_packed(packed, torch.tensor([0.0]))


def _tiny_bitnet_checkpoint(directory, seed=0, linear_class="bitlinear"):
    """A random BitNetConfig model whose projections are ternarized and packed the way transformers stores them."""
    torch.manual_seed(seed)
    config = transformers.BitNetConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    model = transformers.BitNetForCausalLM(config).eval()
    state = {}
    for name, tensor in model.state_dict().items():
        module_name = name.rsplit(".", 1)[0]
        module = model.get_submodule(module_name)
        if isinstance(module, torch.nn.Linear) and name.endswith(".weight") and module_name != "lm_head":
            w = tensor.float()
            s = w.abs().mean().clamp(min=1e-5)  # BitNet b1.58 absmean
            values = (w / s).round().clamp(-1, 1)
            state[name] = pack_weights(values.clone())
            inv = 1.0 / s
            state[name[: -len("weight")] + "weight_scale"] = (inv if linear_class == "bitlinear" else s).reshape(1)
        else:
            state[name] = tensor.detach().clone()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    config.quantization_config = {
        "quant_method": "bitnet", "linear_class": linear_class, "quantization_mode": "offline",
        "modules_to_not_convert": ["lm_head"], "use_rms_norm": False,
    }
    config.dtype = torch.float32
    config.architectures = ["BitNetForCausalLM"]
    config.save_pretrained(directory)
    return config


@pytest.fixture(scope="module", params=["bitlinear", "autobitlinear"])
def bitnet_dir(request, tmp_path_factory):
    """transformers' BitLinear stores 1/scale; its AutoBitLinear (offline) stores the scale itself."""
    directory = tmp_path_factory.mktemp(f"bitnet_{request.param}")
    _tiny_bitnet_checkpoint(directory, linear_class=request.param)
    return directory


def _oracle(directory):
    # transformers' BitLinear torch.compile's its helpers; run them eagerly (same math, no inductor build here).
    with torch._dynamo.config.patch(disable=True):
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    return model


def test_checkpoint_is_detected(bitnet_dir, tmp_path):
    assert is_bitnet_checkpoint(bitnet_dir)
    assert not is_bitnet_checkpoint(tmp_path)


def test_logits_match_transformers_bitnet(bitnet_dir):
    theirs = _oracle(bitnet_dir)
    assert any(
        type(m).__name__ in ("BitLinear", "AutoBitLinear") and type(m).__module__.startswith("transformers")
        for m in theirs.modules()
    )
    ours = AutoBitModel.from_pretrained(bitnet_dir, verbose=False)
    bitlinears = {n: m for n, m in ours.named_modules() if isinstance(m, BitLinear)}
    assert len(bitlinears) == 2 * 7 and all(m.frozen for m in bitlinears.values())
    assert all(m.quant_config == BITNET_QUANT_CONFIG for m in bitlinears.values())
    assert isinstance(ours.lm_head, torch.nn.Linear) and not isinstance(ours.lm_head, BitLinear)
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(3, 97, (3, 17), generator=gen)
    with torch.no_grad(), torch._dynamo.config.patch(disable=True):
        expected = theirs(input_ids=ids).logits
    with torch.no_grad():
        got = ours(input_ids=ids).logits
    assert got.shape == expected.shape == (3, 17, 97)
    assert expected.abs().max() > 0.1  # not a degenerate all-zero comparison
    torch.testing.assert_close(got, expected, rtol=LOGITS_RTOL, atol=LOGITS_ATOL)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_missing_weight_scale_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    _tiny_bitnet_checkpoint(tmp_path, seed=1)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["model.layers.1.mlp.down_proj.weight_scale"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.down_proj\.weight_scale"):
        AutoBitModel.from_pretrained(tmp_path, verbose=False)


def test_unsupported_rms_norm_option_is_refused(tmp_path):
    import json

    _tiny_bitnet_checkpoint(tmp_path, seed=2)
    path = tmp_path / "config.json"
    raw = json.loads(path.read_text())
    raw["quantization_config"]["use_rms_norm"] = True
    path.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="use_rms_norm"):
        AutoBitModel.from_pretrained(tmp_path, verbose=False)

"""Tiny transformers BitNet checkpoints (built from a config, no download) and a tiny tokenizer for the bitnet tests."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch._dynamo

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

VOCAB = 97
WORDS = [f"w{i}" for i in range(VOCAB - 3)]  # ids 3.. ; 0 = <pad>, 1 = <s>, 2 = </s>


def write_hf_bitnet(directory, *, seed: int = 0, tie_word_embeddings: bool = False, num_hidden_layers: int = 2,
                    linear_class: str = "bitlinear"):
    """A random transformers BitNet model with ternarized projections, saved the way transformers stores them.

    Projections: absmean ternary values packed with transformers' ``pack_weights``, ``weight_scale``
    = 1 / mean|w| (``bitlinear``) or mean|w| (``autobitlinear``).  Odd sizes and grouped-query attention.
    """
    from safetensors.torch import save_file
    from transformers.integrations.bitnet import pack_weights

    torch.manual_seed(seed)
    config = transformers.BitNetConfig(
        vocab_size=VOCAB, hidden_size=96, intermediate_size=136, num_hidden_layers=num_hidden_layers,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=160,
        tie_word_embeddings=tie_word_embeddings, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    model = transformers.BitNetForCausalLM(config).eval()
    tensors = {}
    for key, value in model.state_dict().items():
        owner = key.rsplit(".", 1)[0]
        is_projection = owner.rsplit(".", 1)[-1].endswith("_proj") and key.endswith(".weight")
        if not is_projection:
            tensors[key] = value.detach().clone()
            continue
        mean_abs = value.abs().mean().clamp(min=1e-5)
        tensors[key] = pack_weights((value / mean_abs).round().clamp(-1, 1))
        scale = 1.0 / mean_abs if linear_class == "bitlinear" else mean_abs
        tensors[f"{owner}.weight_scale"] = scale.reshape(1)
    if tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"))
    config.quantization_config = {"quant_method": "bitnet", "linear_class": linear_class,
                                  "quantization_mode": "offline", "use_rms_norm": False}
    config.architectures = ["BitNetForCausalLM"]
    config.save_pretrained(directory)
    return directory


def load_transformers_oracle(directory):
    """transformers' own BitNet model on the checkpoint (its torch.compile'd helpers run eagerly here)."""
    with torch._dynamo.config.patch(disable=True):
        return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def write_tiny_tokenizer(directory):
    """A word-level tokenizer over ``WORDS`` with <pad>/<s>/</s>, saved for AutoTokenizer (offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<pad>"
    )
    fast.save_pretrained(directory)
    return fast

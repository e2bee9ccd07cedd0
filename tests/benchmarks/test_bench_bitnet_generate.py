"""bench_bitnet_generate.py's A/B rows by environment switch (--env-variant), on the CPU with the tiny shape."""
import os
import sys
from pathlib import Path

import pytest

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

"""``bitlab generate`` on a tiny transformers BitNet checkpoint with a tokenizer in the same directory (offline)."""
from __future__ import annotations


from tests.bitmodels.bitnet.bitnet_testing import write_hf_bitnet, write_tiny_tokenizer

from bitmodels.bitnet import BitNetForCausalLM
from bitmodels.bitnet.generate import Generator
from bitmodels.cli.main import main


def test_generate_streams_the_greedy_continuation(tmp_path, capsys):
    write_hf_bitnet(tmp_path, seed=12)
    tokenizer = write_tiny_tokenizer(tmp_path)
    prompt = "w5 w17 w40 w3"
    assert main(["generate", "--model", str(tmp_path), "--prompt", prompt, "--max-new-tokens", "6",
                 "--ignore-eos"]) == 0
    out = capsys.readouterr()
    ids = tokenizer(prompt)["input_ids"]
    assert ids[0] == 1 and len(ids) == 5  # <s> + four words
    expected = Generator(BitNetForCausalLM.from_pretrained(tmp_path)).generate([ids], 6, stop_token_ids=[]).tokens[0]
    text = tokenizer.decode(expected, skip_special_tokens=True)
    assert text.strip() and out.out.startswith(prompt)
    assert out.out.rstrip("\n").endswith(text)
    assert "tokens/s" in out.err


def test_generate_batch_prints_one_line_per_prompt(tmp_path, capsys):
    write_hf_bitnet(tmp_path, seed=13)
    write_tiny_tokenizer(tmp_path)
    code = main(["generate", "--model", str(tmp_path), "--prompt", "w1 w2", "--prompt", "w9 w8 w7 w6",
                 "--max-new-tokens", "3", "--temperature", "0.8", "--top-p", "0.9", "--seed", "1"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("w1 w2") and lines[1].startswith("w9 w8 w7 w6")


def test_generate_with_a_quantized_head_on_int8_activations(tmp_path, capsys):
    write_hf_bitnet(tmp_path, seed=14)
    tokenizer = write_tiny_tokenizer(tmp_path)
    prompt = "w4 w11 w2"
    assert main(["generate", "--model", str(tmp_path), "--prompt", prompt, "--max-new-tokens", "5", "--ignore-eos",
                 "--lm-head-bits", "8", "--lm-head-activations", "int8"]) == 0
    out = capsys.readouterr()
    ids = tokenizer(prompt)["input_ids"]
    gen = Generator(BitNetForCausalLM.from_pretrained(tmp_path), lm_head_bits=8, lm_head_activations="int8")
    expected = tokenizer.decode(gen.generate([ids], 5, stop_token_ids=[]).tokens[0], skip_special_tokens=True)
    assert out.out.rstrip("\n").endswith(expected)


def test_int8_head_activations_without_a_quantized_head_are_refused(tmp_path, capsys):
    write_hf_bitnet(tmp_path, seed=15)
    write_tiny_tokenizer(tmp_path)
    assert main(["generate", "--model", str(tmp_path), "--prompt", "w1", "--lm-head-activations", "int8"]) == 2
    assert "--lm-head-activations int8 needs --lm-head-bits" in capsys.readouterr().err

"""The digits split, the shared recipe, and the demo's core function end to end (accuracy floor)."""
from __future__ import annotations

import pytest
import torch

from bitlayers.bitlinear import BitLinear
from bitmodels.cli.cmd_demo import ACCURACY_FLOOR, run_demo
from bitmodels.training.data import load_digits_split
from bitmodels.training.digits import DIGITS_MLP, VARIANTS, build_digits_model, float_twin


def test_split_is_fixed_stratified_and_standardized_on_train_only():
    a, b = load_digits_split(), load_digits_split()
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_train, b.y_train)
    assert (len(a.y_train), len(a.y_test)) == (1347, 450) and a.n_features == 64 and a.n_classes == 10
    train_share = torch.bincount(a.y_train, minlength=10) / len(a.y_train)
    test_share = torch.bincount(a.y_test, minlength=10) / len(a.y_test)
    assert (train_share - test_share).abs().max() < 0.01  # stratified
    assert a.x_train.mean(0).abs().max() < 1e-4
    assert not torch.allclose(a.x_test.mean(0), torch.zeros(64), atol=1e-3)  # test stats were not used
    assert torch.isfinite(a.x_train).all()
    other = load_digits_split(seed=1)
    assert not torch.equal(other.y_test, a.y_test)
    raw = torch.arange(64, dtype=torch.float32).remainder(17).unsqueeze(0)
    torch.testing.assert_close(a.standardize(raw), (raw - a.mean) / a.std)


def test_split_rejects_bad_arguments():
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits_split(test_fraction=1.5)
    with pytest.raises(ValueError, match="dtype"):
        load_digits_split(dtype=torch.int32)


@pytest.mark.parametrize("name", [n for n in VARIANTS if n != "float"])
def test_convert_and_bitmlp_build_the_same_model(name):
    converted = build_digits_model(VARIANTS[name], seed=3)
    direct = build_digits_model(VARIANTS[name], seed=3, via="bitmlp")
    assert [type(m) for m in converted.modules()] == [type(m) for m in direct.modules()]
    for (k1, v1), (k2, v2) in zip(converted.state_dict().items(), direct.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    assert sum(isinstance(m, BitLinear) for m in direct.modules()) == DIGITS_MLP.n_layers


def test_float_twin_has_no_bit_layers():
    model = float_twin(DIGITS_MLP)
    assert not any(isinstance(m, BitLinear) for m in model.modules())
    assert sum(isinstance(m, torch.nn.Linear) for m in model.modules()) == DIGITS_MLP.n_layers
    with pytest.raises(ValueError, match="via"):
        build_digits_model(VARIANTS["W1A1"], via="magic")


def test_demo_trains_a_ternary_model_above_the_floor_and_times_the_reference_backend():
    lines = []
    report = run_demo(repeats=2, devices=["cpu"], print_fn=lambda *a: lines.append(" ".join(map(str, a))))
    assert report.accuracy >= ACCURACY_FLOOR
    assert report.frozen_matches_eval
    assert all(m.frozen for m in report.model.modules() if isinstance(m, BitLinear))
    # 64x256 + 256x256 + 256x10 ternary weights at 2 bits, plus 3 per-tensor float32 scales
    assert report.memory.packed_bytes == (64 * 256 + 256 * 256 + 256 * 10) // 4 + 3 * 4
    ref = [t for t in report.timings if t.backend == "torch_ref" and t.device == "cpu"]
    assert ref and ref[0].ran and ref[0].batch_ms > 0 and ref[0].accuracy == pytest.approx(report.accuracy)
    for t in report.timings:
        assert t.ran != bool(t.reason)  # every backend either ran or says why not
        if t.ran:  # every backend computes the same model: same predictions up to rounding
            assert abs(t.accuracy - report.accuracy) <= 2 / report.n_test
    text = "\n".join(lines)
    assert "2 bits per ternary weight" in text and f"{report.accuracy:.4f}" in text
    assert "fp32 nn.Linear" in text


def test_bitlab_train_meets_every_target(capsys):
    """`bitlab train` exits 0 only when every variant reaches its target and frozen == eval predictions.

    The ternary variant is covered by the demo test above; this runs the other three.
    """
    from bitmodels.cli.main import main

    code = main(["train", "--variants", "float", "W1A16", "W1A1"])
    out = capsys.readouterr().out
    assert code == 0, out
    for name in ("float", "W1A16", "W1A1"):
        assert any(line.startswith(name + " ") for line in out.splitlines()), out
    assert "targets missed" not in out and "on every test sample: yes" in out


@pytest.mark.parametrize("kwargs, word", [({"threads": 0}, "threads"), ({"repeats": 0}, "repeats"), ({"devices": ["tpu"]}, "tpu")])
def test_demo_rejects_bad_arguments_before_training(kwargs, word):
    with pytest.raises(ValueError, match=word):
        run_demo(print_fn=lambda *a: None, **kwargs)


def test_trainer_free_example_runs_and_reaches_the_ternary_target(capsys):
    import re
    import runpy
    from pathlib import Path

    example = Path(__file__).resolve().parents[3] / "examples" / "train_digits.py"
    runpy.run_path(str(example), run_name="__main__")
    out = capsys.readouterr().out
    accuracy = float(re.search(r"test accuracy of the frozen ternary model: ([0-9.]+)", out).group(1))
    assert accuracy >= 0.95, out
    assert "eval-mode predictions on every test sample: True" in out
    assert "identical outputs" in out

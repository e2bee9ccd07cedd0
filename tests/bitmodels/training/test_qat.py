"""The QAT loop, freezing and the frozen checkpoint, on fresh random data and odd shapes."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from bitcore.config import BitQuantConfig
from bitlayers.bitlinear import BitLinear
from bitmodels.mlp import BitMLP, BitMLPConfig
from bitmodels.training.qat import (
    MemoryReport,
    TrainConfig,
    accuracy,
    freeze_model,
    lr_at,
    model_memory,
    param_groups,
    predict,
    train_classifier,
    train_loop,
)

CONFIGS = {
    "W1.58A8": BitQuantConfig(weight_bits=1.58, activation_dtype="int8", activation_granularity="per_token"),
    "W1A16": BitQuantConfig(weight_bits=1, activation_dtype="float16"),
    "W1A1": BitQuantConfig(weight_bits=1, activation_dtype="binary", activation_granularity="per_token"),
    "W4A8g": BitQuantConfig(weight_bits=4, weight_granularity="per_group", group_size=8, activation_dtype="int8"),
}


def blobs(n=300, features=37, classes=5, seed=0):
    """Gaussian clusters around random centres: learnable, and fresh for every seed."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, features, generator=g) * 1.5
    y = torch.randint(0, classes, (n,), generator=g)
    x = centres[y] + torch.randn(n, features, generator=g)
    return x, y


def small_mlp(cfg, seed=0, features=37, classes=5, hidden=29):
    torch.manual_seed(seed)
    return BitMLP(BitMLPConfig(n_layers=3, in_channels=features, hidden_dim=hidden, out_channels=classes, quant_config=cfg))


def full_loss(model, x, y):
    model.train()
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_short_training_lowers_the_loss(name):
    x, y = blobs(seed=1)
    model = small_mlp(CONFIGS[name], seed=1)
    before = full_loss(model, x, y)
    result = train_classifier(model, x, y, TrainConfig(epochs=6, batch_size=32, lr=3e-3))
    assert not model.training  # the loop leaves the model ready for inference
    after = full_loss(model, x, y)
    assert after < 0.5 * before, f"{name}: loss {before:.3f} -> {after:.3f}"
    assert len(result.epoch_losses) == 6 and result.steps == 6 * math.ceil(300 / 32)
    assert result.epoch_losses[-1] < result.epoch_losses[0]


def test_latent_weights_receive_gradients_and_change():
    x, y = blobs(n=64, seed=2)
    model = small_mlp(CONFIGS["W1.58A8"], seed=2)
    start = [m.weight.detach().clone() for m in model.modules() if isinstance(m, BitLinear)]
    train_classifier(model, x, y, TrainConfig(epochs=1, batch_size=16))
    end = [m.weight for m in model.modules() if isinstance(m, BitLinear)]
    assert all(not torch.equal(a, b) for a, b in zip(start, end))


@pytest.mark.parametrize("name", ["W1.58A8", "W1A1", "W4A8g"])
def test_freezing_keeps_predictions_and_drops_latent_weights(name):
    x, y = blobs(n=200, seed=3)
    model = small_mlp(CONFIGS[name], seed=3)
    train_classifier(model, x, y, TrainConfig(epochs=3, batch_size=32))
    x_new = torch.randn(41, 37)
    with torch.no_grad():
        eval_logits = model.eval()(x_new)
    report = freeze_model(model)
    layers = [m for m in model.modules() if isinstance(m, BitLinear)]
    assert all(layer.frozen and layer.weight is None for layer in layers)
    with torch.no_grad():
        frozen_logits = model(x_new)
    assert torch.equal(frozen_logits, eval_logits)
    assert isinstance(report, MemoryReport)
    assert report.packed_bytes == sum(layer.packed_weight().nbytes() for layer in layers)


def test_memory_report_counts_true_bytes():
    model = small_mlp(CONFIGS["W1.58A8"], seed=4)  # 37 -> 29 -> 29 -> 5, per_tensor scales
    report = freeze_model(model)
    packed = 29 * math.ceil(37 / 4) + 29 * math.ceil(29 / 4) + 5 * math.ceil(29 / 4) + 3 * 4
    assert report.packed_bytes == packed
    assert report.quantized_weights == 29 * 37 + 29 * 29 + 5 * 29
    norms = 2 * (37 + 29 + 29)
    biases = 29 + 29 + 5
    assert report.other_bytes == 4 * (norms + biases)
    assert report.fp32_total_bytes == 4 * (report.quantized_weights + norms + biases)
    # 2 bits per ternary weight, plus padding of each row to a whole byte (37 and 29 inputs) and the scales
    assert report.bits_per_weight == pytest.approx(8 * packed / (29 * 37 + 29 * 29 + 5 * 29))
    assert 2.0 < report.bits_per_weight < 2.5


def test_memory_of_a_float_model_is_all_float():
    model = torch.nn.Sequential(torch.nn.Linear(13, 7), torch.nn.LayerNorm(7))
    report = model_memory(model)
    assert report.quantized_weights == 0 and report.packed_bytes == 0
    assert report.total_bytes == 4 * (13 * 7 + 7 + 14)
    with pytest.raises(ValueError, match="no BitLinear"):
        freeze_model(model)


def test_frozen_state_dict_loads_into_a_fresh_unfrozen_model():
    x, y = blobs(n=150, seed=5)
    model = small_mlp(CONFIGS["W1.58A8"], seed=5)
    train_classifier(model, x, y, TrainConfig(epochs=2, batch_size=32))
    freeze_model(model)
    state = model.state_dict()
    assert not any(k.endswith(".weight") and "layers.1." in k for k in state)  # no latent weight saved
    fresh = small_mlp(CONFIGS["W1.58A8"], seed=99)  # different random latent weights
    fresh.load_state_dict(state)
    fresh.eval()
    assert all(m.frozen for m in fresh.modules() if isinstance(m, BitLinear))
    x_new = torch.randn(23, 37)
    with torch.no_grad():
        assert torch.equal(fresh(x_new), model(x_new))
    for key, tensor in state.items():
        assert torch.equal(fresh.state_dict()[key], tensor), key


def test_frozen_state_dict_survives_torch_save(tmp_path):
    model = small_mlp(CONFIGS["W1A1"], seed=6)
    freeze_model(model)
    torch.save(model.state_dict(), tmp_path / "frozen.pt")
    fresh = small_mlp(CONFIGS["W1A1"], seed=7)
    fresh.load_state_dict(torch.load(tmp_path / "frozen.pt"))
    x_new = torch.randn(9, 37)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x_new), model(x_new))


@pytest.mark.parametrize("name", ["W1.58A8", "W1A1"])
def test_training_under_bf16_autocast(name):
    x, y = blobs(seed=8)
    model = small_mlp(CONFIGS[name], seed=8)
    before = full_loss(model, x, y)
    result = train_classifier(model, x, y, TrainConfig(epochs=6, batch_size=32, autocast_dtype=torch.bfloat16))
    assert all(math.isfinite(v) for v in result.epoch_losses)
    assert full_loss(model, x, y) < 0.5 * before
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    assert accuracy(model, x, y) > 0.8


def test_autocast_really_computes_in_bf16():
    model = small_mlp(CONFIGS["W1.58A8"], seed=9).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(4, 37))
    assert out.dtype == torch.bfloat16


def test_train_loop_takes_dict_batches_and_is_reproducible():
    x, y = blobs(n=90, seed=10)

    def loss_fn(model, batch):
        return F.cross_entropy(model(batch["inputs"]), batch["labels"])

    runs = []
    for _ in range(2):
        model = small_mlp(CONFIGS["W1A16"], seed=10)
        runs.append(train_loop(model, {"inputs": x, "labels": y}, loss_fn, TrainConfig(epochs=2, batch_size=16, seed=3)))
    assert runs[0].epoch_losses == runs[1].epoch_losses


def test_train_loop_rejects_mismatched_data_and_frozen_models():
    model = small_mlp(CONFIGS["W1A16"])
    with pytest.raises(ValueError, match=r"\[9, 10\]"):
        train_classifier(model, torch.randn(10, 37), torch.zeros(9, dtype=torch.long))
    freeze_model(model)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train_classifier(model, torch.randn(10, 37), torch.zeros(10, dtype=torch.long))


@pytest.mark.parametrize(
    "kwargs, field",
    [({"epochs": 0}, "epochs"), ({"batch_size": 2.5}, "batch_size"), ({"lr": -1.0}, "lr"),
     ({"warmup_fraction": 1.0}, "warmup_fraction"), ({"autocast_dtype": torch.float64}, "autocast_dtype"),
     ({"weight_decay": -0.1}, "weight_decay"), ({"max_grad_norm": 0.0}, "max_grad_norm"),
     ({"latent_lr_scale": -2.0}, "latent_lr_scale")],
)
def test_train_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**kwargs)


def test_learning_rate_warms_up_then_decays_to_zero():
    cfg = TrainConfig(lr=0.01, warmup_fraction=0.1)
    lrs = [lr_at(step, 100, cfg) for step in range(100)]
    assert lrs[0] == pytest.approx(0.001) and lrs[9] == pytest.approx(0.01)
    assert max(lrs) == pytest.approx(0.01)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] < 0.01 * 0.01


def test_predict_restores_the_training_mode():
    model = small_mlp(CONFIGS["W1.58A8"]).train()
    preds = predict(model, torch.randn(5, 37))
    assert preds.shape == (5,) and model.training
    copy.deepcopy(model)  # a trained-mode model with a packed cache still copies


def test_param_groups_split_latent_weights_from_the_rest():
    model = small_mlp(CONFIGS["W1.58A8"])
    groups = param_groups(model, lr=0.01, latent_lr_scale=3.0)
    latent = {id(m.weight) for m in model.modules() if isinstance(m, BitLinear)}
    assert {id(p) for p in groups[0]["params"]} == latent and groups[0]["lr"] == pytest.approx(0.03)
    assert not latent & {id(p) for p in groups[1]["params"]} and groups[1]["lr"] == 0.01
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


@pytest.mark.parametrize("scale", [0.0, 1.0])
def test_latent_lr_scale_scales_only_the_latent_weight_steps(scale):
    x, y = blobs(n=64, seed=11)
    model = small_mlp(CONFIGS["W1A1"], seed=11)
    latent = [m.weight.detach().clone() for m in model.modules() if isinstance(m, BitLinear)]
    norms = [m.weight.detach().clone() for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    train_classifier(model, x, y, TrainConfig(epochs=1, batch_size=16, latent_lr_scale=scale))
    moved = [not torch.equal(a, m.weight) for a, m in zip(latent, [m for m in model.modules() if isinstance(m, BitLinear)])]
    assert moved == [scale > 0] * 3
    assert all(not torch.equal(a, m.weight) for a, m in zip(norms, [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]))

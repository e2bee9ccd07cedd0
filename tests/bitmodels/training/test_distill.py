"""Knowledge distillation: the loss terms against their definitions, hooks on any nn.Module, a real run."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from bitcore.config import BitQuantConfig
from bitlayers.convert import convert_to_bitlinear
from bitmodels.training.distill import (
    DistillConfig,
    Distiller,
    capture_outputs,
    distill,
    hidden_state_loss,
    logits_of,
    soft_target_loss,
)
from bitmodels.training.qat import TrainConfig, predict


def test_soft_target_loss_matches_the_kl_definition():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 7, generator=g, dtype=torch.float64), torch.randn(6, 7, generator=g, dtype=torch.float64)
    T = 3.0
    p_t = torch.softmax(t / T, dim=-1)
    expected = (p_t * (p_t.log() - torch.log_softmax(s / T, dim=-1))).sum(-1).mean() * T**2
    assert soft_target_loss(s, t, T).item() == pytest.approx(expected.item(), rel=1e-5)


def test_soft_target_loss_is_zero_only_for_matching_logits():
    t = torch.randn(2, 5, 11)  # leading dims (batch, sequence) are averaged over
    assert soft_target_loss(t.clone(), t, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert soft_target_loss(t + torch.randn(2, 5, 11), t, 2.0).item() > 1e-3
    with pytest.raises(ValueError, match=r"\(2, 5, 11\).*\(2, 5, 10\)"):
        soft_target_loss(t, t[..., :10], 2.0)


def test_hidden_state_loss_is_the_mean_mse_and_checks_shapes():
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    c, d = torch.randn(2, 9), torch.randn(2, 9)
    expected = (((a - b) ** 2).mean() + ((c - d) ** 2).mean()) / 2
    assert hidden_state_loss([a, c], [b, d]).item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="pair 0"):
        hidden_state_loss([a], [c])


class TupleBlock(nn.Module):
    """Returns (hidden, extra) like a transformers layer."""

    def __init__(self, d):
        super().__init__()
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        h = torch.relu(self.proj(x))
        return h, h.mean()


class TinyEncoder(nn.Module):
    def __init__(self, d=19, classes=4):
        super().__init__()
        self.block = TupleBlock(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h, _ = self.block(x)
        return {"logits": self.head(h)}  # a mapping output, like a ModelOutput


def test_capture_outputs_takes_the_first_tensor_of_tuple_outputs():
    model = TinyEncoder()
    x = torch.randn(3, 19)
    with capture_outputs(model, ["block", "head"]) as captured:
        out = model(x)
    assert torch.equal(captured[0], torch.relu(model.block.proj(x)))
    assert torch.equal(captured[1], out["logits"])
    assert not model.block._forward_hooks  # hooks removed after the block
    with pytest.raises(KeyError, match="blocks"):
        with capture_outputs(model, ["blocks"]):
            pass


def test_logits_of_understands_tensors_objects_and_mappings():
    t = torch.randn(2, 3)

    class Out:
        logits = t

    assert logits_of(t) is t and logits_of(Out()) is t and logits_of({"logits": t}) is t and logits_of((t, 1)) is t


def test_distill_config_validation_names_the_field():
    with pytest.raises(ValueError, match="temperature"):
        DistillConfig(temperature=0)
    with pytest.raises(ValueError, match="alpha"):
        DistillConfig(alpha=1.5)
    with pytest.raises(ValueError, match="hidden_pairs"):
        DistillConfig(hidden_weight=1.0)
    with pytest.raises(KeyError, match="nope"):
        Distiller(TinyEncoder(), TinyEncoder(), DistillConfig(hidden_weight=1.0, hidden_pairs=[("nope", "block")]))


def test_distilling_a_ternary_student_from_its_float_teacher():
    torch.manual_seed(0)
    teacher = TinyEncoder(d=64)
    student = convert_to_bitlinear(
        TinyEncoder(d=64), BitQuantConfig(weight_bits=1.58, activation_dtype="int8", activation_granularity="per_token")
    )
    x = torch.randn(256, 64) * 2
    cfg = DistillConfig(temperature=2.0, hidden_weight=1.0, hidden_pairs=[("block", "block")])
    distiller = Distiller(student, teacher, cfg)

    def teacher_agreement():
        with torch.no_grad():
            target = teacher(x)["logits"].argmax(-1)
        student.eval()
        with torch.no_grad():
            return float((student(x)["logits"].argmax(-1) == target).float().mean())

    before = teacher_agreement()
    distiller(student.train(), (x,))
    first = dict(distiller.last_terms)
    result = distill(student, teacher, (x,), cfg, TrainConfig(epochs=20, batch_size=32, lr=5e-3))
    distiller(student.train(), (x,))
    assert set(first) == {"soft", "hidden"}  # no labels given: no hard term
    assert distiller.last_terms["soft"] < 0.5 * first["soft"]
    assert distiller.last_terms["hidden"] < first["hidden"]
    assert result.epoch_losses[-1] < result.epoch_losses[0]
    # 4 classes: chance is 0.25; a ternary student of a random float teacher gets most of the way
    assert teacher_agreement() > max(before + 0.3, 0.65)
    assert all(not p.requires_grad for p in teacher.parameters())


def test_labels_add_the_hard_cross_entropy_term():
    torch.manual_seed(1)
    teacher, student = nn.Linear(9, 3), nn.Linear(9, 3)
    x, y = torch.randn(16, 9), torch.randint(0, 3, (16,))
    d = Distiller(student, teacher, DistillConfig(alpha=0.25))
    loss = d(student, (x, y))
    soft = soft_target_loss(student(x), teacher(x), 2.0)
    hard = nn.functional.cross_entropy(student(x), y)
    assert loss.item() == pytest.approx((0.25 * soft + 0.75 * hard).item(), rel=1e-5)
    assert predict(student, x).shape == (16,)


def test_distiller_works_on_a_transformers_encoder_with_dict_batches():
    """The MiniLM use: a BERT-style sequence classifier, dict batches, hidden states of a named layer."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=40, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    teacher = transformers.BertForSequenceClassification(config).eval()
    student = convert_to_bitlinear(
        transformers.BertForSequenceClassification(config),
        BitQuantConfig(weight_bits=1.58, activation_dtype="int8", activation_granularity="per_token"),
        skip_modules=["classifier"],
    )
    student.load_state_dict(teacher.state_dict(), strict=False)  # start from the teacher's weights
    g = torch.Generator().manual_seed(1)
    data = {
        "input_ids": torch.randint(0, 97, (48, 13), generator=g),
        "attention_mask": torch.ones(48, 13, dtype=torch.long),
        "labels": torch.randint(0, 3, (48,), generator=g),
    }
    layer = "bert.encoder.layer.1"
    cfg = DistillConfig(temperature=2.0, alpha=0.9, hidden_weight=1.0, hidden_pairs=[(layer, layer)])
    result = distill(student, teacher, data, cfg, TrainConfig(epochs=4, batch_size=16, lr=2e-3))
    assert all(torch.isfinite(torch.tensor(result.epoch_losses)))
    assert result.epoch_losses[-1] < result.epoch_losses[0]

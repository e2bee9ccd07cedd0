"""Knowledge distillation: train a low-bit student from a floating-point teacher's outputs.

The loss mixes three terms (Hinton et al. 2015 for the first two; hidden-state
matching as in TinyBERT / MiniLM-style distillation for the third)::

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))
         + (1 - alpha) * cross_entropy(student, labels)          # only when labels are given
         + hidden_weight * mean_i MSE(student_hidden_i, teacher_hidden_i)

``T^2`` keeps the soft-target gradients at the same scale for any temperature.
Hidden states are captured with forward hooks on named submodules, so the
helper works on any ``nn.Module`` (an MLP, or a Hugging Face encoder such as
MiniLM, whose ``ModelOutput`` logits are found through ``.logits``).

Example::

    distiller = Distiller(student, teacher, DistillConfig(temperature=4.0, hidden_pairs=[("layers.5", "layers.5")]))
    train_loop(student, (x, y), distiller, TrainConfig(epochs=20))
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from bitmodels.training.qat import Batch, TrainConfig, TrainResult, train_loop


@dataclass(frozen=True)
class DistillConfig:
    """Weights of the distillation loss terms; see the module docstring."""

    temperature: float = 2.0
    alpha: float = 0.5
    hidden_weight: float = 0.0
    hidden_pairs: Tuple[Tuple[str, str], ...] = ()  # (student module name, teacher module name)

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ValueError(f"DistillConfig.temperature: got {self.temperature!r}; expected a positive number")
        if not (isinstance(self.alpha, (int, float)) and 0.0 <= self.alpha <= 1.0):
            raise ValueError(f"DistillConfig.alpha: got {self.alpha!r}; expected a number in [0, 1]")
        if not (isinstance(self.hidden_weight, (int, float)) and self.hidden_weight >= 0):
            raise ValueError(f"DistillConfig.hidden_weight: got {self.hidden_weight!r}; expected a number >= 0")
        pairs = tuple(tuple(p) for p in self.hidden_pairs)
        if any(len(p) != 2 or not all(isinstance(n, str) for n in p) for p in pairs):
            raise ValueError(
                f"DistillConfig.hidden_pairs: got {self.hidden_pairs!r}; expected (student_module, teacher_module) name pairs"
            )
        if self.hidden_weight > 0 and not pairs:
            raise ValueError("DistillConfig.hidden_weight > 0 needs hidden_pairs naming the modules to match")
        object.__setattr__(self, "hidden_pairs", pairs)


def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))``, averaged over all leading dimensions."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ in shape"
        )
    classes = student_logits.shape[-1]
    log_p_student = F.log_softmax(student_logits.float().reshape(-1, classes) / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float().reshape(-1, classes) / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


def hidden_state_loss(student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over pairs of the MSE between student and teacher hidden states (shapes must match)."""
    if len(student_hidden) != len(teacher_hidden) or not student_hidden:
        raise ValueError(f"need matching non-empty hidden-state lists, got {len(student_hidden)} and {len(teacher_hidden)}")
    losses = []
    for i, (s, t) in enumerate(zip(student_hidden, teacher_hidden)):
        if s.shape != t.shape:
            raise ValueError(f"hidden pair {i}: student shape {tuple(s.shape)} != teacher shape {tuple(t.shape)}")
        losses.append(F.mse_loss(s.float(), t.float()))
    return torch.stack(losses).mean()


def _first_tensor(output: Any) -> torch.Tensor:
    """The tensor a module "returns": itself, ``.last_hidden_state``/``[0]`` of tuples and ModelOutputs."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find a tensor in a module output of type {type(output).__name__}")


def logits_of(output: Any) -> torch.Tensor:
    """Logits from a model output: a tensor, an object with ``.logits`` (transformers), or a tuple's first item."""
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    return _first_tensor(output)


@contextlib.contextmanager
def capture_outputs(model: nn.Module, names: Sequence[str]) -> Iterator[List[Optional[torch.Tensor]]]:
    """Within the block, ``captured[i]`` holds the latest output of submodule ``names[i]``."""
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        sample = [n for n in modules if n][:8]
        raise KeyError(f"{type(model).__name__} has no submodule(s) {missing}; some names it has: {sample}")
    captured: List[Optional[torch.Tensor]] = [None] * len(names)

    def hook_for(i: int) -> Callable:
        def hook(_module, _inputs, output):
            captured[i] = _first_tensor(output)

        return hook

    handles = [modules[n].register_forward_hook(hook_for(i)) for i, n in enumerate(names)]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def split_batch(batch: Batch) -> Tuple[tuple, dict, Optional[torch.Tensor]]:
    """(positional inputs, keyword inputs, labels): ``(x, y)`` tuples or dicts with an optional ``labels`` key."""
    if isinstance(batch, Mapping):
        kwargs = {k: v for k, v in batch.items() if k != "labels"}
        return (), kwargs, batch.get("labels")
    if len(batch) == 1:
        return (batch[0],), {}, None
    return tuple(batch[:-1]), {}, batch[-1]


class Distiller:
    """A ``loss_fn`` for :func:`train_loop` that distills ``teacher`` into the model being trained.

    The teacher runs in eval mode without gradients; the student is whatever
    model ``train_loop`` passes in (normally the ``student`` given here).
    ``last_terms`` holds the float value of each loss term of the latest batch.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, config: DistillConfig = DistillConfig()) -> None:
        self.student = student
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.config = config
        self.last_terms: Dict[str, float] = {}
        # Fail now, not mid-training, when a hidden-state name is wrong.
        for model, names in ((student, [p[0] for p in config.hidden_pairs]), (teacher, [p[1] for p in config.hidden_pairs])):
            with capture_outputs(model, names):
                pass

    def __call__(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        cfg = self.config
        args, kwargs, labels = split_batch(batch)
        student_names = [p[0] for p in cfg.hidden_pairs]
        teacher_names = [p[1] for p in cfg.hidden_pairs]
        with torch.no_grad(), capture_outputs(self.teacher, teacher_names) as teacher_hidden:
            teacher_logits = logits_of(self.teacher(*args, **kwargs))
        with capture_outputs(model, student_names) as student_hidden:
            student_logits = logits_of(model(*args, **kwargs))
        terms = {"soft": soft_target_loss(student_logits, teacher_logits, cfg.temperature)}
        loss = cfg.alpha * terms["soft"] if labels is not None else terms["soft"]
        if labels is not None and cfg.alpha < 1.0:
            classes = student_logits.shape[-1]
            terms["hard"] = F.cross_entropy(student_logits.float().reshape(-1, classes), labels.reshape(-1))
            loss = loss + (1.0 - cfg.alpha) * terms["hard"]
        if cfg.hidden_weight > 0:
            terms["hidden"] = hidden_state_loss(list(student_hidden), list(teacher_hidden))
            loss = loss + cfg.hidden_weight * terms["hidden"]
        self.last_terms = {k: float(v.detach()) for k, v in terms.items()}
        return loss


def distill(
    student: nn.Module,
    teacher: nn.Module,
    data: Batch,
    config: DistillConfig = DistillConfig(),
    train_config: TrainConfig = TrainConfig(),
) -> TrainResult:
    """Train ``student`` in place to match ``teacher`` on ``data`` (``(x,)``, ``(x, labels)`` or a dict)."""
    return train_loop(student, data, Distiller(student, teacher, config), train_config)

"""convert_to_bitlinear: swap a model's nn.Linear layers for BitLinear, keeping their weights.

Example::

    model = convert_to_bitlinear(model, BitQuantConfig(weight_bits=1.58), skip_modules=["lm_head"])
    print(model.bitlab_report)
"""
from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Tuple, Union

import torch
from torch import nn

from bitcore.config import BitQuantConfig
from bitlayers.bitlinear import BitLinear, _as_config

log = logging.getLogger("bitlab.convert")


@dataclass
class ConversionReport:
    """What ``convert_to_bitlinear`` changed."""

    converted: List[str] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    params_converted: int = 0
    bytes_before: int = 0

    def __str__(self) -> str:
        lines = [
            f"converted {len(self.converted)} Linear layer(s) ({self.params_converted:,} weights), "
            f"skipped {len(self.skipped)}"
        ]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


def _matches(name: str, patterns: Iterable[str]) -> Optional[str]:
    for pattern in patterns:
        if name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern):
            return pattern
    return None


def convert_to_bitlinear(
    model: nn.Module,
    quant_config: Union[BitQuantConfig, dict, None] = None,
    skip_modules: Iterable[str] = (),
    *,
    backend: Optional[str] = None,
    progress: bool = False,
) -> nn.Module:
    """Replace every ``nn.Linear`` in ``model`` (in place) with a ``BitLinear`` holding the same weights.

    ``skip_modules`` holds module names, name suffixes (``"lm_head"``) or glob
    patterns (``"*.attention.*"``).  The model keeps its train/eval mode; the
    report of what changed is returned on ``model.bitlab_report``.
    """
    cfg = _as_config(quant_config)
    skip = list(skip_modules)
    report = ConversionReport()
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and name]
    if isinstance(model, nn.Linear):
        raise TypeError("convert_to_bitlinear converts the Linear layers inside a model; wrap a bare nn.Linear first")
    iterator = targets
    if progress:
        try:
            from tqdm.auto import tqdm

            iterator = tqdm(targets, desc="converting Linear layers", unit="layer")
        except ImportError:  # tqdm is optional
            pass
    for name, linear in iterator:
        pattern = _matches(name, skip)
        if pattern is not None:
            report.skipped.append((name, f"matches skip pattern {pattern!r}"))
            continue
        replacement = _from_linear(linear, cfg, backend)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, replacement)
        report.converted.append(name)
        report.params_converted += linear.weight.numel()
        report.bytes_before += linear.weight.numel() * linear.weight.element_size()
    if not targets:
        log.warning("convert_to_bitlinear: %s has no nn.Linear layers; nothing converted", type(model).__name__)
    model.bitlab_report = report
    log.info("%s", report)
    return model


def _from_linear(linear: nn.Linear, cfg: BitQuantConfig, backend: Optional[str]) -> BitLinear:
    w = linear.weight
    layer = BitLinear(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        quant_config=cfg,
        backend=backend,
        device=w.device,
        dtype=w.dtype,
    )
    with torch.no_grad():
        layer.weight.copy_(w)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias)
    layer.train(linear.training)
    return layer

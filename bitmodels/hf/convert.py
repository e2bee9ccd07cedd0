"""Converting transformers models to BitLab: ``AutoBitModel.from_pretrained``.

``from_pretrained`` takes a loaded transformers model or a local directory:

* one of our saved checkpoints (``bitlab_config.json``): loaded as saved, frozen;
* a transformers BitNet checkpoint (``quant_method == "bitnet"``): read as is;
* any other transformers checkpoint: loaded offline, then every ``nn.Linear``
  (except the skipped ones) becomes a ``BitLinear`` holding the same weights.

Conversion prints a progress bar and a summary: what was converted, what was
skipped and why, and the weight memory before (float) and after (true packed
bytes, :meth:`BitLinear.weight_memory_bytes`).

Example::

    model = AutoBitModel.from_pretrained("path/to/bert", quant_config=BitQuantConfig(weight_bits=8),
                                         modules_to_not_convert=["pooler.dense"])
    print(model.bitlab_report)
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, List, Optional, Tuple, Union

from torch import nn

from bitcore.config import BitQuantConfig
from bitcore.errors import ConfigError
from bitlayers.bitlinear import BitLinear, _as_config
from bitlayers.convert import convert_to_bitlinear

log = logging.getLogger("bitlab.hf")


@dataclass
class HFConversionReport:
    """What :func:`convert_model` changed, and the memory it saved."""

    model: str
    quant_config: BitQuantConfig
    converted: List[str] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    linear_bytes_before: int = 0  # float weights of the converted layers
    linear_bytes_after: int = 0  # their packed weights + scales
    model_bytes_before: int = 0  # every parameter and buffer
    model_bytes_after: int = 0  # the same once the converted layers are frozen (packed only)

    def __str__(self) -> str:
        mib = 1024 * 1024
        ratio = self.linear_bytes_before / self.linear_bytes_after if self.linear_bytes_after else float("nan")
        lines = [
            f"{self.model}: converted {len(self.converted)} Linear layer(s) to BitLinear "
            f"[{self.quant_config.describe()}], skipped {len(self.skipped)}",
            f"  converted weights: {self.linear_bytes_before / mib:.2f} MiB -> "
            f"{self.linear_bytes_after / mib:.2f} MiB packed ({ratio:.1f}x smaller)",
            f"  whole model:       {self.model_bytes_before / mib:.2f} MiB -> {self.model_bytes_after / mib:.2f} MiB",
        ]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


def module_bytes(model: nn.Module) -> int:
    """Bytes of every distinct parameter and buffer (tied tensors count once)."""
    seen = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def deployed_bytes(model: nn.Module) -> int:
    """Bytes the model holds once every BitLinear keeps only its packed weight (as after ``freeze()``)."""
    total = module_bytes(model)
    for m in model.modules():
        if isinstance(m, BitLinear) and m.weight is not None:
            w = m.weight
            total -= w.numel() * w.element_size()
            if m.qweight is None:
                total += m.weight_memory_bytes()
    return total


def _default_skips(model: nn.Module) -> List[str]:
    """Like transformers' quantizers: keep the output embedding (lm_head) in float."""
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    if not isinstance(out, nn.Linear):
        return []
    return [name for name, m in model.named_modules() if m is out]


def _no_linear_message(model: nn.Module) -> str:
    kinds = sorted({type(m).__name__ for m in model.modules() if type(m).__name__ == "Conv1D"})
    hint = (
        " It uses transformers' Conv1D projections (GPT-2 style, weight stored [in, out]), which BitLab does not convert."
        if kinds else ""
    )
    return f"{type(model).__name__} has no nn.Linear layers: nothing was converted to BitLinear.{hint}"


def convert_model(
    model: nn.Module,
    quant_config: Union[BitQuantConfig, dict, None] = None,
    modules_to_not_convert: Optional[Iterable[str]] = None,
    *,
    backend: Optional[str] = None,
    progress: bool = True,
    verbose: bool = True,
    freeze: bool = False,
) -> nn.Module:
    """Swap ``model``'s ``nn.Linear`` layers for ``BitLinear`` in place and attach ``model.bitlab_report``.

    ``modules_to_not_convert``: names, suffixes or glob patterns (as in
    :func:`bitlayers.convert_to_bitlinear`); ``None`` keeps the output
    embedding (``lm_head``) in float like transformers' quantizers, ``[]``
    converts every Linear.  ``freeze=True`` drops the float latent weights
    (inference only); otherwise they stay for quantization-aware training.

    Example::

        model = convert_model(bert, BitQuantConfig(weight_bits=8, activation_granularity="per_token"))
    """
    cfg = _as_config(quant_config)
    if isinstance(modules_to_not_convert, str):
        raise ConfigError(
            f"modules_to_not_convert: got the string {modules_to_not_convert!r}; expected a list of names"
        )
    skip = _default_skips(model) if modules_to_not_convert is None else list(modules_to_not_convert)
    before = module_bytes(model)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, BitLinear)}
    report = HFConversionReport(model=type(model).__name__, quant_config=cfg, model_bytes_before=before)
    if not linears:
        message = _no_linear_message(model)
        warnings.warn(message, UserWarning, stacklevel=2)
        report.model_bytes_after = before
        model.bitlab_report = report
        if verbose:
            print(message)
        return model
    convert_to_bitlinear(model, cfg, skip, backend=backend, progress=progress)
    inner = model.bitlab_report
    report.converted, report.skipped = list(inner.converted), list(inner.skipped)
    report.linear_bytes_before = inner.bytes_before
    for name in report.converted:
        layer = model.get_submodule(name)
        if freeze:
            layer.freeze()
        report.linear_bytes_after += layer.weight_memory_bytes()
    report.model_bytes_after = deployed_bytes(model)
    model.bitlab_report = report
    model.bitlab_quant_config = cfg
    log.info("%s", report)
    if verbose:
        print(report)
    return model


def from_pretrained(
    model_or_path: Union[nn.Module, str, Path],
    quant_config: Union[BitQuantConfig, dict, None] = None,
    modules_to_not_convert: Optional[Iterable[str]] = None,
    *,
    backend: Optional[str] = None,
    progress: bool = True,
    verbose: bool = True,
    freeze: bool = False,
    dtype=None,
) -> nn.Module:
    """``AutoBitModel.from_pretrained``: see the module docstring.  Offline only: paths are local.

    Example::

        model = from_pretrained(AutoModel.from_pretrained(path), quant_config={"weight_bits": 1.58})
    """
    if isinstance(model_or_path, nn.Module):
        return convert_model(
            model_or_path, quant_config, modules_to_not_convert,
            backend=backend, progress=progress, verbose=verbose, freeze=freeze,
        )
    if not isinstance(model_or_path, (str, Path)):
        raise TypeError(
            f"model_or_path: got {type(model_or_path).__name__}; expected an nn.Module or a local directory"
        )
    from bitmodels.hf.bitnet_format import is_bitnet_checkpoint, load_bitnet_checkpoint
    from bitmodels.hf.checkpoint import is_bitlab_checkpoint, load_pretrained

    path = Path(model_or_path)
    if is_bitlab_checkpoint(path) or is_bitnet_checkpoint(path):
        if quant_config is not None or modules_to_not_convert is not None:
            raise ConfigError(
                f"{path} is already quantized; got quant_config={quant_config!r}, "
                f"modules_to_not_convert={modules_to_not_convert!r}, expected neither"
            )
        if is_bitlab_checkpoint(path):
            model = load_pretrained(path, backend=backend)
        else:
            model = load_bitnet_checkpoint(path, backend=backend, dtype=dtype)
        if verbose:
            n = sum(isinstance(m, BitLinear) for m in model.modules())
            print(f"loaded {type(model).__name__} from {path}: {n} frozen BitLinear layer(s), "
                  f"{deployed_bytes(model) / 2**20:.2f} MiB")
        return model
    model = load_transformers_model(path, dtype=dtype)
    return convert_model(
        model, quant_config, modules_to_not_convert,
        backend=backend, progress=progress, verbose=verbose, freeze=freeze,
    )


def load_transformers_model(path: Union[str, Path], dtype=None) -> nn.Module:
    """Load a transformers checkpoint from a local directory, offline, as the class its config names."""
    import transformers

    from bitmodels.hf.build import model_class_for

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"{path}: expected a local transformers checkpoint directory with a config.json "
            "(BitLab loads offline; download the model first)"
        )
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    cls = model_class_for(config)
    kwargs = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    return cls.from_pretrained(path, **kwargs).eval()

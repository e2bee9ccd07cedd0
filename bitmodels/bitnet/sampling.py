"""Next-token choice: greedy, or sampling with temperature, top-k and top-p.

Everything runs on the device without a host sync, so it can sit inside the
CUDA graph of a decode step.  Sampling draws ``argmax(p / e)`` with ``e`` i.i.d.
Exponential(1), which picks index ``i`` with probability ``p_i`` (the
exponential-race form of categorical sampling, no ``multinomial`` sync).

Example::

    next_ids = sample(logits, SamplingConfig(temperature=0.8, top_k=50, top_p=0.95))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Tuple

import torch

from bitcore.errors import ConfigError
from bitmodels.bitnet.ops import cuda_ext_or_torch


@dataclass(frozen=True)
class SamplingConfig:
    """``temperature == 0`` is greedy; ``top_k == 0`` and ``top_p == 1`` switch those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not float(self.temperature) >= 0:
            raise ConfigError(f"temperature: got {self.temperature!r}; expected a number >= 0 (0 = greedy)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"top_k: got {self.top_k!r}; expected an integer >= 0 (0 = off)")
        if not 0.0 < float(self.top_p) <= 1.0:
            raise ConfigError(f"top_p: got {self.top_p!r}; expected a number in (0, 1] (1 = off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """float32 logits ``[B, V]`` with everything outside the top-k / nucleus set to -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass (the first always stays)
        drop = (torch.cumsum(probs, dim=-1) - probs) > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return logits


ARGMAX_CHUNK = 1024


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """``torch.argmax(x, dim=-1)`` for ``x [B, V]`` (the first maximal index), in two passes over chunks.

    Why: on a GPU, torch's argmax of a few long rows reduces each row in one block; over a 128256-token
    vocabulary that took 39 us per decode step on the H100 (2.6 % of BitNet 2B's batch-1 step).  Here
    the row is cut into chunks of ``ARGMAX_CHUNK`` (padded with -inf), each chunk's maximum and its first
    index are found in parallel, then the first chunk holding the row's maximum wins: the same index.
    Where cuda_ext runs, :func:`use_argmax_kernel` gives one kernel instead.
    """
    B, V = x.shape
    if V <= 4 * ARGMAX_CHUNK:
        return torch.argmax(x, dim=-1)
    chunks = -(-V // ARGMAX_CHUNK)
    padded = torch.nn.functional.pad(x, (0, chunks * ARGMAX_CHUNK - V), value=float("-inf"))
    values, index = padded.view(B, chunks, ARGMAX_CHUNK).max(dim=-1)
    best = torch.argmax(values, dim=-1, keepdim=True)
    return (best * ARGMAX_CHUNK + index.gather(-1, best)).squeeze(-1)


def use_argmax_kernel(device) -> Tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """The argmax over rows for ``device``: cuda_ext's one kernel (``backends/cuda_ext/csrc/argmax.cu``, the same
    index as torch.argmax, NaN and ties included) where it runs, else :func:`argmax_rows`
    (``BITLAB_ARGMAX=torch`` keeps it, for A/B timing); and what runs it, with the reason."""
    def load():
        from backends.cuda_ext.argmax import argmax_rows as argmax_kernel

        return argmax_kernel

    name = "torch.argmax" if torch.device(device).type != "cuda" else "torch, chunked"
    return cuda_ext_or_torch(device, "BITLAB_ARGMAX", argmax_rows, name, load, "cuda_ext.argmax_rows, one kernel")


def sample(logits: torch.Tensor, config: SamplingConfig,
           argmax: Callable[[torch.Tensor], torch.Tensor] = argmax_rows) -> torch.Tensor:
    """Token ids ``[B]`` (int64) from logits ``[B, V]``; ``argmax`` picks the greedy token and the race's
    winner (:func:`use_argmax_kernel` gives the device's fastest)."""
    if config.greedy:
        return argmax(logits)
    scaled = filter_logits(logits.float() / config.temperature, config.top_k, config.top_p)
    probs = torch.softmax(scaled, dim=-1)
    race = torch.empty_like(probs).exponential_()
    return argmax(probs / race)

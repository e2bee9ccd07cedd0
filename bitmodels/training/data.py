"""scikit-learn's bundled digits data as tensors: a fixed stratified split, standardized.

The digits set (1,797 8x8 grey images, 10 classes) ships inside scikit-learn,
so training runs offline.  The split is stratified and seeded, so every run
(and every machine) sees the same train and test samples; features are
standardized with the *training* mean and standard deviation only.

Example::

    split = load_digits_split()
    split.x_train.shape, split.x_test.shape  # (1347, 64), (450, 64)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_TEST_FRACTION = 0.25
DEFAULT_SPLIT_SEED = 0


@dataclass(frozen=True)
class DigitsSplit:
    """Standardized float features ``[n, 64]`` and int64 labels ``[n]`` for train and test."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    mean: torch.Tensor  # per-feature training mean, to standardize new samples
    std: torch.Tensor  # per-feature training std (1.0 where a pixel is constant)

    @property
    def n_features(self) -> int:
        return self.x_train.shape[1]

    @property
    def n_classes(self) -> int:
        return int(torch.cat([self.y_train, self.y_test]).max()) + 1

    def standardize(self, raw: torch.Tensor) -> torch.Tensor:
        """Apply the training standardization to raw pixel values ``[n, 64]`` (0..16)."""
        return (raw.to(self.mean.dtype) - self.mean) / self.std


def load_digits_split(
    test_fraction: float = DEFAULT_TEST_FRACTION,
    seed: int = DEFAULT_SPLIT_SEED,
    dtype: torch.dtype = torch.float32,
) -> DigitsSplit:
    """Load digits, split stratified by class with ``seed``, standardize with training statistics."""
    if not isinstance(test_fraction, float) or not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction: got {test_fraction!r}; expected a float in (0, 1)")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype: got {dtype}; expected a floating-point dtype")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    features, labels = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        features, labels, test_size=test_fraction, stratify=labels, random_state=seed
    )
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    # Border pixels are 0 in every training image; dividing by 1 keeps them 0 instead of NaN.
    std = np.where(std < 1e-6, 1.0, std)

    def as_features(a: np.ndarray) -> torch.Tensor:
        return torch.tensor((a - mean) / std, dtype=dtype)

    return DigitsSplit(
        x_train=as_features(x_train),
        y_train=torch.tensor(y_train, dtype=torch.int64),
        x_test=as_features(x_test),
        y_test=torch.tensor(y_test, dtype=torch.int64),
        mean=torch.tensor(mean, dtype=dtype),
        std=torch.tensor(std, dtype=dtype),
    )

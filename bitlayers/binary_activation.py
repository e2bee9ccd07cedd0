"""BinaryActivation: sign(x) in {-1, +1} with the hardtanh straight-through gradient (BNNs)."""
import torch
from torch import nn

from bitcore.quantize import binarize


class BinaryActivation(nn.Module):
    """``y = +1 if x >= 0 else -1``; backward passes ``grad * 1{|x| <= 1}``.

    Example::

        act = BinaryActivation()
        act(torch.tensor([-0.3, 0.0, 2.0]))  # tensor([-1., 1., 1.])
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.dtype.is_floating_point:
            raise TypeError(f"BinaryActivation expects a floating-point input, got {x.dtype}")
        return binarize(x)

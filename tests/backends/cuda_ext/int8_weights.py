"""Helpers of the cuda_ext int8-path kernel tests: a fresh seeded generator and a prepared random weight."""
import os
from dataclasses import replace

import torch

from backends.cuda_ext.kernels import CudaExtInt8Kernel
from bitcore.config import BitQuantConfig
from bitcore.packing import pack_weight
from bitcore.quantize import quantize_weight


def fresh_generator():
    """``(generator, seed)`` seeded from the OS: each run draws new inputs; failures print the seed."""
    seed = int.from_bytes(os.urandom(4), "little")
    return torch.Generator().manual_seed(seed), seed


def prepared_weight(out_f, in_f, gen, bits=1.58):
    """Random weights of ``bits`` quantized per row and prepared by the cuda_ext int8 kernel, on the GPU."""
    cfg = BitQuantConfig(weight_bits=bits, activation_dtype="int8", activation_granularity="per_token",
                         weight_granularity="per_channel")
    values, scale = quantize_weight(torch.randn(out_f, in_f, generator=gen), cfg)
    packed = pack_weight(values, scale, bits, "per_channel")
    packed = replace(packed, data=packed.data.cuda(), scale=packed.scale.cuda())
    return CudaExtInt8Kernel().prepare(packed, cfg)

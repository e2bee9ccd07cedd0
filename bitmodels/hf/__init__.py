"""Hugging Face transformers integration: convert models, save/load packed checkpoints, read BitNet checkpoints.

transformers is imported lazily by the functions that need it.

Example::

    from bitmodels.hf import from_pretrained, save_pretrained, load_pretrained
"""
from bitmodels.hf.bitnet_format import BITNET_QUANT_CONFIG, bitnet_linear_to_packed, load_bitnet_checkpoint
from bitmodels.hf.checkpoint import load_pretrained, save_pretrained
from bitmodels.hf.convert import HFConversionReport, convert_model, from_pretrained

__all__ = [
    "BITNET_QUANT_CONFIG",
    "HFConversionReport",
    "bitnet_linear_to_packed",
    "convert_model",
    "from_pretrained",
    "load_bitnet_checkpoint",
    "load_pretrained",
    "save_pretrained",
]

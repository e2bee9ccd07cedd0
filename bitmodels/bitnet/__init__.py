"""BitNet b1.58: the decoder (transformers' BitNetForCausalLM architecture on BitLinear) and its generation engine."""
from bitmodels.bitnet.config import BitNetConfig
from bitmodels.bitnet.model import BitNetForCausalLM

__all__ = ["BitNetConfig", "BitNetForCausalLM"]

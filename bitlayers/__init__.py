"""bitlayers: nn.Modules built on bitcore (BitLinear, BinaryActivation, convert_to_bitlinear)."""
from bitlayers.binary_activation import BinaryActivation
from bitlayers.bitlinear import BitLinear
from bitlayers.convert import ConversionReport, convert_to_bitlinear

__all__ = ["BitLinear", "BinaryActivation", "convert_to_bitlinear", "ConversionReport"]

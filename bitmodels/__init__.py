"""bitmodels: AutoBitModel, model configs and models built from BitLinear layers."""
from bitmodels.auto import AutoBitModel
from bitmodels.configs import load_model_config, register_model, registered_model_types
from bitmodels.mlp import BitMLP, BitMLPConfig
import bitmodels.bitnet  # noqa: E402,F401  (registers model_type "bitnet")

__all__ = ["AutoBitModel", "BitMLP", "BitMLPConfig", "load_model_config", "register_model", "registered_model_types"]

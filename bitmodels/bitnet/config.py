"""BitNetConfig: the shape of a BitNet b1.58 decoder (transformers' ``BitNetForCausalLM``).

The defaults are the published 2B4T shape.  ``from_hf_config`` reads a
transformers ``config.json`` (dict) of ``model_type == "bitnet"``.

Example::

    cfg = BitNetConfig(vocab_size=1000, hidden_size=128, intermediate_size=384,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model = AutoBitModel.from_config(cfg)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Mapping, Optional, Union

from bitcore.config import BitQuantConfig
from bitcore.errors import ConfigError
from bitmodels.configs import ModelConfigMixin
from bitmodels.hf.bitnet_format import BITNET_QUANT_CONFIG  # ternary per-tensor weights, int8 per-token activations


@dataclass
class BitNetConfig(ModelConfigMixin):
    """Shape and quantization of a BitNet b1.58 decoder; field names follow transformers' BitNetConfig."""

    model_type = "bitnet"

    vocab_size: int = 128256
    hidden_size: int = 2560
    intermediate_size: int = 6912
    num_hidden_layers: int = 30
    num_attention_heads: int = 20
    num_key_value_heads: int = 5
    head_dim: Optional[int] = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    hidden_act: str = "relu2"
    bos_token_id: Optional[int] = 128000
    eos_token_id: Union[int, List[int], None] = 128001
    pad_token_id: Optional[int] = None
    quant_config: BitQuantConfig = field(default_factory=lambda: BITNET_QUANT_CONFIG)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}: got {value!r}; expected a positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_key_value_heads: got {self.num_key_value_heads}; it must divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size: got {self.hidden_size}; without head_dim it must be a multiple of "
                    f"num_attention_heads={self.num_attention_heads}"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim % 2:
            raise ConfigError(f"head_dim: got {self.head_dim}; rotary embeddings need an even head_dim")
        if self.hidden_act != "relu2":
            raise ConfigError(f"hidden_act: got {self.hidden_act!r}; BitNet b1.58 uses 'relu2' (squared ReLU)")
        if isinstance(self.quant_config, Mapping):
            self.quant_config = BitQuantConfig.from_dict(self.quant_config)
        if not float(self.rms_norm_eps) > 0:
            raise ConfigError(f"rms_norm_eps: got {self.rms_norm_eps!r}; expected a positive number")

    @property
    def attention_dim(self) -> int:
        """Width of the attention output (num_attention_heads * head_dim) that attn_sub_norm normalizes."""
        return self.num_attention_heads * self.head_dim

    @property
    def stop_token_ids(self) -> List[int]:
        eos = self.eos_token_id
        if eos is None:
            return []
        return [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> "BitNetConfig":
        """Build from a transformers ``config.json`` dict of a BitNet model."""
        if hf.get("model_type") not in (None, "bitnet"):
            raise ConfigError(f"model_type: got {hf.get('model_type')!r}; expected 'bitnet'")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"rope_type: got {rope_type!r}; only 'default' rotary embeddings are supported")
        theta = rope.get("rope_theta", hf.get("rope_theta", 500000.0))
        n_heads = hf["num_attention_heads"]
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=n_heads,
            num_key_value_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=hf.get("head_dim"),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
            rope_theta=float(theta),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", False)),
            hidden_act=hf.get("hidden_act", "relu2"),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
        )

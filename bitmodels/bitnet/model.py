"""BitNet b1.58 decoder built from BitLinear layers (the architecture of transformers' BitNetForCausalLM).

Per layer::

    x = input_layernorm(h)
    a = attn_sub_norm(attention(rotary(q_proj(x)), rotary(k_proj(x)), v_proj(x)))    # GQA
    h = h + o_proj(a)
    x = post_attention_layernorm(h)
    h = h + down_proj(ffn_sub_norm(relu(gate_proj(x))**2 * up_proj(x)))

then ``norm`` and a dense ``lm_head`` (tied to ``embed_tokens`` when the config says so).  The seven
projections are BitLinear (W1.58A8: ternary weights, int8 per-token activations); module and
parameter names are transformers', so checkpoints map one to one.

``prepare_for_inference(device)`` resolves each projection's kernel through the registry once,
fuses q/k/v and gate/up into single matrices when a kernel serves them (per-channel scales hold
each part's scale, so the math is unchanged), and can move the canonical packed copies off the GPU
so that only the kernels' prepared weights stay there.

Example::

    model = AutoBitModel.from_config(BitNetConfig(vocab_size=1000, hidden_size=128, intermediate_size=384,
                                                  num_hidden_layers=2, num_attention_heads=4,
                                                  num_key_value_heads=2)).eval()
    logits = model(torch.randint(0, 1000, (1, 12)))      # [1, 12, 1000]
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from bitcore.errors import ConfigError
from bitlayers.bitlinear import BitLinear
from bitmodels.bitnet.bindings import (
    LM_HEAD_ACTIVATIONS,
    LM_HEAD_BITS,
    PreparedLinear,
    QuantizedActivation,
    bind_fused_mlp,
    bind_group,
    bind_norm_linears,
    bind_norm_tail,
    bind_qkv_attention,
    describe_norm_linears,
    bind_quantized_dense,
    device_bytes,
)
from bitmodels.bitnet.config import BitNetConfig
from bitmodels.bitnet.ops import (CompiledOps, CpuNormOps, Ops, apply_head, compiled_ops, rms_norm, rotary_table,
                                  use_cpu_norm, use_fused_norm_quant)
from bitmodels.configs import register_model
from bitmodels.hf.build import empty_frozen_bitlinear

# Tokens up to which the norms quantize for the projections: the cuda_ext GEMV range (16 tokens, 64 with the
# wide cluster GEMV on sm_90); prefill GEMMs quantize inside their own op (norm-side quantization made a
# 512-token prefill 2x slower).  Per model: ``model.quantize_in_norms_max_tokens``.
QUANTIZE_IN_NORMS_MAX_TOKENS = 64
# Tokens up to which the one-kernel MLP runs when enabled (H100, 2B shape, norm + MLP per layer: 1 token
# 17.7 vs 18.3 us, 2 tokens 19.1 vs 20.0, 4 tokens 22.4 vs 20.3 for the separate kernels).
FUSED_MLP_MAX_TOKENS = 2
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED_GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}


def qkv_attention_wanted(default: bool) -> bool:
    """Whether layers with the q/k/v projection bound inside the attention kernel use it: ``BITLAB_QKV_ATTENTION=on``
    / ``off`` decides, else ``default`` (what prepare_for_inference was asked; read at each forward, so a CUDA
    graph keeps what its capture read)."""
    env = os.environ.get("BITLAB_QKV_ATTENTION", "")
    return True if env == "on" else False if env == "off" else default


def norm_tail_enabled() -> bool:
    """False where ``BITLAB_NORM_TAIL=off``: layers then run the o projection and the post-attention norm as two
    kernels even where one is bound (read at each forward, so a CUDA graph keeps what its capture read)."""
    return os.environ.get("BITLAB_NORM_TAIL", "") != "off"


def make_bitlinear(in_features: int, out_features: int, bias: bool, config: BitNetConfig, packed_only: bool) -> BitLinear:
    """A trainable BitLinear, or with ``packed_only`` a frozen one with empty packed buffers (to be loaded)."""
    if packed_only:
        return empty_frozen_bitlinear(in_features, out_features, bias, config.quant_config)
    return BitLinear(in_features, out_features, bias=bias, quant_config=config.quant_config)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class BitNetAttention(nn.Module):
    def __init__(self, config: BitNetConfig, packed_only: bool = False) -> None:
        super().__init__()
        c = config
        self.n_heads, self.n_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q_dim, kv_dim = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        self.q_proj = make_bitlinear(c.hidden_size, q_dim, c.attention_bias, c, packed_only)
        self.k_proj = make_bitlinear(c.hidden_size, kv_dim, c.attention_bias, c, packed_only)
        self.v_proj = make_bitlinear(c.hidden_size, kv_dim, c.attention_bias, c, packed_only)
        self.o_proj = make_bitlinear(q_dim, c.hidden_size, c.attention_bias, c, packed_only)
        self.attn_sub_norm = RMSNorm(q_dim, c.rms_norm_eps)
        self.split = (q_dim, kv_dim, kv_dim)


class BitNetMLP(nn.Module):
    def __init__(self, config: BitNetConfig, packed_only: bool = False) -> None:
        super().__init__()
        c = config
        self.gate_proj = make_bitlinear(c.hidden_size, c.intermediate_size, False, c, packed_only)
        self.up_proj = make_bitlinear(c.hidden_size, c.intermediate_size, False, c, packed_only)
        self.down_proj = make_bitlinear(c.intermediate_size, c.hidden_size, False, c, packed_only)
        self.ffn_sub_norm = RMSNorm(c.intermediate_size, c.rms_norm_eps)


class BitNetDecoderLayer(nn.Module):
    def __init__(self, config: BitNetConfig, packed_only: bool = False) -> None:
        super().__init__()
        self.self_attn = BitNetAttention(config, packed_only)
        self.mlp = BitNetMLP(config, packed_only)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eps = config.rms_norm_eps
        # Filled by BitNetForCausalLM.prepare_for_inference: name -> PreparedLinear ("qkv", "gate_up", ...).
        self.bound: Dict[str, PreparedLinear] = {}
        # True when every bound projection takes int8 input: the norms before them then quantize
        # (fused into the norm's kernel) and the projections skip their own quantization pass.
        self.quantized_inputs = False
        # BitNet's whole MLP as one cuda_ext kernel for a few tokens (prepare_for_inference(fused_mlp=True)).
        self.fused_mlp = None
        # True when that kernel also takes the residual add and the post-attention norm (norm_and_mlp).
        self.norm_in_mlp = False
        # Projections that take the norm before them in their own kernel (prepare_for_inference(norm_in_gemv=True)):
        # "qkv" with input_layernorm (and the residual add), "o_proj" with attn_sub_norm.
        self.norm_linears: Dict[str, object] = {}
        # The o projection with the residual add and post_attention_layernorm in its own kernel (its last block runs
        # the norm; prepare_for_inference(norm_tail=True)), or None.
        self.o_norm_tail = None
        # The fused q/k/v projection as the one-row attention kernel takes it (backends.cuda_ext.decode_attention
        # .FusedQkv, bound by prepare_for_inference where cuda_ext serves it), and whether to use it by default.
        self.qkv_attention = None
        self.use_qkv_attention = False

    def _mlp(self, x, ops, quantize: bool) -> torch.Tensor:
        """``down_proj(ffn_sub_norm(relu(gate_proj(x))**2 * up_proj(x)))``: one kernel where the fused MLP
        takes ``x`` (int8 input, at most its token count), else the projections and the norm's kernel."""
        mlp, fused = self.mlp, self.fused_mlp
        limit = min(fused.max_tokens, FUSED_MLP_MAX_TOKENS) if fused is not None else 0
        if fused is not None and isinstance(x, QuantizedActivation) and x.q.numel() <= limit * fused.hidden:
            return fused(x.q, x.scale)
        gate, up = self._project("gate_up", ("gate_proj", "up_proj"), mlp, x)
        m = ops.relu2_gate_norm(gate, up, mlp.ffn_sub_norm.weight, self.eps, quantize)
        return self._linear("down_proj", mlp, m)

    def _project(self, fused: str, names: tuple, module: nn.Module, x: torch.Tensor) -> tuple:
        if fused in self.bound:
            return self.bound[fused](x)
        if all(n in self.bound for n in names):
            return tuple(self.bound[n](x) for n in names)
        return tuple(getattr(module, n)(x) for n in names)

    def _linear(self, name: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        bound = self.bound.get(name)
        return bound(x) if bound is not None else getattr(module, name)(x)

    def forward(self, h, delta, ops, cos, sin, k_cache=None, v_cache=None, slots=None, mask=None,
                quantize_here: bool = True):
        """``h`` is the residual stream and ``delta`` what the layer before adds to it (None in the first layer);
        the norms quantize when ``quantized_inputs and quantize_here``.  Returns ``(h + delta + o, mlp output)``:
        the next layer (or the final norm) adds the MLP's output."""
        attn = self.self_attn
        quantize = self.quantized_inputs and quantize_here
        B, T, _ = h.shape
        fold_o = self._norm_linear("o_proj", quantize, h)
        sub_weight = None if fold_o else attn.attn_sub_norm.weight
        a = None
        if self._qkv_in_attention(ops, quantize, B * T):  # one row: the attention kernel projects q, k, v itself
            h, x = self._input_norm(h, delta, ops, quantize)
            a = ops.qkv_attention(x, self.qkv_attention, cos, sin, k_cache, v_cache, slots, mask, sub_weight, self.eps,
                                  quantize)
            if a is None:  # (the kernel does not take this cache or input: the projection's own kernel)
                q, k, v = self._project("qkv", ("q_proj", "k_proj", "v_proj"), attn, x)
        else:
            h, (q, k, v) = self._norm_and_qkv(h, delta, ops, quantize)
        if a is None:
            a = ops.attention(
                q.view(B, T, attn.n_heads, attn.head_dim),
                k.view(B, T, attn.n_kv_heads, attn.head_dim),
                v.view(B, T, attn.n_kv_heads, attn.head_dim),
                cos, sin, k_cache, v_cache, slots, mask, sub_weight, self.eps, quantize,
            )
        if fold_o is not None and not fold_o.serves(a):  # e.g. a view the kernel cannot read: the norm apart
            a, fold_o = ops.norm_input(a, attn.attn_sub_norm.weight, self.eps, quantize), None
        tail = self._o_norm_tail(a, h, quantize, fold_o)
        if tail is not None:  # o, the residual add and the norm in one kernel
            h, x = tail(a, h)
            return h, self._mlp(QuantizedActivation(*x), ops, quantize)
        o = fold_o(a)[1] if fold_o is not None else self._linear("o_proj", attn, a)
        both = self._norm_and_mlp(h, o, quantize)
        if both is None:
            h, x = ops.add_rms_norm(h, o, self.post_attention_layernorm.weight, self.eps, quantize)
            y = self._mlp(x, ops, quantize)
        else:
            h, y = both
        return h, y

    def _o_norm_tail(self, a, h: torch.Tensor, quantize: bool, fold_o):
        """The bound o projection with the residual add and post_attention_layernorm after it in one kernel, where
        it takes ``a`` (quantized rows) and ``h`` and ``BITLAB_NORM_TAIL`` is not ``off``, else None."""
        tail = self.o_norm_tail
        if (tail is None or not quantize or fold_o is not None or self.norm_in_mlp
                or not isinstance(a, QuantizedActivation)):
            return None  # (norm_in_mlp, opted into, takes the same norm in the MLP kernel)
        if not tail.serves(a.q, h) or not norm_tail_enabled():
            return None
        return tail

    def _norm_and_qkv(self, h, delta, ops, quantize: bool):
        """``(h + delta, (q, k, v))`` of ``input_layernorm(h + delta)``: one kernel where the q/k/v projection
        takes its norm (:attr:`norm_linears`), else the norm's kernel, then the projection."""
        fold = self._norm_linear("qkv", quantize, h)
        if fold is not None and fold.serves(h, delta):
            summed, out = fold(h, delta)
            return (h if delta is None else summed), out.split(self.bound["qkv"].splits, dim=-1)
        h, x = self._input_norm(h, delta, ops, quantize)
        return h, self._project("qkv", ("q_proj", "k_proj", "v_proj"), self.self_attn, x)

    def _input_norm(self, h, delta, ops, quantize: bool):
        """``(h + delta, input_layernorm(h + delta))`` (``delta`` None: ``h`` and its norm), quantized where asked."""
        weight = self.input_layernorm.weight
        if delta is None:
            return h, ops.norm_input(h, weight, self.eps, quantize)
        return ops.add_rms_norm(h, delta, weight, self.eps, quantize)

    def _qkv_in_attention(self, ops, quantize: bool, tokens: int) -> bool:
        """Whether this step's q/k/v projection goes to the attention kernel: bound and wanted
        (:func:`qkv_attention_wanted`), the norms quantize, one token in all, an ops set that has the kernel, and the
        q/k/v projection not already folded with its norm (``norm_in_gemv``)."""
        return (self.qkv_attention is not None and quantize and tokens == 1 and hasattr(ops, "qkv_attention")
                and "qkv" not in self.norm_linears and qkv_attention_wanted(self.use_qkv_attention))

    def norms_before_projections(self) -> Dict[str, torch.Tensor]:
        """``{binding name: weight of the norm right before it}`` for the projections that can take their norm."""
        return {"qkv": self.input_layernorm.weight, "o_proj": self.self_attn.attn_sub_norm.weight}

    def _norm_linear(self, name: str, quantize: bool, h: torch.Tensor):
        """The projection ``name`` with its norm in one kernel, where bound and it takes rows like ``h`` (the
        norms quantize, CUDA, the norm's dtype, at most its token count), else None."""
        fold = self.norm_linears.get(name)
        if fold is None or not quantize or not h.is_cuda or h.dtype != fold.norm_weight.dtype:
            return None
        return fold if h.numel() // h.shape[-1] <= fold.max_tokens else None

    def _norm_and_mlp(self, h: torch.Tensor, o: torch.Tensor, quantize: bool):
        """``(h + o, mlp(post_attention_layernorm(h + o)))`` from the one MLP kernel where it takes the norm too
        (``norm_in_mlp``, quantizing norms, contiguous CUDA rows of its dtype, at most its token count), else
        None: then the norm's own kernel and :meth:`_mlp` run."""
        fused = self.fused_mlp
        if not (self.norm_in_mlp and quantize and fused is not None):
            return None
        tokens = h.numel() // h.shape[-1]
        if (tokens > min(fused.norm_max_tokens, FUSED_MLP_MAX_TOKENS) or not h.is_cuda or h.shape != o.shape
                or h.dtype != fused.sub_weight.dtype or o.dtype != h.dtype or not h.is_contiguous()
                or not o.is_contiguous()):
            return None
        return fused.norm_and_mlp(h, o)


class BitNetModel(nn.Module):
    def __init__(self, config: BitNetConfig, packed_only: bool = False) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(BitNetDecoderLayer(config, packed_only) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


def check_head_request(bits: Optional[int], activations: str) -> None:
    """ConfigError unless ``bits`` / ``activations`` describe a head :meth:`BitNetForCausalLM.bind_lm_head` binds."""
    if bits is not None and bits not in LM_HEAD_BITS:
        raise ConfigError(f"lm_head bits: got {bits!r}; allowed values are {list(LM_HEAD_BITS)} or None (dense)")
    if activations not in LM_HEAD_ACTIVATIONS:
        raise ConfigError(f"lm_head activations: got {activations!r}; allowed values are {list(LM_HEAD_ACTIVATIONS)}")
    if bits is None and activations != "float":
        raise ConfigError(f"lm_head activations={activations!r} needs a quantized head (bits 8, 4 or 2); the dense "
                          "head takes float input")


class BitNetForCausalLM(nn.Module):
    """BitNet b1.58 causal LM; see the module docstring.

    ``packed_only=True`` builds the projections without float latent weights (for loading
    checkpoints of any size cheaply); the default builds trainable BitLinear layers.
    """

    def __init__(self, config: BitNetConfig, packed_only: bool = False) -> None:
        super().__init__()
        self.config = config
        self.model = BitNetModel(config, packed_only)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rotary_table(config.head_dim, config.rope_theta, config.max_position_embeddings)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.ops = Ops()
        self.quantize_in_norms_max_tokens = QUANTIZE_IN_NORMS_MAX_TOKENS
        self.norm_quant = "none"  # what runs the quantizing norms (prepare_for_inference sets it)
        self.mlp_kernel = "separate kernels (not prepared)"  # what runs the MLPs (prepare_for_inference sets it)
        self.norm_gemv = "separate kernels (not prepared)"  # what runs the norms before q/k/v and o (likewise)
        self.norm_tail = "separate kernels (not prepared)"  # what runs o_proj's post-attention norm (likewise)
        self.qkv_attention_kernel = "separate q/k/v projection (not prepared)"  # (likewise)
        self.cpu_norm = "torch (not prepared)"  # what runs the norms on a CPU (likewise)
        # The lm_head quantized per row to 2 / 4 / 8 bits, when bind_lm_head asked for it (else the dense one).
        self.head_binding: Optional[PreparedLinear] = None
        self.head_kernel = "dense (nn.Linear)"  # what runs the lm_head (bind_lm_head sets it)
        # The embedding table in pinned host memory, looked up by the GPU (offload_embedding), else None.
        self.host_embedding = None
        self._rope_cast = None  # (key, (cos, sin)) of rotary_tables

    # ---------------------------------------------------------------- forward
    def rotary(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos, sin ``[B, T, 1, D]`` in ``dtype`` for integer ``positions [B, T]``."""
        if not positions.is_cuda and positions.numel() and int(positions.max()) >= self.rope_cos.shape[0]:
            raise ValueError(
                f"position {int(positions.max())} is beyond max_position_embeddings={self.rope_cos.shape[0]}"
            )
        return self.rope_cos[positions].unsqueeze(2).to(dtype), self.rope_sin[positions].unsqueeze(2).to(dtype)

    def rotary_tables(self, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """The rotary tables ``cos, sin [max_position_embeddings, D]`` cast to ``dtype`` (cached per dtype and
        table storage): the rows :meth:`rotary` returns, for a lookup kernel that copies them."""
        key = (dtype, self.rope_cos.device, self.rope_cos.data_ptr())
        if self._rope_cast is None or self._rope_cast[0] != key:
            self._rope_cast = (key, (self.rope_cos.to(dtype).contiguous(), self.rope_sin.to(dtype).contiguous()))
        return self._rope_cast[1]

    def _step_inputs(self, input_ids: torch.Tensor, positions: torch.Tensor, ops):
        """The first hidden states ``[B, T, H]`` and the rotary rows ``[B, T, 1, D]``: from the ops set's one-kernel
        lookup where it has one (``step_inputs``, :class:`~bitmodels.bitnet.ops.GatheredInputsOps`) and the ids
        are on the GPU, else the embedding (or its host copy) and :meth:`rotary`; the same values."""
        gather = getattr(ops, "step_inputs", None)
        if gather is not None and input_ids.is_cuda:
            table = self.model.embed_tokens.weight  # the pinned host table itself after offload_embedding
            cos_table, sin_table = self.rotary_tables(table.dtype)
            h, cos, sin = gather(table, input_ids, cos_table, sin_table, positions)
            return h, cos.unsqueeze(2), sin.unsqueeze(2)
        h = self.model.embed_tokens(input_ids) if self.host_embedding is None else self.host_embedding(input_ids)
        cos, sin = self.rotary(positions, h.dtype)
        return h, cos, sin

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: Optional[torch.Tensor] = None,
        cache=None,
        slots: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
        last_only: bool = False,
        ops: Optional[Ops] = None,
    ) -> torch.Tensor:
        """Logits ``[B, T, vocab]`` (``[B, 1, vocab]`` with ``last_only``) for ``input_ids [B, T]``.

        Without arguments beyond ``input_ids`` this is plain causal attention over the sequence.
        The generation engine passes rotary ``positions [B, T]``, a :class:`KVCache`, the cache
        ``slots [T]`` this chunk writes and the attention ``mask [B, 1, T, S]``; ``ops`` overrides
        the model's float operations (eager or compiled) for this call.
        """
        ops = self.ops if ops is None else ops
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        h, cos, sin = self._step_inputs(input_ids, positions, ops)
        # Quantizing in the norms pays where the projections are GEMVs (decode); a prefill's GEMMs
        # quantize inside their own op (measured: norm-side quantization made prefill slower).
        small = B * T <= self.quantize_in_norms_max_tokens
        delta = None
        for i, layer in enumerate(self.model.layers):
            kc, vc = (cache.k[i], cache.v[i]) if cache is not None else (None, None)
            h, delta = layer(h, delta, ops, cos, sin, kc, vc, slots, mask, small)
        eps = self.config.rms_norm_eps
        # A head with int8 activations takes the final norm's output quantized, as the projections do.
        quantize = small and self.head_binding is not None and self.head_binding.takes_quantized
        if delta is None:
            x = ops.norm_input(h, self.model.norm.weight, eps, quantize)
        else:
            _, x = ops.add_rms_norm(h, delta, self.model.norm.weight, eps, quantize)
        if last_only:
            x = QuantizedActivation(x.q[:, -1:], x.scale[:, -1:]) if quantize else x[:, -1:]
        head = self.lm_head if self.head_binding is None else self.head_binding
        return getattr(ops, "head", apply_head)(head, x)

    # ------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(cls, path, *, dtype: Optional[torch.dtype] = None) -> "BitNetForCausalLM":
        """Load a transformers BitNet checkpoint or a BitLab one (see :mod:`bitmodels.bitnet.checkpoint`)."""
        from bitmodels.bitnet.checkpoint import load_bitnet

        return load_bitnet(path, dtype=dtype)

    def save_pretrained(self, directory):
        """Save in BitLab's packed format (loadable here and by ``AutoBitModel.from_pretrained``)."""
        from bitmodels.bitnet.checkpoint import save_pretrained

        return save_pretrained(self, directory)

    # -------------------------------------------------------------- inference
    def bitlinears(self):
        """(name, BitLinear) for every projection."""
        return [(n, m) for n, m in self.named_modules() if isinstance(m, BitLinear)]

    def prepare_for_inference(
        self, device=None, *, fuse: bool = True, offload_packed: bool = False, quantize_in_norms: bool = True,
        lm_head_bits: Optional[int] = None, fused_mlp: bool = True, embedding_on_host: bool = False,
        norm_in_mlp: Optional[bool] = None, norm_in_gemv: Optional[bool] = None, lm_head_activations: str = "float",
        norm_tail: Optional[bool] = None, qkv_in_attention: Optional[bool] = None,
    ) -> Dict[str, str]:
        """Resolve every projection's kernel and prepared weight once for ``device`` (see bindings).

        ``quantize_in_norms``: where every kernel of a layer takes int8 input (W*A8 per-token configs
        whose kernels implement ``forward_quantized``), the norms before the projections quantize
        their output, fused into the norm's kernel, and the projections skip their own pass (same
        numbers: the quantization is the kernels' own).
        ``lm_head_bits``: also quantize the ``lm_head`` (see :meth:`bind_lm_head`); None keeps it dense.
        ``lm_head_activations``: with ``lm_head_bits``, ``"float"`` (the default) or ``"int8"`` (see
        :meth:`bind_lm_head`).
        ``fused_mlp``: where the layer's norms quantize and cuda_ext serves it (sm_90), run each MLP as one
        kernel for up to FUSED_MLP_MAX_TOKENS tokens (:mod:`backends.cuda_ext.bitnet_mlp`; exact against the
        three separate kernels, 17.0 vs 18.2 us per layer at one token on an H100); ``self.mlp_kernel`` says
        what runs and why.
        ``norm_in_mlp``: with the one-kernel MLP, let that kernel also take the residual add and the
        post-attention norm (one kernel fewer per layer; not yet timed, so off by default; None reads
        ``BITLAB_MLP_NORM=in`` from the environment).
        ``norm_in_gemv``: where the norms quantize and cuda_ext serves the projection, run ``input_layernorm``
        (with the residual add) inside the q/k/v GEMV and ``attn_sub_norm`` inside the o GEMV, for as many
        tokens as :mod:`backends.cuda_ext.norm_linear` takes (two kernels fewer per layer; the same bits);
        None reads ``BITLAB_NORM_GEMV=in`` from the environment.  ``self.norm_gemv`` says what runs and why.
        ``norm_tail``: where the norms quantize and cuda_ext serves the o projection, run it with the residual add
        and ``post_attention_layernorm`` after it in one kernel whose last block runs the norm, for as many tokens
        as :mod:`backends.cuda_ext.norm_tail` takes (one kernel fewer per layer; the same bits).  Timed on the H200
        it lost (881 against 887 tokens/s at batch 1, 1594 against 1685 at batch 2; notes v24), so it is off by
        default; None reads ``BITLAB_NORM_TAIL=on`` from the environment.  ``self.norm_tail`` says what runs and
        why; ``BITLAB_NORM_TAIL=off`` turns a bound one off at run time.
        ``qkv_in_attention``: where the norms quantize and cuda_ext serves the fused q/k/v projection (sm_90), let the
        one-row decode attention kernel compute q, k, v itself (:func:`backends.cuda_ext.decode_attention.
        decode_qkv_attention`: one kernel fewer per layer at batch 1; the same bits).  Not yet timed, so off by
        default; None reads ``BITLAB_QKV_ATTENTION=on`` from the environment.  The projection is bound wherever it
        can run, so ``BITLAB_QKV_ATTENTION=on`` / ``off`` also decides at run time.  ``self.qkv_attention_kernel``
        says what runs and why.
        ``embedding_on_host``: keep the embedding table in pinned host memory (see :meth:`offload_embedding`;
        with a tied table this needs ``lm_head_bits``).
        Returns ``{binding name: kernel name}`` for layer 0, e.g. ``{"qkv": "cuda_ext.Ternary...", ...}``.
        """
        device = torch.device(device) if device is not None else self.compute_device
        check_head_request(lm_head_bits, lm_head_activations)  # before any binding changes
        if norm_in_mlp is None:
            norm_in_mlp = os.environ.get("BITLAB_MLP_NORM", "") == "in"
        if norm_in_gemv is None:
            norm_in_gemv = os.environ.get("BITLAB_NORM_GEMV", "") == "in"
        if norm_tail is None:
            norm_tail = os.environ.get("BITLAB_NORM_TAIL", "") == "on"
        if qkv_in_attention is None:
            qkv_in_attention = os.environ.get("BITLAB_QKV_ATTENTION", "") == "on"
        self.eval()
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            modules = {n: getattr(attn, n) for n in PROJECTIONS[:4]}
            modules.update({n: getattr(mlp, n) for n in PROJECTIONS[4:]})
            layer.bound = bind_group(modules, FUSED_GROUPS, device, fuse=fuse, offload_packed=offload_packed,
                                     out_dtype=self.model.embed_tokens.weight.dtype)
            layer.quantized_inputs = quantize_in_norms and all(b.takes_quantized for b in layer.bound.values())
            layer.fused_mlp, why = None, "fused_mlp=False"
            if fused_mlp and not layer.quantized_inputs:
                why = "the norms do not quantize (quantize_in_norms=False or a projection takes no int8 input)"
            elif fused_mlp:
                layer.fused_mlp, why = bind_fused_mlp(layer.bound, mlp.ffn_sub_norm.weight, layer.eps,
                                                      layer.post_attention_layernorm.weight)
            layer.norm_in_mlp = bool(norm_in_mlp) and layer.fused_mlp is not None and layer.fused_mlp.norm_max_tokens > 0
            layer.norm_linears, norm_why = {}, "norm_in_gemv=False"
            if norm_in_gemv and not layer.quantized_inputs:
                norm_why = "the norms do not quantize"
            elif norm_in_gemv:
                norms = layer.norms_before_projections()
                layer.norm_linears, norm_why = bind_norm_linears(layer.bound, norms, layer.eps)
            layer.o_norm_tail, tail_why = None, "norm_tail=False"
            if norm_tail and not layer.quantized_inputs:
                tail_why = "the norms do not quantize"
            elif norm_tail:
                layer.o_norm_tail, tail_why = bind_norm_tail(layer.bound.get("o_proj"),
                                                             layer.post_attention_layernorm.weight, layer.eps)
            layer.qkv_attention, qkv_why = None, "the norms do not quantize"
            if layer.quantized_inputs:
                layer.qkv_attention, qkv_why = bind_qkv_attention(layer.bound, self.config)
            layer.use_qkv_attention = bool(qkv_in_attention)
        self.norm_gemv = describe_norm_linears(self.model.layers[0].norm_linears, norm_why)
        tail = self.model.layers[0].o_norm_tail
        self.norm_tail = (f"cuda_ext.linear_int8_norm_tail (o_proj, the residual add and post_attention_layernorm in "
                          f"one kernel up to {tail.max_tokens} tokens)" if tail is not None
                          else f"separate kernels ({tail_why})")
        first = self.model.layers[0]
        if first.qkv_attention is None:
            self.qkv_attention_kernel = f"separate q/k/v projection ({qkv_why})"
        else:
            use = "on" if qkv_in_attention else "off by default (BITLAB_QKV_ATTENTION=on turns it on)"
            self.qkv_attention_kernel = ("cuda_ext.decode_qkv_attention (the q/k/v projection inside the one-row "
                                         f"attention kernel): {use}")
        self.mlp_kernel = f"separate kernels ({why})"
        if first.fused_mlp is not None:
            limit = min(first.fused_mlp.max_tokens, FUSED_MLP_MAX_TOKENS)
            norm = ""
            if first.norm_in_mlp:
                norm = (f", with the residual add and post-attention norm up to "
                        f"{min(first.fused_mlp.norm_max_tokens, FUSED_MLP_MAX_TOKENS)}")
            elif norm_in_mlp:
                norm = f", the post-attention norm apart (hidden {first.fused_mlp.hidden} is not a multiple of 8)"
            self.mlp_kernel = f"cuda_ext.bitnet_mlp (one kernel up to {limit} tokens{norm})"
        self.norm_quant = use_fused_norm_quant(device) if self.model.layers[0].quantized_inputs else "none"
        fused_norms, self.cpu_norm = use_cpu_norm(device)
        if fused_norms and not isinstance(self.ops, CpuNormOps):
            self.ops = CpuNormOps(self.ops)
        elif not fused_norms and isinstance(self.ops, CpuNormOps):
            self.ops = self.ops.base
        self.bind_lm_head(lm_head_bits, device, activations=lm_head_activations)
        if embedding_on_host:
            self.offload_embedding(True)
        return {name: b.kernel.name for name, b in self.model.layers[0].bound.items()}

    def bind_lm_head(self, bits: Optional[int], device=None, activations: str = "float") -> str:
        """Run the ``lm_head`` quantized per vocabulary row to ``bits`` (2, 4 or 8; the registry's kernel), or
        dense again with None.  Trades logit accuracy for bytes: the head reads ``vocab x hidden`` weights every
        decode step (656 MB in bf16 for BitNet 2B, 328 MB at 8 bits).  ``activations``: ``"float"`` multiplies
        the final norm's output as it is; ``"int8"`` quantizes it per token first (in the norm's kernel where
        the projections' inputs are quantized there too), so the head runs on the int8 tensor-core path
        (W{bits}A8).  The embedding lookup keeps the float table (on the GPU, or on the host after
        :meth:`offload_embedding`; going back to the dense head brings a tied table back to the GPU).
        Returns what runs the head."""
        check_head_request(bits, activations)
        if bits is None:
            if self.host_embedding is not None and self.config.tie_word_embeddings:
                self.offload_embedding(False)
            self.head_binding = None
            self.head_kernel = "dense (nn.Linear)"
            return self.head_kernel
        device = torch.device(device) if device is not None else self.compute_device
        self.head_binding = bind_quantized_dense(self.lm_head.weight, bits, device, activations)
        inputs = "int8 per-token activations" if activations == "int8" else "float activations"
        self.head_kernel = f"{self.head_binding.kernel.name} (quantized per row: {bits}-bit weights, {inputs})"
        return self.head_kernel

    @property
    def compute_device(self) -> torch.device:
        """Where the model computes (the norms' device; the embedding table may live on the host)."""
        return self.model.norm.weight.device

    def offload_embedding(self, enabled: bool = True) -> str:
        """Keep the embedding table in pinned host memory and look rows up from the GPU
        (:mod:`backends.cuda_ext.host_embedding`: one kernel, CUDA-graph safe, the table's values bit for
        bit), freeing its GPU memory (656 MB for BitNet 2B in bf16); ``False`` brings it back.  A table tied
        to a dense ``lm_head`` is read whole by the head every step, so this needs the head quantized
        first (:meth:`bind_lm_head`).  Returns where the table lives."""
        weight = self.model.embed_tokens.weight
        if not enabled:
            if self.host_embedding is not None:
                weight.data = self.host_embedding.table.to(self.compute_device)
                self.host_embedding = None
            return f"on {weight.device}"
        if self.host_embedding is not None:
            return "pinned host memory"
        from backends.cuda_ext import host_embedding

        why = host_embedding.status(self.compute_device)
        if why:
            raise ValueError(f"offload_embedding: {why}")
        if self.config.tie_word_embeddings and self.head_binding is None:
            raise ValueError("offload_embedding: the lm_head is tied to the embedding and dense, so it reads the "
                             "whole table on the GPU every step; quantize the head first (lm_head_bits=8, 4 or 2)")
        self.host_embedding = host_embedding.HostEmbedding(weight)
        weight.data = self.host_embedding.table  # the tied lm_head.weight is this Parameter too
        return "pinned host memory"

    def release_bindings(self) -> None:
        """Drop the prepared weights; projections dispatch through ``BitLinear.forward`` again."""
        self.offload_embedding(False)
        self.head_binding = None
        self.head_kernel = "dense (nn.Linear)"
        self.mlp_kernel = "separate kernels (not prepared)"
        self.norm_gemv = "separate kernels (not prepared)"
        self.norm_tail = "separate kernels (not prepared)"
        self.qkv_attention_kernel = "separate q/k/v projection (not prepared)"
        self.cpu_norm = "torch (not prepared)"
        if isinstance(self.ops, CpuNormOps):
            self.ops = self.ops.base
        for layer in self.model.layers:
            layer.bound = {}
            layer.quantized_inputs = False
            layer.fused_mlp = None
            layer.norm_in_mlp = False
            layer.norm_linears = {}
            layer.o_norm_tail = None
            layer.qkv_attention = None

    def use_compiled_ops(self, enabled: bool = True, **compile_kwargs) -> None:
        """Run the float operations through ``torch.compile`` (fused kernels) or eagerly."""
        self.ops = (CompiledOps(**compile_kwargs) if compile_kwargs else compiled_ops()) if enabled else Ops()

    def weight_memory(self) -> Dict[str, int]:
        """Bytes of the weights: canonical packed projections (wherever they are), the kernels' prepared
        projections on the GPU, float parameters (embeddings, lm_head, norms; a tied matrix once) and those of
        them on the GPU (not an offloaded embedding table)."""
        bindings = [b for layer in self.model.layers for b in layer.bound.values()]
        packed = sum(m.packed_weight().nbytes() for _, m in self.bitlinears())
        floats = {p.data_ptr(): (p.numel() * p.element_size(), p.is_cuda) for p in self.parameters()}
        head = [self.head_binding] if self.head_binding is not None else []
        return {"packed": packed, "prepared_gpu": device_bytes(bindings, "cuda"),
                "float": sum(b for b, _ in floats.values()),
                "float_gpu": sum(b for b, on_gpu in floats.values() if on_gpu),
                "quantized_lm_head_gpu": device_bytes(head, "cuda")}


register_model(BitNetConfig, BitNetForCausalLM)

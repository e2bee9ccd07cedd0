"""Generation engine for BitNetForCausalLM: static KV cache, prefill then decode, CUDA-graph decode step.

A call ``generate(prompts, max_new_tokens)``:

1. **allocates** (or reuses) a KV cache of exactly ``[batch, kv_heads, seq, head_dim]`` per layer
   in the model's float dtype, ``seq = longest prompt + max_new_tokens`` rounded up to 64;
2. **prefills**: prompts are left-padded to the longest; rotary positions start at each prompt's
   first real token, a mask hides the padding, and one forward writes every prompt's K/V and
   samples the first new token from the last position's logits;
3. **decodes**: one step reads the current tokens and the cache position from device buffers,
   runs the model on one token per row, samples, writes the token into the output buffer, marks
   rows that produced a stop token as done (their later tokens are ``pad_token_id``) and advances
   the position -- all on the device.  On CUDA the step is captured once in a CUDA graph and
   replayed, so a token costs one graph launch and no allocation, no host sync.  The host looks
   at the ``done`` flags (one sync) only every ``sync_every`` steps, which is also when the
   ``stream`` callback gets the new tokens.  ``steps_per_graph=n`` (or ``BITLAB_GRAPH_STEPS=n``) captures n
   steps in one graph (one launch per n tokens, and the steps' kernels chain across step boundaries); the
   last ``(max_new_tokens - 1) % n`` steps replay a one-step graph.  ``graph_steps`` says what runs.

``compile=True`` runs the model's float operations through ``torch.compile`` (fused RMSNorm,
rotary, residual adds) in the decode step; the BitLinear kernels are the registry's.
One-token attention (decode) runs, on CUDA with cuda_ext available, as one fused kernel
(rotary + KV-cache write + attention, :mod:`backends.cuda_ext.decode_attention`); ``fused_attention=False``
keeps the unfused path.  It takes up to ``FUSED_ATTENTION_MAX_BATCH`` rows (32), or, with ``compile`` and
Triton installed, up to ``FUSED_ATTENTION_MAX_BATCH_BEFORE_TRITON`` (4) with a split-KV Triton kernel
(:mod:`bitmodels.bitnet.triton_attention`) above; ``triton_attention=True`` runs that Triton kernel at
every batch, ``False`` never.  ``attention_kernel`` says which runs, and why.  ``lm_head_bits=8`` (or 4,
2) runs the output head quantized per vocabulary row (:meth:`BitNetForCausalLM.bind_lm_head`: fewer
bytes per step, approximate logits; ``lm_head_activations="int8"`` also quantizes its input per token, for the
int8 tensor-core path); ``head_kernel`` says what runs it; with it, ``embedding_on_host=True``
keeps the embedding table in pinned host memory (:meth:`BitNetForCausalLM.offload_embedding`), so the GPU holds
only the packed projections, the quantized head and the norms; ``embedding`` says where the table lives.  Each layer's MLP runs, for up to 2 tokens on an sm_90 GPU with the norms quantizing, as
one kernel (:mod:`backends.cuda_ext.bitnet_mlp`); ``fused_mlp=False`` keeps the three separate kernels;
``mlp_kernel`` says which runs, and why.  ``norm_in_gemv=True`` (or ``BITLAB_NORM_GEMV=in``) runs the norms
before q/k/v and o inside those projections' GEMVs (:mod:`backends.cuda_ext.norm_linear`); ``norm_gemv`` says
what runs them, and why.  ``norm_tail=True`` (or ``BITLAB_NORM_TAIL=on``) runs the o projection, the residual add
and ``post_attention_layernorm`` as one kernel (:mod:`backends.cuda_ext.norm_tail`); ``norm_tail`` says what runs
them, and why.  The step's argmax and its bookkeeping after the sampler (output, stop rows, slot, the
next step's positions and mask; :mod:`bitmodels.bitnet.decode_state`) are one cuda_ext kernel each where it runs;
``argmax_kernel`` and ``advance_kernel`` say what runs them.  ``qkv_in_attention=True`` (or
``BITLAB_QKV_ATTENTION=on``) lets the fused attention kernel compute the q/k/v projection itself at batch 1
(:func:`backends.cuda_ext.decode_attention.decode_qkv_attention`); ``qkv_attention`` says what runs.  Each step's
input rows (the tokens' embedding rows and
rotary rows) are one cuda_ext kernel where it runs (:mod:`backends.cuda_ext.step_inputs`); ``inputs_kernel`` says
what runs them.

Example::

    gen = Generator(model)                       # model on its device, in its dtype
    out = gen.generate([[1, 5, 9], [1, 7]], max_new_tokens=20, sampling=SamplingConfig(temperature=0.7, top_p=0.9))
    out.tokens                                   # list of new-token lists, stop token included
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from bitmodels.bitnet.model import BitNetForCausalLM
from bitmodels.bitnet.ops import (
    CpuDecodeAttentionOps,
    CpuNormOps,
    FUSED_ATTENTION_MAX_BATCH,
    FUSED_ATTENTION_MAX_BATCH_BEFORE_TRITON,
    FusedDecodeAttentionOps,
    GatheredInputsOps,
    Ops,
    compiled_ops,
    fused_decode_attention_status,
    use_cpu_attention,
    use_step_inputs_kernel,
)
from bitmodels.bitnet.cpu_threads import DecodeThreads, HeadOnAllThreadsOps, split_status
from bitmodels.bitnet.decode_state import WARMUP_STEPS, DecodeState, use_advance_kernel
from bitmodels.bitnet.sampling import SamplingConfig, sample, use_argmax_kernel

log = logging.getLogger("bitlab.bitnet.generate")


@dataclass
class KVCache:
    """Per-layer key and value caches ``[batch, kv_heads, seq, head_dim]``, allocated once."""

    k: List[torch.Tensor]
    v: List[torch.Tensor]

    @classmethod
    def allocate(cls, model: BitNetForCausalLM, batch: int, seq: int, dtype: torch.dtype, device) -> "KVCache":
        c = model.config
        shape = (batch, c.num_key_value_heads, seq, c.head_dim)
        make = lambda: [torch.zeros(shape, dtype=dtype, device=device) for _ in range(c.num_hidden_layers)]  # noqa: E731
        return cls(make(), make())

    @property
    def shape(self) -> tuple:
        return tuple(self.k[0].shape)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


@dataclass
class GenerationOutput:
    tokens: List[List[int]]  # new tokens per prompt, up to and including a stop token
    prefill_s: float
    decode_s: float
    decode_steps: int
    stats: Dict[str, float] = field(default_factory=dict)


class Generator:
    """Batched generation for a :class:`BitNetForCausalLM`; see the module docstring."""

    def __init__(
        self,
        model: BitNetForCausalLM,
        *,
        cuda_graph: Optional[bool] = None,
        compile: bool = False,
        fuse: bool = True,
        offload_packed: bool = False,
        bind: bool = True,
        triton_attention: Optional[bool] = None,
        fused_attention: Optional[bool] = None,
        lm_head_bits: Optional[int] = None,
        fused_mlp: bool = True,
        embedding_on_host: bool = False,
        norm_in_gemv: Optional[bool] = None,
        lm_head_activations: str = "float",
        norm_tail: Optional[bool] = None,
        steps_per_graph: Optional[int] = None,
        qkv_in_attention: Optional[bool] = None,
    ) -> None:
        self.model = model.eval()
        self.device = model.compute_device
        self.dtype = model.lm_head.weight.dtype
        self.cuda_graph = (self.device.type == "cuda") if cuda_graph is None else bool(cuda_graph)
        if self.cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device, it is on {self.device}")
        self.steps_per_graph, self.graph_steps = graph_steps_choice(steps_per_graph, self.cuda_graph)
        from bitmodels.bitnet import triton_attention as ta

        if triton_attention:
            if not (compile and ta.available() and self.device.type == "cuda"):
                raise ValueError(
                    "triton_attention=True needs compile=True, Triton and a CUDA model; got "
                    f"compile={compile}, triton {'available' if ta.available() else 'missing'}, device {self.device}"
                )
        why_not = "triton_attention=True" if triton_attention else fused_decode_attention_status(self.device)
        if fused_attention and why_not:
            raise ValueError(f"fused_attention=True but the fused kernel cannot run: {why_not}")
        fused = fused_attention is not False and not why_not
        # Default (triton_attention=None): where the fused kernel runs, compiled and with Triton, the split-KV
        # Triton kernel takes the rows past FUSED_ATTENTION_MAX_BATCH_BEFORE_TRITON.
        triton_above = triton_attention is None and fused and compile and ta.available()
        self.decode_ops = compiled_ops(bool(triton_attention) or triton_above) if compile else model.ops
        if fused:
            limit = FUSED_ATTENTION_MAX_BATCH_BEFORE_TRITON if triton_above else FUSED_ATTENTION_MAX_BATCH
            self.decode_ops = FusedDecodeAttentionOps(self.decode_ops, limit if triton_above else None)
            above = "the split-KV Triton kernel above" if triton_above else "torch above"
            self.attention_kernel = ("cuda_ext.decode_attention (rotary + cache write + attention, one kernel) "
                                     f"up to {limit} rows, {above}")
        elif triton_attention:
            self.attention_kernel = "triton split-KV (triton_attention=True)"
        elif fused_attention is False:
            self.attention_kernel = "torch (fused_attention=False)"
        else:
            self.attention_kernel = f"torch ({why_not})"
        self.prefill_ops = Ops()
        if bind:  # resolve kernels and prepared weights once (see BitNetForCausalLM.prepare_for_inference)
            model.prepare_for_inference(self.device, fuse=fuse, offload_packed=offload_packed,
                                        lm_head_bits=lm_head_bits, fused_mlp=fused_mlp,
                                        embedding_on_host=embedding_on_host, norm_in_gemv=norm_in_gemv,
                                        lm_head_activations=lm_head_activations, norm_tail=norm_tail,
                                        qkv_in_attention=qkv_in_attention)
        else:
            if lm_head_bits is not None:
                model.bind_lm_head(lm_head_bits, self.device, activations=lm_head_activations)
            if embedding_on_host:
                model.offload_embedding(True)
        self.embedding = "pinned host memory (GPU lookup)" if model.host_embedding is not None else f"on {self.device}"
        self.head_kernel = model.head_kernel
        self._argmax, self.argmax_kernel = use_argmax_kernel(self.device)  # greedy picks and the sampling race
        self._advance, self.advance_kernel = use_advance_kernel(self.device)  # the step's bookkeeping
        self.mlp_kernel = model.mlp_kernel
        self.norm_gemv = model.norm_gemv
        self.norm_tail = model.norm_tail
        self.qkv_attention = model.qkv_attention_kernel if fused else (
            f"separate q/k/v projection (the fused attention kernel does not run: {self.attention_kernel})")
        self.cpu_norm = model.cpu_norm
        if isinstance(model.ops, CpuNormOps):  # prepared on a CPU with cpp_cpu: the norms as one call each
            self.prefill_ops = CpuNormOps(self.prefill_ops)
            if not isinstance(self.decode_ops, CpuNormOps):
                self.decode_ops = CpuNormOps(self.decode_ops)
        if self.device.type == "cpu":  # one-token attention as one cpp_cpu call per layer where it runs
            cpu_attention, why = use_cpu_attention(self.device)
            self.attention_kernel = why
            if cpu_attention:
                self.decode_ops = CpuDecodeAttentionOps(self.decode_ops)
        gather, self.inputs_kernel = use_step_inputs_kernel(self.device)  # embedding + rotary rows of a step
        if gather is not None:
            self.decode_ops = GatheredInputsOps(self.decode_ops, gather)
            self.prefill_ops = GatheredInputsOps(self.prefill_ops, gather)
        self.kernels = {
            name: getattr(getattr(b, "kernel", None), "name", type(b).__name__)
            for name, b in model.model.layers[0].bound.items()
        }
        # On a CPU the decode loop runs torch's ops on one thread and the cpp_cpu kernels on all (cpu_threads).
        split, self.cpu_threads = split_status(model, self.device)
        self._decode_threads = DecodeThreads(split)
        if split:
            self.decode_ops = HeadOnAllThreadsOps(self.decode_ops, self._decode_threads)
        self._cache: Optional[KVCache] = None
        self._decoders: Dict[tuple, tuple] = {}  # key -> (state, {steps: graph} or None)

    # ------------------------------------------------------------ buffers
    def _cache_for(self, batch: int, seq: int) -> KVCache:
        if self._cache is None or self._cache.shape[0] != batch or self._cache.shape[2] != seq:
            self._decoders.clear()  # graphs point into the old cache
            self._cache = None
            self._cache = KVCache.allocate(self.model, batch, seq, self.dtype, self.device)
        return self._cache

    # ------------------------------------------------------------- steps
    def _decode_step(self, st: DecodeState, sampling: SamplingConfig) -> None:
        """One token for every row, entirely from and into ``st``'s device buffers."""
        batch = st.tokens.shape[0]
        logits = self.model(
            st.tokens.view(batch, 1), st.positions, st.cache, st.pos.view(1), st.mask.view(batch, 1, 1, -1),
            ops=self.decode_ops,
        )[:, -1]
        picked = sample(logits, sampling, self._argmax)
        self._advance(picked, st.done, st.pad_id, st.stop_ids, st.out, st.pos, st.prompt_len, st.tokens, st.pad,
                      st.positions, st.mask)

    def _capture(self, st: DecodeState, sampling: SamplingConfig, steps: int = 1) -> torch.cuda.CUDAGraph:
        """A graph of ``steps`` decode steps in a row; the state, the random generator's included, is as before the
        call (so a seeded ``generate`` samples the same tokens whether or not it captured the graph)."""
        saved = [t.clone() for t in st.mutable]
        rng = torch.cuda.get_rng_state(self.device)  # the warm-up steps' sampling draws from it
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self._decode_step(st, sampling)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(steps):
                self._decode_step(st, sampling)
        for t, s in zip(st.mutable, saved):
            t.copy_(s)  # capture does not run the step; undo the warm-up steps' state
        torch.cuda.set_rng_state(rng, self.device)
        return graph

    def _prefill(self, prompts: List[List[int]], st: DecodeState, sampling: SamplingConfig) -> None:
        batch, t_len = len(prompts), st.prompt_len
        ids = torch.full((batch, t_len), int(st.pad_id), dtype=torch.long)
        pad = torch.empty(batch, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, t_len - len(p):] = torch.tensor(p, dtype=torch.long)
            pad[i] = t_len - len(p)
        ids, pad = ids.to(self.device), pad.to(self.device)
        q_index = torch.arange(t_len, device=self.device)
        key = st.key_index[None, None, :]
        # causal over real tokens; a padding query sees only itself (its output is never used)
        mask = (key <= q_index[None, :, None]) & ((key >= pad[:, None, None]) | (key == q_index[None, :, None]))
        positions = (q_index[None, :] - pad[:, None]).clamp(min=0)
        logits = self.model(ids, positions, st.cache, q_index, mask.unsqueeze(1), last_only=True,
                            ops=self.prefill_ops)[:, -1]
        first = sample(logits, sampling, self._argmax)
        st.pad.copy_(pad)
        st.tokens.copy_(first)
        st.out[:, 0].copy_(first)
        st.done.copy_((first[:, None] == st.stop_ids[None, :]).any(dim=-1))
        st.pos.fill_(t_len)
        st.refresh_inputs()

    # ------------------------------------------------------------ public
    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        sampling: SamplingConfig = SamplingConfig(),
        stop_token_ids: Optional[Sequence[int]] = None,
        pad_token_id: Optional[int] = None,
        seed: Optional[int] = None,
        stream: Optional[Callable[[List[List[int]]], None]] = None,
        sync_every: int = 16,
    ) -> GenerationOutput:
        """New tokens for each prompt (token-id lists); see the module docstring.

        ``stop_token_ids`` defaults to the config's eos ids (``[]`` disables stopping);
        ``stream`` receives, every ``sync_every`` steps, the new tokens of each row since its last call.
        """
        prompts = [list(map(int, p)) for p in prompts]
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs at least one prompt and every prompt needs at least one token")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: got {max_new_tokens!r}; expected a positive integer")
        vocab = self.model.config.vocab_size
        bad = [t for p in prompts for t in p if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        cfg = self.model.config
        stops = cfg.stop_token_ids if stop_token_ids is None else list(stop_token_ids)
        pad_id = pad_token_id if pad_token_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None else 0)
        t_len = max(len(p) for p in prompts)
        needed = t_len + max_new_tokens + WARMUP_STEPS
        if needed > cfg.max_position_embeddings:
            raise ValueError(
                f"longest prompt ({t_len}) + max_new_tokens ({max_new_tokens}) exceeds "
                f"max_position_embeddings={cfg.max_position_embeddings}"
            )
        seq = min(-(-needed // 64) * 64, cfg.max_position_embeddings)
        if seed is not None:
            torch.manual_seed(seed)
        batch = len(prompts)
        cache = self._cache_for(batch, seq)
        key = (t_len, max_new_tokens, tuple(stops), pad_id, sampling)
        if key not in self._decoders:
            self._decoders[key] = (DecodeState(cache, t_len, max_new_tokens, stops, pad_id, self.device), None)
        st, graphs = self._decoders[key]

        sync = self._sync
        sync()
        t0 = time.perf_counter()
        self._prefill(prompts, st, sampling)
        sync()
        prefill_s = time.perf_counter() - t0
        capture_s = 0.0
        sizes = graph_sizes(max_new_tokens - 1, self.steps_per_graph)
        if self.cuda_graph and graphs is None and sizes:
            t_cap = time.perf_counter()
            try:
                graphs = {n: self._capture(st, sampling, n) for n in sizes}
            except Exception as exc:  # a kernel that cannot be captured: say so, decode eagerly
                log.warning("CUDA-graph capture of the decode step failed (%s: %s); decoding eagerly",
                            type(exc).__name__, exc)
                self.cuda_graph = False
                graphs = None
                self._prefill(prompts, st, sampling)  # the failed capture may have left state half-written
            self._decoders[key] = (st, graphs)
            sync()
            capture_s = time.perf_counter() - t_cap
        t1 = time.perf_counter()
        emitted = streamed = 1
        steps = 0
        if stream is not None:
            stream(st.out[:, :1].tolist())
        with self._decode_threads():
            while emitted < max_new_tokens:
                n = 1
                if graphs is not None:
                    n = self.steps_per_graph if max_new_tokens - emitted >= self.steps_per_graph else 1
                    graphs[n].replay()
                else:
                    self._decode_step(st, sampling)
                emitted += n
                before, steps = steps, steps + n
                if steps // sync_every != before // sync_every or emitted == max_new_tokens:
                    if stream is not None:
                        stream(st.out[:, streamed:emitted].tolist())
                        streamed = emitted
                    if bool(st.done.all()):
                        break
        sync()
        decode_s = time.perf_counter() - t1
        tokens = [_until_stop(row, stops) for row in st.out[:, :emitted].tolist()]
        stats = {"capture_s": capture_s, "cuda_graph": graphs is not None,
                 "steps_per_graph": self.steps_per_graph if graphs is not None else 0}
        return GenerationOutput(tokens, prefill_s, decode_s, steps, stats)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def graph_steps_choice(steps_per_graph: Optional[int], cuda_graph: bool) -> tuple:
    """``(steps per graph, what runs and why)`` from the argument, else ``BITLAB_GRAPH_STEPS``, else 1."""
    source = "steps_per_graph"
    if steps_per_graph is None:
        env = os.environ.get("BITLAB_GRAPH_STEPS")
        if env is None:
            steps_per_graph, source = 1, "default"
        else:
            try:
                steps_per_graph, source = int(env), "BITLAB_GRAPH_STEPS"
            except ValueError:
                raise ValueError(f"BITLAB_GRAPH_STEPS={env!r}: expected a positive integer") from None
    if isinstance(steps_per_graph, bool) or not isinstance(steps_per_graph, int) or steps_per_graph < 1:
        raise ValueError(f"{source}: got {steps_per_graph!r}; expected a positive integer")
    if not cuda_graph:
        return steps_per_graph, "no CUDA graph: one eager step at a time"
    plural = "step" if steps_per_graph == 1 else "steps"
    return steps_per_graph, f"{steps_per_graph} decode {plural} per CUDA graph ({source})"


def graph_sizes(decode_steps: int, steps_per_graph: int) -> List[int]:
    """The graph sizes ``generate`` replays for ``decode_steps`` steps: ``steps_per_graph`` while that many are
    left, then one step at a time."""
    sizes = []
    if decode_steps >= steps_per_graph:
        sizes.append(steps_per_graph)
    if decode_steps % steps_per_graph and 1 not in sizes:
        sizes.append(1)
    return sizes


def _until_stop(row: List[int], stops: Sequence[int]) -> List[int]:
    for i, t in enumerate(row):
        if t in stops:
            return row[: i + 1]
    return row

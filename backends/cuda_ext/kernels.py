"""cuda_ext kernels: BitKernel classes over the op ``bitlab::cuda_ext_linear``.

* :class:`CudaExtFloatKernel`: float16 / bfloat16 activations, every weight format
  (decode-to-half/bf16 tensor-core mma; GEMV for <= 16 tokens, on sm_90 the wide cluster GEMV for
  17-64, GEMM above; past 64 tokens on sm_90 the weight expanded to half / bf16 and multiplied by
  cuBLAS into float32, :func:`gemm_on_cublas`);
* :class:`CudaExtInt8Kernel`: int8 activations (per token or per tensor), every weight
  format (int8 tensor-core mma, exact int32 accumulation; W1.58A8 is BitNet's setting; past 64
  tokens on sm_90 the weight expanded to int8 and multiplied by cuBLAS int8, :func:`gemm_on_cublas`);
* :class:`CudaExtXnorKernel`: binary weights with binary activations (XOR + popcount; from 33 tokens
  AND + popcount ``mma`` on the tensor cores).

Weight granularity per_tensor and per_channel; per_group is left to torch_ref (its
scale changes inside a row, which the fused epilogue does not model).  float32
activations are left to torch_ref too (the tensor cores would round them).

Example::

    kernel = CudaExtFloatKernel()
    prepared = kernel.prepare(packed.to_cuda, BitQuantConfig(weight_bits=1.58, activation_dtype="float16"))
    y = kernel.forward(x.half().cuda(), prepared)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from backends.cuda_ext import layout, ops
from bitcore.config import WEIGHT_BITS, BitQuantConfig
from bitcore.kernels.interface import Availability, BitKernel, check_quantized_input, keys_product
from bitcore.packing import PackedWeight, storage_bits

GRANULARITIES = ("per_tensor", "per_channel")
ACT_GRANULARITIES = ("per_tensor", "per_token")
GEMV_MAX_TOKENS = 16
CLUSTER_MAX_CHUNKS = 256  # kClusterMaxChunks (csrc/bitlab_gemv_cluster.cuh): in_features <= 32768
WIDE_GEMV_MAX_TOKENS = 64  # kClusterWideMaxTokens: the wide cluster GEMV takes 17-64 tokens on sm_90
# Bytes of one slice's staged activations at 8 slices (kClusterStageBytes / kClusterWideStageBytes).
CLUSTER_STAGE_BYTES, CLUSTER_WIDE_STAGE_BYTES = 128 * 1024, 192 * 1024
CUBLAS_MIN_TOKENS = 65  # kCublasMinTokens (csrc/bindings.cpp)
XNOR_MMA_MIN_TOKENS = 33  # kXnorMmaMinTokens (csrc/bitlab_launch.h): W1A1 on the tensor cores from here
# The float GEMM on cuBLAS needs at::mm with an output dtype (torch >= 2.8; BITLAB_HAS_MM_OUT_DTYPE in bindings.cpp).
TORCH_HAS_MM_OUT_DTYPE = torch.torch_version.TorchVersion(torch.__version__) >= (2, 8)
GEMM_ENV = {"int8": "BITLAB_CUDA_INT8_GEMM", "float": "BITLAB_CUDA_FLOAT_GEMM"}
LOW_BIT_FORMATS = (layout.FORMAT_CODE[1], layout.FORMAT_CODE[1.58], layout.FORMAT_CODE[2])  # 1- and 2-bit codes
FORMAT_STORAGE_BITS = {layout.FORMAT_CODE[b]: storage_bits(b) for b in (1, 1.58, 2, 4, 8)}
# csrc/bitlab_gemv_prefetch.cuh: warps per block, mbarrier area, the runtime's reserve per block, and the
# sm_90 shared-memory limits (per block with opt-in, per multiprocessor) where the device does not report them.
PREFETCH_WARPS, PREFETCH_MAX_PIECES, SMEM_RESERVED_PER_BLOCK = 8, 64, 1024
SM90_SMEM_PER_BLOCK, SM90_SMEM_PER_SM = 227 * 1024, 228 * 1024
FLOAT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class CudaExtWeight:
    """A weight prepared for the op: lane tiles (or W1A1 bits), scale and the op's mode codes."""

    wq: torch.Tensor
    scale: torch.Tensor
    fmt: int
    act_mode: int
    out_features: int
    in_features: int
    act_dtype: Optional[torch.dtype]  # float path: the dtype activations are rounded to

    def clone(self) -> "CudaExtWeight":
        """A copy with its own weight storage (benchmarks rotate copies to defeat the L2 cache)."""
        return CudaExtWeight(self.wq.clone(), self.scale, self.fmt, self.act_mode, self.out_features,
                             self.in_features, self.act_dtype)


class _CudaExtKernel(BitKernel):
    backend = "cuda_ext"
    devices = frozenset({"cuda"})
    priority = 100

    def availability(self) -> Availability:
        return ops.availability()

    def _check_packed(self, packed: PackedWeight) -> None:
        if packed.granularity not in GRANULARITIES:
            raise ValueError(
                f"{self.name}: weight granularity {packed.granularity!r} is not served; expected one of {list(GRANULARITIES)}"
            )
        if packed.device.type != "cuda":
            raise ValueError(f"{self.name}: packed weight is on {packed.device}; move it to a CUDA device first")

    def route(self, batch: int, prepared: "CudaExtWeight" = None) -> str:
        """Which kernel serves ``batch`` tokens; with ``prepared``, also which GEMV (:func:`gemv_kernel`)."""
        name = type(self).__name__
        if prepared is not None and gemm_on_cublas(prepared, batch):
            return f"{name}.gemm_cublas"
        if batch > GEMV_MAX_TOKENS:
            if prepared is None:  # the wide cluster GEMV and cuBLAS depend on the device and in_features
                if batch >= CUBLAS_MIN_TOKENS:
                    return f"{name}.gemm_cublas (sm_90+) or gemm"
                return f"{name}.gemv_cluster or gemm_cublas (sm_90+) or gemm"
            return f"{name}.gemv_cluster" if gemv_kernel(prepared, batch) == "cluster" else f"{name}.gemm"
        if prepared is None:
            return f"{name}.gemv"
        return f"{name}.gemv_{gemv_kernel(prepared, batch)}"

    def _check_inputs(self, x, prepared: CudaExtWeight, bias, activation) -> None:
        # Every input is checked here, before the op: a failed check inside the op's C++ code took
        # the whole process down on the GPU machine (segfault at the throw; docs/reliability.md).
        if x.device != prepared.wq.device:
            raise ValueError(f"{self.name}: input is on {x.device}, the prepared weight on {prepared.wq.device}")
        if x.shape[-1] != prepared.in_features:
            raise ValueError(f"{self.name}: x has {x.shape[-1]} features, expected in_features={prepared.in_features}")
        if activation not in ops.EPILOGUE_CODE:
            raise ValueError(f"activation: got {activation!r}; allowed values are {list(ops.EPILOGUE_CODE)}")
        if bias is not None and (bias.numel() != prepared.out_features or bias.device != x.device):
            raise ValueError(f"{self.name}: bias must have out_features={prepared.out_features} elements on "
                             f"{x.device}; got {tuple(bias.shape)} on {bias.device}")

    def forward(self, x, prepared: CudaExtWeight, bias=None, activation="none"):
        if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"{self.name}: x dtype {x.dtype} is not served; expected float16, bfloat16 or float32")
        self._check_inputs(x, prepared, bias, activation)
        x2 = x.reshape(-1, prepared.in_features)
        xa = x2 if prepared.act_dtype is None else x2.to(prepared.act_dtype)
        y = ops.linear(xa, prepared.wq, prepared.scale, bias, prepared.fmt, prepared.act_mode,
                       ops.EPILOGUE_CODE[activation], prepared.out_features, prepared.in_features, x.dtype)
        return y.reshape(*x.shape[:-1], prepared.out_features)


class CudaExtFloatKernel(_CudaExtKernel):
    """float16 / bfloat16 activations x {binary, ternary, int2, int4, int8} weights on tensor cores."""

    keys = keys_product(WEIGHT_BITS, ["float16", "bfloat16"], GRANULARITIES)

    def prepare(self, packed: PackedWeight, config: BitQuantConfig) -> CudaExtWeight:
        self._check_packed(packed)
        return CudaExtWeight(
            wq=layout.lane_tiles(packed, "float"),
            scale=packed.scale.contiguous(),
            fmt=layout.FORMAT_CODE[packed.weight_bits],
            act_mode=ops.ACT_FLOAT,
            out_features=packed.out_features,
            in_features=packed.in_features,
            act_dtype=FLOAT_DTYPES[config.activation_dtype],
        )


class CudaExtInt8Kernel(_CudaExtKernel):
    """int8 absmax activations (per token / per tensor) x every weight format, int8 tensor cores."""

    keys = keys_product(WEIGHT_BITS, ["int8"], GRANULARITIES, ACT_GRANULARITIES)

    def prepare(self, packed: PackedWeight, config: BitQuantConfig) -> CudaExtWeight:
        self._check_packed(packed)
        per_token = config.activation_granularity == "per_token"
        return CudaExtWeight(
            wq=layout.lane_tiles(packed, "int8"),
            scale=packed.scale.contiguous(),
            fmt=layout.FORMAT_CODE[packed.weight_bits],
            act_mode=ops.ACT_INT8_PER_TOKEN if per_token else ops.ACT_INT8_PER_TENSOR,
            out_features=packed.out_features,
            in_features=packed.in_features,
            act_dtype=None,
        )


    def accepts_quantized(self, prepared: CudaExtWeight) -> bool:
        return True

    def forward_quantized(self, xq, x_scale, prepared: CudaExtWeight, bias=None, activation="none",
                          out_dtype=torch.float32):
        check_quantized_input(xq, x_scale, prepared.in_features)
        self._check_inputs(xq, prepared, bias, activation)
        if out_dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"{self.name}: out_dtype {out_dtype} is not served; expected float16, bfloat16 or float32")
        return ops.linear_int8(xq, x_scale.reshape(-1), prepared.wq, prepared.scale, bias, prepared.fmt,
                               ops.EPILOGUE_CODE[activation], prepared.out_features, prepared.in_features, out_dtype)


class CudaExtXnorKernel(_CudaExtKernel):
    """Binary weights x binary activations (W1A1), exact integer counts: XOR + popcount on the CUDA cores,
    or from :data:`XNOR_MMA_MIN_TOKENS` tokens on sm_80+ AND + popcount ``mma`` (.b1) on the tensor cores."""

    keys = keys_product([1], ["binary"], GRANULARITIES, ACT_GRANULARITIES)

    def route(self, batch: int) -> str:
        """``...popcount`` or ``...mma``, as ``xnor_on_tensor_cores`` (csrc/xnor.cu) decides;
        ``BITLAB_CUDA_XNOR=popcount`` / ``mma`` forces one on sm_80+."""
        if not torch.cuda.is_available():
            return "CudaExtXnorKernel.popcount or mma (sm_80+, from 33 tokens)"
        if torch.cuda.get_device_capability()[0] < 8:
            return "CudaExtXnorKernel.popcount"
        forced = os.environ.get("BITLAB_CUDA_XNOR", "")
        mma = forced == "mma" or (forced != "popcount" and batch >= XNOR_MMA_MIN_TOKENS)
        return "CudaExtXnorKernel.mma" if mma else "CudaExtXnorKernel.popcount"

    def prepare(self, packed: PackedWeight, config: BitQuantConfig) -> CudaExtWeight:
        self._check_packed(packed)
        per_token = config.activation_granularity == "per_token"
        return CudaExtWeight(
            wq=layout.xnor_bits(packed),
            scale=packed.scale.contiguous(),
            fmt=layout.FORMAT_CODE[1],
            act_mode=ops.ACT_BINARY_PER_TOKEN if per_token else ops.ACT_BINARY_PER_TENSOR,
            out_features=packed.out_features,
            in_features=packed.in_features,
            act_dtype=None,
        )


KERNELS = (CudaExtFloatKernel, CudaExtInt8Kernel, CudaExtXnorKernel)


def cluster_gemv_fits(prepared: CudaExtWeight, tokens: int) -> bool:
    """Whether a slice of the cluster GEMV's staged activations fits at 8 slices (``cluster_gemv_fits``
    in csrc/bitlab_gemv_cluster.cuh): in_features <= 32768, and for 17-64 tokens at most 192 KB per
    slice (float activations at 64 tokens: in_features <= 12288)."""
    chunks = -(-prepared.in_features // 128)
    x_bytes = 2 if prepared.act_mode == ops.ACT_FLOAT else 1
    limit = CLUSTER_WIDE_STAGE_BYTES if tokens > GEMV_MAX_TOKENS else CLUSTER_STAGE_BYTES
    return chunks <= CLUSTER_MAX_CHUNKS and -(-chunks // 8) * tokens * 128 * x_bytes <= limit


def prefetch_gemv_mt(prepared: CudaExtWeight, sms: int, smem_per_block: int = SM90_SMEM_PER_BLOCK,
                     smem_per_sm: int = SM90_SMEM_PER_SM) -> int:
    """m-tiles per block of the prefetch-all GEMV (``prefetch_gemv_mt`` in csrc/bitlab_gemv_prefetch.cuh),
    0 where no plan keeps the layer's whole weight resident in one wave of blocks' shared memory: the
    largest of 4, 2, 1 resident with blocks for >= 95 % of the ``sms`` multiprocessors, else the smallest
    resident one.  ``BITLAB_CUDA_PREFETCH_MT=1/2/4`` forces one where it is resident.  The shared-memory
    limits are the device's (``gemv_kernel`` reads them off its properties; sm_90 values by default)."""
    chunks = -(-prepared.in_features // 128)
    warps = min(chunks, PREFETCH_WARPS)
    if warps < 1 or -(-chunks // warps) > PREFETCH_MAX_PIECES:
        return 0
    tiles = -(-prepared.out_features // 128) * 8
    tile_bytes = 128 * 2 * FORMAT_STORAGE_BITS[prepared.fmt]

    def resident_blocks(mt: int) -> int:
        smem = PREFETCH_MAX_PIECES * 8 + mt * chunks * tile_bytes + warps * mt * 4 * 32 * 4
        if smem > smem_per_block:
            return 0
        return 2 if 2 * (smem + SMEM_RESERVED_PER_BLOCK) <= smem_per_sm else 1

    occ = {mt: resident_blocks(mt) for mt in (1, 2, 4)}
    forced = os.environ.get("BITLAB_CUDA_PREFETCH_MT", "")[:1]
    if forced in ("1", "2", "4"):
        return int(forced) if occ[int(forced)] else 0
    fallback = 0
    for mt in (4, 2, 1):
        blocks = tiles // mt
        if not occ[mt] or blocks > occ[mt] * sms:
            continue
        if blocks * 100 >= 95 * sms:
            return mt
        fallback = mt
    return fallback


def gemm_on_cublas(prepared: CudaExtWeight, tokens: int) -> bool:
    """Whether ``tokens`` rows take a GEMM on cuBLAS (``gemm_on_cublas`` in csrc/bindings.cpp): the weight
    expanded to exact code values (int8 for int8 activations, half / bf16 for float ones), cuBLAS (int8 ->
    int32, or half / bf16 -> float32), then our epilogue.  On sm_90+ from CUBLAS_MIN_TOKENS tokens, and from 17
    where the wide cluster GEMV does not take them (:func:`gemv_kernel` says ``"gemm"``: rows too long, or
    ``BITLAB_CUDA_GEMV=oneshot`` / ``bulk``); ``BITLAB_CUDA_INT8_GEMM`` / ``BITLAB_CUDA_FLOAT_GEMM`` ``=mma``
    never, ``=cublas`` from 17 tokens on any device.  W1A1 (binary activations) never; float activations
    never before torch 2.8."""
    if prepared.act_mode in (ops.ACT_INT8_PER_TOKEN, ops.ACT_INT8_PER_TENSOR):
        forced = os.environ.get(GEMM_ENV["int8"], "")
    elif prepared.act_mode == ops.ACT_FLOAT:
        if not TORCH_HAS_MM_OUT_DTYPE:
            return False
        forced = os.environ.get(GEMM_ENV["float"], "")
    else:
        return False
    if forced == "mma" or tokens <= GEMV_MAX_TOKENS:
        return False
    if forced == "cublas":
        return True
    if tokens < CUBLAS_MIN_TOKENS and gemv_kernel(prepared, tokens) == "cluster":
        return False
    major, _ = torch.cuda.get_device_capability(prepared.wq.device)
    return major >= 9


def gemv_kernel(prepared: CudaExtWeight, tokens: int = 1) -> str:
    """The GEMV that ``csrc/bitlab_linear.cuh`` (launch_linear_fmt) runs for this weight and token count,
    on sm_90+ (below it always ``"oneshot"``, and past 16 tokens the GEMM); "m-tiles" are 16-row tiles,
    counted per multiprocessor.  17-64 tokens: ``"cluster"`` (its wide variant) where
    :func:`cluster_gemv_fits`, else ``"gemm"`` (also when ``BITLAB_CUDA_GEMV=oneshot`` / ``bulk``; on sm_90
    that GEMM runs on cuBLAS, :func:`gemm_on_cublas`).  1-16 tokens:

    * ``"prefetch"`` (the whole weight requested into shared memory at the start) for float activations,
      1- or 2-bit weights, 1-8 tokens, at least 6 m-tiles per multiprocessor and in_features <= 4096,
      where :func:`prefetch_gemv_mt` finds a resident plan;
    * ``"cluster"`` (thread-block clusters split K, activations staged once per 256 or 512 rows), for
      in_features <= 32768 and: float activations with 9-16 tokens and at least 6 m-tiles per
      multiprocessor or in_features >= 6144, with 2-8 tokens and at least 6 m-tiles per multiprocessor, or
      with one token and at least 6 (4- and 8-bit weights) or 32 (1- and 2-bit) m-tiles per multiprocessor;
      int8 activations with 9-16 tokens and at least 6 m-tiles per multiprocessor;
    * ``"bulk"`` (bulk-copy ring) for float activations, 1- or 2-bit weights, at least 6 m-tiles per
      multiprocessor, in_features >= 4096 and one token (or more than 8 tokens where the cluster GEMV
      does not fit);
    * else ``"oneshot"``.

    ``BITLAB_CUDA_GEMV=oneshot`` / ``bulk`` / ``cluster`` / ``prefetch`` forces one, as the C++ does
    (``cluster`` still needs in_features <= 32768, ``prefetch`` a resident plan and 1-8 tokens; else the
    one-shot kernel runs, and past 16 tokens the GEMM)."""
    major, _ = torch.cuda.get_device_capability(prepared.wq.device)
    forced = os.environ.get("BITLAB_CUDA_GEMV", "")
    if tokens > GEMV_MAX_TOKENS:
        wide = (major >= 9 and tokens <= WIDE_GEMV_MAX_TOKENS and forced not in ("oneshot", "bulk", "prefetch")
                and cluster_gemv_fits(prepared, tokens))
        return "cluster" if wide else "gemm"
    if major < 9:
        return "oneshot"
    chunks = -(-prepared.in_features // 128)
    cluster_fits = chunks <= CLUSTER_MAX_CHUNKS
    if forced == "cluster":
        return "cluster" if cluster_fits else "oneshot"
    if forced in ("oneshot", "bulk"):
        return forced
    tiles = -(-prepared.out_features // 128) * 8
    sms = torch.cuda.get_device_properties(prepared.wq.device).multi_processor_count
    many_tiles = tiles >= 6 * sms
    prefetch_pays = (prepared.act_mode == ops.ACT_FLOAT and prepared.fmt in LOW_BIT_FORMATS and many_tiles
                     and chunks <= 32)
    props = torch.cuda.get_device_properties(prepared.wq.device)
    smem = (getattr(props, "shared_memory_per_block_optin", SM90_SMEM_PER_BLOCK),
            getattr(props, "shared_memory_per_multiprocessor", SM90_SMEM_PER_SM))
    if tokens <= 8 and (forced == "prefetch" or prefetch_pays) and prefetch_gemv_mt(prepared, sms, *smem):
        return "prefetch"
    if forced == "prefetch":
        return "oneshot"
    if prepared.act_mode == ops.ACT_FLOAT and tokens == 1:
        cluster_pays = tiles >= (6 if prepared.fmt not in LOW_BIT_FORMATS else 32) * sms
    elif prepared.act_mode == ops.ACT_FLOAT:
        cluster_pays = (many_tiles or chunks >= 48) if tokens > 8 else many_tiles
    else:
        cluster_pays = tokens > 8 and many_tiles
    if cluster_fits and cluster_pays:
        return "cluster"
    pays = (prepared.act_mode == ops.ACT_FLOAT and prepared.fmt in LOW_BIT_FORMATS and many_tiles
            and chunks >= 32 and (tokens == 1 or tokens > 8))
    return "bulk" if pays else "oneshot"

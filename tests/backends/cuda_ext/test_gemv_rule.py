"""The GEMV choice mirrored in Python (kernels.gemv_kernel) on a simulated H100 and A100: runs without a GPU.

The C++ launcher (csrc/bitlab_linear.cuh, launch_linear_fmt) applies the same rule; the GPU test
test_route_names_the_gemv_it_runs checks both agree on a real device.
"""
import pytest
import torch

from backends.cuda_ext import kernels, layout, ops

H100_SMS = 132


@pytest.fixture
def device(monkeypatch):
    """A fake CUDA device: capability and multiprocessor count (prepared weights stay on the CPU)."""
    state = {"major": 9}

    class Props:
        multi_processor_count = H100_SMS

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (state["major"], 0))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: Props())
    monkeypatch.delenv("BITLAB_CUDA_GEMV", raising=False)
    return state


def weight(out_features, in_features, act="float", bits=1.58):
    return kernels.CudaExtWeight(
        wq=torch.empty(1, dtype=torch.int32), scale=torch.ones(1), fmt=layout.FORMAT_CODE[bits],
        act_mode=ops.ACT_FLOAT if act == "float" else ops.ACT_INT8_PER_TOKEN,
        out_features=out_features, in_features=in_features, act_dtype=None,
    )


@pytest.mark.parametrize("bits, shape, expected", [
    # one token, float activations, 4- and 8-bit weights: cluster from 6 tiles per multiprocessor
    (4, (128256, 2560), "cluster"),
    (8, (32000, 4096), "cluster"),
    (4, (13824, 2560), "cluster"),   # 864 tiles >= 6 x 132
    (4, (8192, 8192), "oneshot"),    # 512 tiles
    (8, (8192, 8192), "oneshot"),
])
def test_one_token_rule_for_wider_weights(device, bits, shape, expected):
    assert kernels.gemv_kernel(weight(*shape, bits=bits), 1) == expected


@pytest.mark.parametrize("shape, act, tokens, expected", [
    # one token: bulk for many tiles and long K, else one-shot
    ((28672, 8192), "float", 1, "bulk"),
    ((8192, 8192), "float", 1, "oneshot"),
    ((13824, 2560), "int8", 1, "oneshot"),
    ((28672, 8192), "int8", 1, "oneshot"),
    # one token, float activations: cluster for 1- and 2-bit weights with >= 32 tiles per multiprocessor
    ((128256, 2560), "float", 1, "cluster"),
    ((67584, 2560), "float", 1, "cluster"),      # 4224 tiles = 32 x 132
    ((67456, 2560), "float", 1, "oneshot"),      # one 128-row block fewer
    ((128256, 2560), "int8", 1, "oneshot"),
    # 2-8 tokens: cluster for float activations with >= 6 tiles per multiprocessor
    ((28672, 8192), "float", 8, "cluster"),
    ((3840, 2560), "float", 2, "oneshot"),
    ((8192, 8192), "float", 8, "oneshot"),
    ((28672, 8192), "int8", 8, "oneshot"),
    # 1-8 tokens, float activations, 1- and 2-bit weights, many tiles, K <= 4096: the prefetch GEMV where
    # the whole weight is resident in one wave (here 4 m-tiles per block, 2 blocks per multiprocessor)
    ((13824, 2560), "float", 1, "prefetch"),
    ((13824, 2560), "float", 2, "prefetch"),
    ((14336, 4096), "float", 1, "prefetch"),
    ((14336, 4096), "float", 8, "prefetch"),
    ((14336, 4096), "float", 9, "cluster"),
    ((14336, 4096), "int8", 1, "oneshot"),
    ((14336, 4224), "float", 1, "bulk"),         # 33 chunks: past the prefetch rule
    ((34816, 4096), "float", 1, "bulk"),         # 544 blocks at 4 m-tiles: not resident
    ((34816, 4096), "float", 8, "cluster"),
    # 9-16 tokens: float with many tiles or K >= 6144; int8 with many tiles
    ((8192, 8192), "float", 16, "cluster"),
    ((2560, 6912), "float", 16, "cluster"),
    ((4096, 4096), "float", 16, "oneshot"),
    ((3840, 2560), "float", 9, "oneshot"),
    ((14336, 4096), "int8", 16, "cluster"),
    ((8192, 8192), "int8", 16, "oneshot"),
    # K past the cluster kernel's shared memory: the bulk kernel takes 9-16 float tokens
    ((28672, 40000), "float", 16, "bulk"),
    ((28672, 40000), "int8", 16, "oneshot"),
    # 17-64 tokens: the wide cluster GEMV where 8 slices of staged activations fit in 192 KB, else the GEMM
    ((3840, 2560), "int8", 17, "cluster"),
    ((2560, 6912), "int8", 64, "cluster"),
    ((13824, 2560), "float", 33, "cluster"),
    ((4096, 12288), "float", 64, "cluster"),     # 12 chunks per slice x 64 rows x 256 B = 192 KB
    ((4096, 12416), "float", 64, "gemm"),        # one chunk more
    ((4096, 12416), "float", 32, "cluster"),
    ((4096, 24576), "int8", 64, "cluster"),
    ((4096, 32768), "int8", 64, "gemm"),
    ((28672, 8192), "float", 65, "gemm"),        # past 64 tokens
])
def test_rule_on_hopper(device, shape, act, tokens, expected):
    assert kernels.gemv_kernel(weight(*shape, act=act), tokens) == expected


def test_prefetch_plans(device, monkeypatch):
    # m-tiles per block: the largest resident one with blocks for >= 95 % of the multiprocessors
    assert kernels.prefetch_gemv_mt(weight(13824, 2560), H100_SMS) == 4   # 216 blocks, 2 per multiprocessor
    assert kernels.prefetch_gemv_mt(weight(8192, 8192), H100_SMS) == 4    # 128 blocks of 144 KB, 1 each
    assert kernels.prefetch_gemv_mt(weight(4096, 4096), H100_SMS) == 2    # 128 blocks (4: 64, too few)
    assert kernels.prefetch_gemv_mt(weight(3840, 2560), H100_SMS) == 1    # 2 m-tiles: 120 blocks < 95 %
    assert kernels.prefetch_gemv_mt(weight(2560, 2560), H100_SMS) == 1
    assert kernels.prefetch_gemv_mt(weight(1024, 2560), H100_SMS) == 1    # 64 blocks: resident, idle SMs
    assert kernels.prefetch_gemv_mt(weight(28672, 8192), H100_SMS) == 0   # 58.7 MB: never resident
    assert kernels.prefetch_gemv_mt(weight(8192, 8192, bits=8), H100_SMS) == 0
    assert kernels.prefetch_gemv_mt(weight(64, 128 * 513), H100_SMS) == 0  # more than 64 pieces
    # a device with 99 KB per block and 100 KB per multiprocessor: fewer plans are resident
    small_smem = (H100_SMS, 99 * 1024, 100 * 1024)
    assert kernels.prefetch_gemv_mt(weight(8192, 8192), *small_smem) == 0
    assert kernels.prefetch_gemv_mt(weight(13824, 2560), *small_smem) == 0
    assert kernels.prefetch_gemv_mt(weight(2560, 2560), *small_smem) == 1
    monkeypatch.setenv("BITLAB_CUDA_PREFETCH_MT", "2")
    assert kernels.prefetch_gemv_mt(weight(13824, 2560), H100_SMS) == 2
    monkeypatch.setenv("BITLAB_CUDA_PREFETCH_MT", "4")  # forced: any plan whose block fits, in several waves
    assert kernels.prefetch_gemv_mt(weight(28672, 8192), H100_SMS) == 4
    assert kernels.prefetch_gemv_mt(weight(8192, 8192, bits=8), H100_SMS) == 0  # 512 KB per block


def test_forcing_and_older_devices(device, monkeypatch):
    big = weight(28672, 8192)
    monkeypatch.setenv("BITLAB_CUDA_GEMV", "prefetch")
    assert kernels.gemv_kernel(weight(8192, 8192), 1) == "prefetch"
    assert kernels.gemv_kernel(weight(8192, 8192, act="int8"), 8) == "prefetch"
    assert kernels.gemv_kernel(weight(8192, 8192), 9) == "oneshot"
    assert kernels.gemv_kernel(big, 1) == "oneshot"  # not resident
    assert kernels.gemv_kernel(big, 17) == "gemm"
    monkeypatch.setenv("BITLAB_CUDA_GEMV", "cluster")
    assert kernels.gemv_kernel(big, 1) == "cluster"
    assert kernels.gemv_kernel(weight(64, 40000), 16) == "oneshot"  # too long for the cluster kernel
    monkeypatch.setenv("BITLAB_CUDA_GEMV", "oneshot")
    assert kernels.gemv_kernel(big, 16) == "oneshot"
    assert kernels.gemv_kernel(big, 17) == "gemm"  # past 16 tokens "oneshot" / "bulk" leave the wide GEMV
    monkeypatch.setenv("BITLAB_CUDA_GEMV", "bulk")
    assert kernels.gemv_kernel(big, 64) == "gemm"
    monkeypatch.delenv("BITLAB_CUDA_GEMV")
    device["major"] = 8  # sm_80: neither the bulk, the cluster nor the prefetch kernel exists there
    assert {kernels.gemv_kernel(big, t) for t in (1, 8, 16)} == {"oneshot"}
    assert {kernels.gemv_kernel(big, t) for t in (17, 64)} == {"gemm"}


def test_route_names_kernel_and_gemv(device, monkeypatch):
    monkeypatch.delenv("BITLAB_CUDA_FLOAT_GEMM", raising=False)
    kernel = kernels.CudaExtFloatKernel()
    big = weight(28672, 8192)
    assert kernel.route(16, big) == "CudaExtFloatKernel.gemv_cluster"
    assert kernel.route(1, big) == "CudaExtFloatKernel.gemv_bulk"
    assert kernel.route(17, big) == "CudaExtFloatKernel.gemv_cluster"
    assert kernel.route(64, big) == "CudaExtFloatKernel.gemv_cluster"
    assert kernel.route(65, big) == "CudaExtFloatKernel.gemm_cublas"
    assert kernel.route(64) == "CudaExtFloatKernel.gemv_cluster or gemm_cublas (sm_90+) or gemm"  # no weight
    assert kernel.route(65) == "CudaExtFloatKernel.gemm_cublas (sm_90+) or gemm"
    device["major"] = 8
    assert kernel.route(17, big) == "CudaExtFloatKernel.gemm"
    assert kernel.route(65, big) == "CudaExtFloatKernel.gemm"


@pytest.mark.parametrize("env", ["BITLAB_CUDA_INT8_GEMM", "BITLAB_CUDA_FLOAT_GEMM"])
def test_the_other_paths_forcing_changes_nothing(device, monkeypatch, env):
    # Each activation kind reads its own variable: forcing one leaves the other on its default rule.
    ik, fk = kernels.CudaExtInt8Kernel(), kernels.CudaExtFloatKernel()
    big8, bigf = weight(8192, 8192, act="int8"), weight(8192, 8192)
    monkeypatch.delenv("BITLAB_CUDA_INT8_GEMM", raising=False)
    monkeypatch.delenv("BITLAB_CUDA_FLOAT_GEMM", raising=False)
    monkeypatch.setenv(env, "mma")
    forced, other = (ik, fk) if env.endswith("INT8_GEMM") else (fk, ik)
    forced_w, other_w = (big8, bigf) if forced is ik else (bigf, big8)
    assert forced.route(2048, forced_w).endswith(".gemm")
    assert other.route(2048, other_w).endswith(".gemm_cublas")


def test_float_activations_keep_the_mma_gemm_before_torch_2_8(device, monkeypatch):
    monkeypatch.delenv("BITLAB_CUDA_FLOAT_GEMM", raising=False)
    monkeypatch.setattr(kernels, "TORCH_HAS_MM_OUT_DTYPE", False)
    fk, ik = kernels.CudaExtFloatKernel(), kernels.CudaExtInt8Kernel()
    assert fk.route(2048, weight(8192, 8192)) == "CudaExtFloatKernel.gemm"
    assert ik.route(2048, weight(8192, 8192, act="int8")) == "CudaExtInt8Kernel.gemm_cublas"
    monkeypatch.setenv("BITLAB_CUDA_FLOAT_GEMM", "cublas")
    assert fk.route(2048, weight(8192, 8192)) == "CudaExtFloatKernel.gemm"


def test_binary_activations_never_take_cublas(device):
    w1a1 = kernels.CudaExtWeight(wq=torch.empty(1, dtype=torch.int32), scale=torch.ones(1), fmt=0,
                                 act_mode=ops.ACT_BINARY_PER_TOKEN, out_features=8192, in_features=8192, act_dtype=None)
    assert not kernels.gemm_on_cublas(w1a1, 4096)


def test_int8_activations_take_cublas_past_the_wide_gemv_on_hopper(device, monkeypatch):
    monkeypatch.delenv("BITLAB_CUDA_INT8_GEMM", raising=False)
    monkeypatch.delenv("BITLAB_CUDA_FLOAT_GEMM", raising=False)
    ik, fk = kernels.CudaExtInt8Kernel(), kernels.CudaExtFloatKernel()
    big8, bigf = weight(8192, 8192, act="int8"), weight(8192, 8192)
    assert ik.route(2048, big8) == "CudaExtInt8Kernel.gemm_cublas"
    assert ik.route(kernels.CUBLAS_MIN_TOKENS, big8) == "CudaExtInt8Kernel.gemm_cublas"
    assert kernels.CUBLAS_MIN_TOKENS == kernels.WIDE_GEMV_MAX_TOKENS + 1
    assert ik.route(64, big8) == "CudaExtInt8Kernel.gemv_cluster"
    # 17-64 tokens where the wide GEMV does not fit (or is switched off): cuBLAS too
    assert ik.route(64, weight(4096, 32768, act="int8")) == "CudaExtInt8Kernel.gemm_cublas"
    assert fk.route(64, weight(4096, 12416)) == "CudaExtFloatKernel.gemm_cublas"
    assert fk.route(32, weight(4096, 12416)) == "CudaExtFloatKernel.gemv_cluster"
    assert ik.route(16, weight(4096, 32768, act="int8")).startswith("CudaExtInt8Kernel.gemv_")
    monkeypatch.setenv("BITLAB_CUDA_GEMV", "oneshot")
    assert ik.route(17, big8) == "CudaExtInt8Kernel.gemm_cublas"
    monkeypatch.setenv("BITLAB_CUDA_INT8_GEMM", "mma")
    assert ik.route(17, big8) == "CudaExtInt8Kernel.gemm"
    monkeypatch.delenv("BITLAB_CUDA_INT8_GEMM")
    monkeypatch.delenv("BITLAB_CUDA_GEMV")
    assert ik.route(65, weight(4096, 32768, act="int8")) == "CudaExtInt8Kernel.gemm_cublas"
    assert fk.route(2048, bigf) == "CudaExtFloatKernel.gemm_cublas"
    assert fk.route(65, weight(4096, 32768)) == "CudaExtFloatKernel.gemm_cublas"  # past the wide GEMV's limit too
    assert ik.route(2048) == "CudaExtInt8Kernel.gemm_cublas (sm_90+) or gemm"
    device["major"] = 8
    assert ik.route(2048, big8) == "CudaExtInt8Kernel.gemm"
    assert fk.route(2048, bigf) == "CudaExtFloatKernel.gemm"


def test_int8_gemm_forcing(device, monkeypatch):
    ik, big8 = kernels.CudaExtInt8Kernel(), weight(8192, 8192, act="int8")
    monkeypatch.setenv("BITLAB_CUDA_INT8_GEMM", "mma")
    assert ik.route(4096, big8) == "CudaExtInt8Kernel.gemm"
    monkeypatch.setenv("BITLAB_CUDA_INT8_GEMM", "cublas")
    assert ik.route(17, big8) == "CudaExtInt8Kernel.gemm_cublas"  # ahead of the wide cluster GEMV
    assert ik.route(16, big8) == "CudaExtInt8Kernel.gemv_oneshot"  # torch._int_mm needs more than 16 rows
    device["major"] = 8
    assert ik.route(17, big8) == "CudaExtInt8Kernel.gemm_cublas"


def test_w1a1_route_mirrors_the_launcher(device, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("BITLAB_CUDA_XNOR", raising=False)
    kernel = kernels.CudaExtXnorKernel()
    assert kernel.route(32) == "CudaExtXnorKernel.popcount"
    assert kernel.route(33) == "CudaExtXnorKernel.mma"
    monkeypatch.setenv("BITLAB_CUDA_XNOR", "popcount")
    assert kernel.route(2048) == "CudaExtXnorKernel.popcount"
    monkeypatch.setenv("BITLAB_CUDA_XNOR", "mma")
    assert kernel.route(1) == "CudaExtXnorKernel.mma"
    device["major"] = 7  # no .b1 AND + popcount mma before sm_80
    assert kernel.route(2048) == "CudaExtXnorKernel.popcount"

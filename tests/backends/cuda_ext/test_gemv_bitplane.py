"""The bit-plane GEMV (csrc/gemv_bitplane.cu) on a CUDA device: equal, bit for bit, to the int8 path and
to torch_ref; chosen only where the weight has plane tiles and 1-8 tokens; bad inputs named."""
import pytest
import torch

from backends.torch_ref.kernels import TorchReferenceKernel
from bitcore.config import BitQuantConfig

from .test_cuda_ext_kernels import make_packed

pytestmark = pytest.mark.gpu

REF = TorchReferenceKernel()
# (out_features, in_features): odd sizes, one 256-input chunk, K off the 256 step, and BitNet 2B's shapes.
SHAPES = [(1, 1), (70, 300), (130, 257), (16, 256), (1000, 129), (3840, 2560), (2560, 6912), (13824, 2560)]


@pytest.fixture
def planes_on(cuda_ext_ops, monkeypatch):
    monkeypatch.setenv("BITLAB_CUDA_BITPLANE", "1")
    from backends.cuda_ext import kernels

    return kernels


def config(gran, act_gran):
    return BitQuantConfig(weight_bits=1.58, activation_dtype="int8", weight_granularity=gran,
                          activation_granularity=act_gran)


@pytest.mark.parametrize("mt", ["auto", "1", "2", "4"])
@pytest.mark.parametrize("act_gran", ["per_tensor", "per_token"])
@pytest.mark.parametrize("gran", ["per_tensor", "per_channel"])
def test_bitplane_equals_int8_path_and_reference(planes_on, monkeypatch, gran, act_gran, mt):
    if mt != "auto":
        monkeypatch.setenv("BITLAB_CUDA_BITPLANE_MT", mt)
    kernel, cfg = planes_on.CudaExtInt8Kernel(), config(gran, act_gran)
    for n, k in SHAPES:
        packed = make_packed(1.58, gran, n, k)
        prep = kernel.prepare(packed, cfg)
        assert prep.planes is not None
        plain = planes_on.CudaExtWeight(prep.wq, prep.scale, prep.fmt, prep.act_mode, n, k, None)
        rprep = REF.prepare(packed, cfg)
        for m in range(1, 9):
            assert kernel.route(m, prep).endswith("gemv_bitplane")
            x = torch.randn(m, k, device="cuda", dtype=torch.float16) * 3
            bias = torch.randn(n, device="cuda")
            y = kernel.forward(x, prep, bias, "relu")
            assert torch.equal(y, REF.forward(x, rprep, bias, "relu")), (n, k, m)
            assert torch.equal(y, kernel.forward(x, plain, bias, "relu")), (n, k, m)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_bitplane_pre_quantized_input(planes_on, out_dtype):
    """forward_quantized (a model's norm quantized the rows): extreme int8 values and exact results."""
    kernel, cfg = planes_on.CudaExtInt8Kernel(), config("per_channel", "per_token")
    for n, k in [(300, 1000), (2560, 2560)]:
        prep = kernel.prepare(make_packed(1.58, "per_channel", n, k), cfg)
        plain = planes_on.CudaExtWeight(prep.wq, prep.scale, prep.fmt, prep.act_mode, n, k, None)
        for m in (1, 2, 5, 8):
            xq = torch.randint(-128, 128, (m, k), device="cuda", dtype=torch.int8)
            xq[:, :3] = torch.tensor([127, -128, -127], dtype=torch.int8)  # every plane, the sign plane's extremes
            scale = torch.rand(m, 1, device="cuda") + 0.01
            y = kernel.forward_quantized(xq, scale, prep, None, "relu2", out_dtype)
            assert torch.equal(y, kernel.forward_quantized(xq, scale, plain, None, "relu2", out_dtype)), (n, k, m)


def test_bitplane_not_used_past_8_tokens_or_without_planes(planes_on, monkeypatch):
    kernel, cfg = planes_on.CudaExtInt8Kernel(), config("per_tensor", "per_token")
    packed = make_packed(1.58, "per_tensor", 64, 512)
    prep = kernel.prepare(packed, cfg)
    assert not kernel.route(9, prep).endswith("gemv_bitplane")
    x = torch.randn(9, 512, device="cuda", dtype=torch.float16)
    assert torch.equal(kernel.forward(x, prep), REF.forward(x, REF.prepare(packed, cfg)))
    monkeypatch.delenv("BITLAB_CUDA_BITPLANE")
    assert kernel.prepare(packed, cfg).planes is None
    binary = planes_on.CudaExtInt8Kernel().prepare(make_packed(1, "per_tensor", 64, 512),
                                                   BitQuantConfig(weight_bits=1, activation_dtype="int8"))
    assert binary.planes is None


def test_bitplane_in_cuda_graph(planes_on):
    kernel, cfg = planes_on.CudaExtInt8Kernel(), config("per_channel", "per_token")
    packed = make_packed(1.58, "per_channel", 2560, 6912)
    prep = kernel.prepare(packed, cfg)
    x = torch.randn(1, 6912, device="cuda", dtype=torch.bfloat16)
    kernel.forward(x, prep)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = kernel.forward(x, prep)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, REF.forward(x, REF.prepare(packed, cfg)))

"""The int8 GEMV that normalizes its own input (cuda_ext_linear_norm_int8) on a CUDA device.

Two checks per case: the int8 rows and scales the kernel used (returned by one block) are the torch
definition's (bitcore.normed_input.normed_rows, then per-token quantization) within one quantization
step on rare values (the sum of squares is reduced in another order); and the output equals the
torch_ref product of exactly those rows, bit for bit (the integer path).
"""
import pytest
import torch

from backends.cuda_ext.kernels import CudaExtInt8Kernel
from backends.torch_ref.kernels import TorchReferenceKernel
from bitcore.config import BitQuantConfig
from bitcore.normed_input import NormedInput, normed_rows
from bitcore.quantize import quantize_activation_int8
from tests.backends.cuda_ext.test_cuda_ext_kernels import make_packed

pytestmark = pytest.mark.gpu

MODES = {0: "norm", 1: "add_norm", 2: "relu2_gate_norm"}
# (tokens, in_features, out_features): K past the 128-column chunks, one and two m-tiles per block,
# BitNet 2B's projections (2560 -> 3840, 6912 -> 2560).
SHAPES = [(1, 7, 33), (3, 300, 130), (1, 2560, 3840), (8, 4097, 200), (5, 6912, 2560), (2, 129, 16), (4, 2560, 13824)]
REF = TorchReferenceKernel()


def config(bits=1.58, granularity="per_channel"):
    return BitQuantConfig(weight_bits=bits, activation_dtype="int8", weight_granularity=granularity,
                          activation_granularity="per_token")


def inputs(m, k, mode, dtype, strided=False):
    """a, b for the mode; with ``strided`` a and b are the halves of one [m, 2k] tensor (fused gate/up)."""
    if strided:
        a, b = (torch.randn(m, 2 * k, device="cuda") * 2).to(dtype).split(k, dim=-1)
    else:
        a, b = (torch.randn(m, k, device="cuda") * 2).to(dtype), torch.randn(m, k, device="cuda").to(dtype)
    weight = (torch.rand(k, device="cuda") + 0.5).to(dtype)
    return a, (b if mode else None), weight


def check_case(cuda_ext_ops, bits, m, k, n, mode, dtype, out_dtype=torch.bfloat16, strided=False):
    packed = make_packed(bits, "per_channel", n, k)
    cfg = config(bits)
    prep, rprep = CudaExtInt8Kernel().prepare(packed, cfg), REF.prepare(packed, cfg)
    a, b, weight = inputs(m, k, mode, dtype, strided)
    bias = torch.randn(n, device="cuda")
    y, h, q, scale = cuda_ext_ops.linear_norm_int8(a, b, weight, 1e-5, mode, prep.wq, prep.scale, bias, prep.fmt, 1,
                                                   n, k, out_dtype, return_quantized=True)
    x, rh = normed_rows(NormedInput(a, b, weight, 1e-5, MODES[mode]))
    rq, rscale = quantize_activation_int8(x, "per_token")
    if mode == 1:
        assert torch.equal(h, rh), (m, k)
    else:
        assert h.numel() == 0
    diff = (q.int() - rq.int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 0.01, (m, k, diff.max().item(), diff.float().mean().item())
    assert torch.allclose(scale, rscale.reshape(-1), rtol=1e-2, atol=0), (m, k)
    expected = REF.forward_quantized(q, scale.reshape(-1, 1), rprep, bias, "relu", out_dtype)
    assert y.dtype == out_dtype and torch.equal(y, expected), (bits, m, k, n, mode)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", [0, 1, 2])
def test_matches_the_definition_then_the_integer_product(cuda_ext_ops, mode, dtype):
    for m, k, n in SHAPES:
        check_case(cuda_ext_ops, 1.58, m, k, n, mode, dtype)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_every_weight_format_and_strided_gate_rows(cuda_ext_ops, bits):
    for m, k, n in [(1, 300, 130), (6, 2560, 1000)]:
        check_case(cuda_ext_ops, bits, m, k, n, 2, torch.bfloat16, torch.float32, strided=True)


def test_kernel_forward_normed_and_its_limits(cuda_ext_ops):
    kernel = CudaExtInt8Kernel()
    packed = make_packed(1.58, "per_channel", 96, 640)
    prep = kernel.prepare(packed, config())
    a, b, weight = inputs(3, 640, 1, torch.bfloat16)
    y, h = kernel.forward_normed(NormedInput(a, b, weight, 1e-6, "add_norm"), prep, None, "none", torch.bfloat16)
    x, rh = normed_rows(NormedInput(a, b, weight, 1e-6, "add_norm"))
    assert torch.equal(h, rh)
    ref = kernel.forward(x, prep)  # the two-kernel path: quantize inside, same math
    assert ((y.float() - ref.float()).norm() / ref.float().norm()).item() < 2e-2
    assert kernel.accepts_normed(prep, 8, torch.float16) and not kernel.accepts_normed(prep, 9, torch.float16)
    assert not kernel.accepts_normed(prep, 1, torch.float32)
    per_tensor = kernel.prepare(packed, BitQuantConfig(weight_bits=1.58, activation_dtype="int8",
                                                       weight_granularity="per_channel"))
    assert not kernel.accepts_normed(per_tensor, 1, torch.bfloat16)
    many = torch.randn(9, 640, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="1..8 float16/bfloat16 rows"):
        kernel.forward_normed(NormedInput(many, None, weight, 1e-6, "norm"), prep)
    with pytest.raises(ValueError, match="expected in_features=640"):
        kernel.forward_normed(NormedInput(a[:, :600], None, weight[:600], 1e-6, "norm"), prep)
    with pytest.raises(ValueError, match="mode: got 'gelu'"):
        kernel.forward_normed(NormedInput(a, None, weight, 1e-6, "gelu"), prep)
    with pytest.raises(ValueError, match="needs b like a"):
        kernel.forward_normed(NormedInput(a, None, weight, 1e-6, "add_norm"), prep)
    torch.library.opcheck(torch.ops.bitlab.cuda_ext_linear_norm_int8.default,
                          (a, b, weight, 1e-6, 1, prep.wq, prep.scale, None, prep.fmt, 0, 96, 640, torch.bfloat16, True))


def test_replays_in_a_cuda_graph(cuda_ext_ops):
    packed = make_packed(1.58, "per_channel", 2560, 6912)
    prep = CudaExtInt8Kernel().prepare(packed, config())
    gate, up, weight = inputs(1, 6912, 2, torch.bfloat16, strided=True)

    def run():
        return cuda_ext_ops.linear_norm_int8(gate, up, weight, 1e-5, 2, prep.wq, prep.scale, None, prep.fmt, 0, 2560,
                                             6912, torch.bfloat16)[0]

    run()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for _ in range(2):
        gate.normal_()
        up.normal_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, run())


@pytest.mark.parametrize("batch", [1, 4, 8])
def test_bitnet_runs_its_norms_inside_the_projections(cuda_ext_ops, batch):
    from bitmodels.bitnet import BitNetConfig, BitNetForCausalLM

    torch.manual_seed(batch)
    cfg = BitNetConfig(vocab_size=97, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       quant_config=config(granularity="per_tensor"))
    model = BitNetForCausalLM(cfg).cuda().to(torch.bfloat16).eval()
    ids = torch.randint(0, 97, (batch, 1), device="cuda")
    with torch.no_grad():
        model.prepare_for_inference("cuda", norm_in_projections=False)
        assert not model.normed_projections(batch, torch.bfloat16)
        plain = model(ids).float()
        model.prepare_for_inference("cuda")
        assert model.normed_projections(batch, torch.bfloat16)
        normed = model(ids).float()
    # quantization steps may differ by one on a few values: the logits agree closely, the argmax too
    assert ((normed - plain).norm() / plain.norm()).item() < 2e-2
    assert (normed.argmax(-1) == plain.argmax(-1)).float().mean().item() >= 0.75

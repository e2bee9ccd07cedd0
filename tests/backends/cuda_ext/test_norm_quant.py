"""The fused RMSNorm + int8 quantization op against the torch definition (BitNet's norms, then
bitcore.quantize per token), on a CUDA device (skipped where there is none)."""
import pytest
import torch

from bitmodels.bitnet.ops import quantize_tokens, rms_norm

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda_ops(cuda_ext_ops):
    return cuda_ext_ops


def reference(a, b, weight, eps, mode):
    h = None
    if mode == 1:
        h = a + b
        x = h
    elif mode == 2:
        x = torch.relu(a).square() * b
    else:
        x = a
    q = quantize_tokens(rms_norm(x, weight, eps))
    return h, q.q, q.scale.reshape(-1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("mode", [0, 1, 2])
def test_matches_the_torch_definition(cuda_ops, mode, dtype):
    for m, k in [(1, 1), (3, 7), (1, 2560), (5, 4097), (2, 6912), (17, 9000)]:
        a = torch.randn(m, k, device="cuda").to(dtype) * 3
        b = torch.randn(m, k, device="cuda").to(dtype)
        weight = (torch.rand(k, device="cuda") + 0.5).to(dtype)
        h, q, scale = cuda_ops.rms_norm_quant(a, b if mode else None, weight, 1e-5, mode)
        rh, rq, rscale = reference(a, b, weight, 1e-5, mode)
        assert q.dtype == torch.int8 and q.shape == (m, k) and scale.shape == (m,)
        if mode == 1:
            assert torch.equal(h, rh)
        else:
            assert h.numel() == 0
        # the sum of squares is reduced in another order: at most one quantization step apart, rarely
        diff = (q.int() - rq.int()).abs()
        assert diff.max() <= 1 and diff.float().mean() < 0.01, (m, k, diff.max().item(), diff.float().mean().item())
        assert torch.allclose(scale, rscale, rtol=1e-2, atol=0), (m, k)


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_the_kernel_per_mode_gives_the_same_bits(cuda_ops, monkeypatch, mode):
    # The default launches one kernel that decides the mode and the access width per launch;
    # BITLAB_NORM_KERNEL=per_mode (A/B timing) a kernel per mode and width.  Same arithmetic, so the same bits.
    for m, k, dtype in [(1, 2560, torch.bfloat16), (3, 7, torch.float16), (2, 6912, torch.bfloat16),
                        (5, 4097, torch.float32), (2, 9000, torch.bfloat16)]:
        a = torch.randn(m, k, device="cuda").to(dtype) * 3
        b = torch.randn(m, k, device="cuda").to(dtype)
        weight = (torch.rand(k, device="cuda") + 0.5).to(dtype)
        monkeypatch.setenv("BITLAB_NORM_KERNEL", "per_mode")
        per_mode = cuda_ops.rms_norm_quant(a, b if mode else None, weight, 1e-5, mode)
        monkeypatch.delenv("BITLAB_NORM_KERNEL", raising=False)
        generic = cuda_ops.rms_norm_quant(a, b if mode else None, weight, 1e-5, mode)
        for x, y in zip(per_mode, generic):
            assert torch.equal(x, y), (m, k, dtype)


def test_strided_rows_and_bad_inputs(cuda_ops):
    gate_up = torch.randn(4, 2 * 300, device="cuda", dtype=torch.bfloat16)
    gate, up = gate_up.split(300, dim=-1)  # rows with stride 600, as the fused gate/up projection leaves them
    weight = torch.rand(300, device="cuda", dtype=torch.bfloat16) + 0.5
    _, q, scale = cuda_ops.rms_norm_quant(gate, up, weight, 1e-5, 2)
    _, rq, rscale = reference(gate.contiguous(), up.contiguous(), weight, 1e-5, 2)
    assert (q.int() - rq.int()).abs().max() <= 1
    with pytest.raises(ValueError, match="weight must be contiguous"):
        cuda_ops.rms_norm_quant(gate.contiguous(), None, weight.float(), 1e-5, 0)
    with pytest.raises(ValueError, match="needs b shaped like a"):
        cuda_ops.rms_norm_quant(gate.contiguous(), None, weight, 1e-5, 1)
    with pytest.raises(ValueError, match="mode: got 3"):
        cuda_ops.rms_norm_quant(gate.contiguous(), None, weight, 1e-5, 3)
    with pytest.raises(ValueError, match="row length 20000"):
        cuda_ops.rms_norm_quant(torch.ones(1, 20000, device="cuda"), None, torch.ones(20000, device="cuda"), 1e-5, 0)
    torch.library.opcheck(torch.ops.bitlab.cuda_ext_rms_norm_quant.default,
                          (gate.contiguous(), up.contiguous(), weight, 1e-5, 1))


def test_bitnet_decode_uses_it_and_matches_the_torch_norms(cuda_ops):
    from bitcore.config import BitQuantConfig
    from bitmodels.bitnet import BitNetConfig, BitNetForCausalLM

    torch.manual_seed(0)
    cfg = BitNetConfig(vocab_size=97, hidden_size=128, intermediate_size=320, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       quant_config=BitQuantConfig(weight_bits=1.58, activation_dtype="int8",
                                                   activation_granularity="per_token"))
    model = BitNetForCausalLM(cfg).cuda().to(torch.bfloat16).eval()
    ids = torch.randint(0, 97, (2, 5), device="cuda")
    with torch.no_grad():
        model.prepare_for_inference("cuda", quantize_in_norms=False)
        plain = model(ids).float()
        model.prepare_for_inference("cuda")
        assert model.norm_quant.startswith("cuda_ext"), model.norm_quant
        fused = model(ids).float()
    # quantization steps may differ by one on a few values: the logits agree closely, the argmax too
    assert ((fused - plain).norm() / plain.norm()).item() < 2e-2
    assert (fused.argmax(-1) == plain.argmax(-1)).float().mean().item() > 0.9

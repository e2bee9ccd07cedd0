"""numba_cuda kernels against the reference backend, under the CUDA simulator and on a real GPU.

Without a GPU this module turns on numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``)
before numba is first imported, and runs every kernel on NumPy views of CPU
tensors (``kernel.run(..., as_array=numpy_view, stream=0)``).  When numba was
already imported without the simulator (another test imported it first), the
simulator cases run in a child pytest instead (``test_simulator_cases_in_a_subprocess``).
With a GPU the same cases run through ``kernel.forward`` on CUDA tensors (marked gpu).

Shapes are small and odd (the simulator runs each GPU thread as a Python thread);
one case per family crosses a 1024/2048-input chunk so the unrolled full-chunk
path runs too.  Integer paths are checked bit-exact with the reference's
exactness probe (weight scale 1, activation scale 1).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

_HAS_GPU = torch.cuda.is_available()
SIM_ENV = "NUMBA_ENABLE_CUDASIM"
if not _HAS_GPU and "numba" not in sys.modules and SIM_ENV not in os.environ:
    # numba reads this once, at import; restore the environment so child processes are unaffected.
    os.environ[SIM_ENV] = "1"
    try:
        import numba.cuda  # noqa: F401
    except ImportError:
        pass
    finally:
        del os.environ[SIM_ENV]

numba = pytest.importorskip("numba")
from numba import config as numba_config  # noqa: E402

from backends.numba_cuda.plugin import (  # noqa: E402
    NumbaFloatKernel,
    NumbaInt8Kernel,
    NumbaXnorKernel,
    numba_availability,
    numpy_view,
)
from backends.torch_ref.kernels import TorchReferenceKernel  # noqa: E402
from bitcore.config import BitQuantConfig  # noqa: E402
from bitcore.packing import pack_weight  # noqa: E402

SIMULATOR = bool(numba_config.ENABLE_CUDASIM)
REFERENCE = TorchReferenceKernel()
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# relative error allowed on float paths: float32 accumulation in a different order, then the output dtype
FLOAT_TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

_gpu_ok = _HAS_GPU and not SIMULATOR and bool(numba_availability())
DEVICES = [
    pytest.param("sim", marks=pytest.mark.skipif(not SIMULATOR, reason="numba's CUDA simulator is not active")),
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not _gpu_ok, reason=f"no usable GPU: {numba_availability().reason}")],
    ),
]


def fresh_generator() -> tuple:
    seed = int.from_bytes(os.urandom(4), "little")
    return torch.Generator().manual_seed(seed), seed


def random_packed(bits, out_f, in_f, granularity, gen, unit_scale=False):
    choices = torch.tensor([-1, 1] if bits == 1 else [-1, 0, 1], dtype=torch.int8)
    values = choices[torch.randint(0, len(choices), (out_f, in_f), generator=gen)]
    shape = (1,) if granularity == "per_tensor" else (out_f,)
    scale = torch.ones(shape) if unit_scale else torch.rand(shape, generator=gen) + 0.05
    return pack_weight(values, scale, bits, granularity)


def run_kernel(kernel, device, x, packed, cfg, bias=None, activation="none"):
    """The kernel's output for (x, packed) on "sim" (NumPy views) or "cuda" (forward on the GPU)."""
    if device == "sim":
        prepared = kernel.prepare(packed, cfg)
        return kernel.run(x, prepared, bias, activation, as_array=numpy_view, stream=0)
    dev = torch.device("cuda")
    packed_dev = pack_weight_to(packed, dev)
    prepared = kernel.prepare(packed_dev, cfg)
    out = kernel.forward(x.to(dev), prepared, None if bias is None else bias.to(dev), activation)
    torch.cuda.synchronize()
    return out.cpu()


def pack_weight_to(packed, device):
    from dataclasses import replace

    return replace(packed, data=packed.data.to(device), scale=packed.scale.to(device))


def reference(x, packed, cfg, bias=None, activation="none"):
    return REFERENCE.forward(x, REFERENCE.prepare(packed, cfg), bias, activation)


def assert_close_rel(got, want, tol, seed):
    assert got.dtype == want.dtype and got.shape == want.shape
    assert bool(torch.isfinite(got).all()), f"non-finite output (seed {seed})"
    err = float((got.double() - want.double()).norm() / want.double().norm().clamp(min=1e-30))
    assert err < tol, f"relative error {err:.3g} >= {tol} (seed {seed})"


# Small odd shapes: (out_features, in_features, tokens)
SHAPES = [(1, 1, 1), (13, 70, 3), (37, 33, 2)]
CHUNK_SHAPE = (5, 1100, 1)  # crosses the ternary chunk of 1024 inputs
BINARY_CHUNK_SHAPE = (3, 2100, 1)  # crosses the binary chunk of 2048 inputs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", list(DTYPES))
@pytest.mark.parametrize("wgran", ["per_tensor", "per_channel"])
@pytest.mark.parametrize("bits", [1.58, 1])
def test_float_activations_match_reference(device, bits, wgran, act):
    gen, seed = fresh_generator()
    cfg = BitQuantConfig(weight_bits=bits, weight_granularity=wgran, activation_dtype=act)
    for out_f, in_f, tokens in SHAPES:
        packed = random_packed(bits, out_f, in_f, wgran, gen)
        x = torch.randn(tokens, in_f, generator=gen).to(DTYPES[act])
        got = run_kernel(NumbaFloatKernel(), device, x, packed, cfg)
        assert_close_rel(got, reference(x, packed, cfg), FLOAT_TOLERANCE[x.dtype], seed)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits, act, shape", [(1.58, "float16", CHUNK_SHAPE), (1, "bfloat16", BINARY_CHUNK_SHAPE)])
def test_float_activations_across_a_chunk_boundary(device, bits, act, shape):
    """A full chunk (the unrolled path without bounds tests) followed by a partial one."""
    gen, seed = fresh_generator()
    cfg = BitQuantConfig(weight_bits=bits, weight_granularity="per_channel", activation_dtype=act)
    out_f, in_f, tokens = shape
    packed = random_packed(bits, out_f, in_f, "per_channel", gen)
    x = torch.randn(tokens, in_f, generator=gen).to(DTYPES[act])
    got = run_kernel(NumbaFloatKernel(), device, x, packed, cfg)
    assert_close_rel(got, reference(x, packed, cfg), FLOAT_TOLERANCE[x.dtype], seed)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_float_kernel_rounds_x_to_the_activation_dtype_first(device, x_dtype):
    gen, seed = fresh_generator()
    cfg = BitQuantConfig(weight_bits=1.58, activation_dtype="float16")
    packed = random_packed(1.58, 11, 45, "per_tensor", gen)
    x = torch.randn(2, 45, generator=gen).to(x_dtype)
    got = run_kernel(NumbaFloatKernel(), device, x, packed, cfg)
    assert_close_rel(got, reference(x, packed, cfg), FLOAT_TOLERANCE[x_dtype], seed)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("agran", ["per_tensor", "per_token"])
@pytest.mark.parametrize("wgran", ["per_tensor", "per_channel"])
@pytest.mark.parametrize("bits", [1.58, 1])
def test_int8_activations_match_reference(device, bits, wgran, agran):
    gen, seed = fresh_generator()
    cfg = BitQuantConfig(weight_bits=bits, weight_granularity=wgran, activation_dtype="int8",
                         activation_granularity=agran)
    for out_f, in_f, tokens in SHAPES:
        packed = random_packed(bits, out_f, in_f, wgran, gen)
        x = torch.randn(tokens, in_f, generator=gen)
        got = run_kernel(NumbaInt8Kernel(), device, x, packed, cfg)
        # same integers, same float32 epilogue order: equal up to the last bit of the products
        torch.testing.assert_close(got, reference(x, packed, cfg), rtol=2e-7, atol=1e-6,
                                   msg=lambda m: f"{m} (seed {seed})")


def exactness_probe_input(tokens, in_f, gen):
    """Rows whose max |x| is exactly 127: the int8 scale is 1 and the output is the integer sum."""
    x = torch.randint(-127, 128, (tokens, in_f), generator=gen).float()
    x[:, 0] = 127.0
    return x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [1.58, 1])
def test_int8_path_is_exact(device, bits):
    gen, seed = fresh_generator()
    cfg = BitQuantConfig(weight_bits=bits, activation_dtype="int8", activation_granularity="per_token")
    for out_f, in_f, tokens in [(29, 67, 3), CHUNK_SHAPE]:
        packed = random_packed(bits, out_f, in_f, "per_tensor", gen, unit_scale=True)
        x = exactness_probe_input(tokens, in_f, gen)
        want = reference(x, packed, cfg)
        assert torch.equal(want, want.round()), "probe is not integer-valued"
        got = run_kernel(NumbaInt8Kernel(), device, x, packed, cfg)
        assert torch.equal(got, want), f"integer path not exact (seed {seed})"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("agran", ["per_tensor", "per_token"])
@pytest.mark.parametrize("wgran", ["per_tensor", "per_channel"])
def test_xnor_matches_reference(device, wgran, agran):
    gen, seed = fresh_generator()
    cfg = BitQuantConfig(weight_bits=1, weight_granularity=wgran, activation_dtype="binary",
                         activation_granularity=agran)
    for out_f, in_f, tokens in SHAPES + [(6, 200, 2)]:
        packed = random_packed(1, out_f, in_f, wgran, gen)
        x = torch.randn(tokens, in_f, generator=gen)
        got = run_kernel(NumbaXnorKernel(), device, x, packed, cfg)
        torch.testing.assert_close(got, reference(x, packed, cfg), rtol=2e-7, atol=1e-6,
                                   msg=lambda m: f"{m} (seed {seed})")


@pytest.mark.parametrize("device", DEVICES)
def test_xnor_is_exact(device):
    gen, seed = fresh_generator()
    cfg = BitQuantConfig(weight_bits=1, activation_dtype="binary", activation_granularity="per_token")
    packed = random_packed(1, 17, 131, "per_tensor", gen, unit_scale=True)
    x = torch.where(torch.rand(3, 131, generator=gen) < 0.5, -1.0, 1.0)  # mean |x| = 1
    x[0, 5] = 0.0  # zero binarizes to +1; that row's scale is then 130 / 131, not 1
    want = reference(x, packed, cfg)
    got = run_kernel(NumbaXnorKernel(), device, x, packed, cfg)
    assert torch.equal(got[1:], want[1:]), f"XNOR path not exact (seed {seed})"
    torch.testing.assert_close(got[:1], want[:1], rtol=2e-7, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ["none", "relu", "relu2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_bias_and_epilogues(device, activation, dtype):
    gen, seed = fresh_generator()
    act = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]
    for cfg, kernel in [
        (BitQuantConfig(weight_bits=1.58, weight_granularity="per_channel", activation_dtype=act), NumbaFloatKernel()),
        (BitQuantConfig(weight_bits=1.58, activation_dtype="int8", activation_granularity="per_token"),
         NumbaInt8Kernel()),
        (BitQuantConfig(weight_bits=1, activation_dtype="binary"), NumbaXnorKernel()),
    ]:
        packed = random_packed(cfg.weight_bits, 21, 53, cfg.weight_granularity, gen)
        x = torch.randn(3, 53, generator=gen).to(dtype)
        bias = torch.randn(21, generator=gen).to(dtype)
        got = run_kernel(kernel, device, x, packed, cfg, bias, activation)
        want = reference(x, packed, cfg, bias, activation)
        tol = max(FLOAT_TOLERANCE[dtype], 1e-6)
        assert_close_rel(got, want, tol, seed)


@pytest.fixture
def thread_switch_every_microsecond():
    """Python threads switch every 1 us instead of 5 ms, so simulator races show every run."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


@pytest.mark.skipif(not SIMULATOR, reason="numba's CUDA simulator is not active")
def test_simulated_reductions_survive_constant_thread_switching(thread_switch_every_microsecond):
    """Regression: the simulated warp reduction once read ``cuda`` mid-swap ("no attribute
    threadIdx") and the simulator's shared arrays could be allocated twice; both showed as
    rare CI failures. With a 1 us switch interval the first fails this test on every run,
    the second on about one run in three."""
    gen, seed = fresh_generator()
    cases = [(1.58, "float16", NumbaFloatKernel()), (1, "int8", NumbaInt8Kernel()), (1, "binary", NumbaXnorKernel())]
    for bits, act, kernel in cases * 4:  # each race hits a given launch only sometimes
        cfg = BitQuantConfig(weight_bits=bits, weight_granularity="per_channel", activation_dtype=act)
        packed = random_packed(bits, 13, 70, "per_channel", gen)
        x = torch.randn(3, 70, generator=gen)
        if act == "float16":
            x = x.half()
        got = run_kernel(kernel, "sim", x, packed, cfg)
        assert_close_rel(got, reference(x, packed, cfg), FLOAT_TOLERANCE[x.dtype], seed)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_tokens_and_bad_inputs(device):
    gen, _ = fresh_generator()
    cfg = BitQuantConfig(weight_bits=1.58, activation_dtype="float32")
    packed = random_packed(1.58, 7, 9, "per_tensor", gen)
    assert run_kernel(NumbaFloatKernel(), device, torch.randn(0, 9), packed, cfg).shape == (0, 7)
    with pytest.raises(ValueError, match=r"\[tokens, 9\]"):
        run_kernel(NumbaFloatKernel(), device, torch.randn(2, 8), packed, cfg)
    with pytest.raises(ValueError, match="activation"):
        run_kernel(NumbaFloatKernel(), device, torch.randn(2, 9), packed, cfg, activation="gelu")


@pytest.mark.skipif(SIMULATOR, reason="the simulator cases already ran in this process")
def test_simulator_cases_in_a_subprocess():
    """numba was imported before this module could turn the simulator on: run the cases in a child."""
    env = dict(os.environ, **{SIM_ENV: "1", "CUDA_VISIBLE_DEVICES": ""})
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__), "-k", "sim"],
        cwd=root, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout


@pytest.mark.parametrize("device", DEVICES)
def test_zero_weight_rows_give_exact_zeros(device):
    """Products are exact (x * 2v), so an all-zero ternary row sums to exactly 0 in every dtype path."""
    gen, seed = fresh_generator()
    cfg = BitQuantConfig(weight_bits=1.58, activation_dtype="float32")
    values = torch.randint(-1, 2, (9, 77), generator=gen, dtype=torch.int8)
    values[::2] = 0
    packed = pack_weight(values, torch.rand(1, generator=gen) + 0.5, 1.58, "per_tensor")
    x = torch.randn(2, 77, generator=gen) * 1e3
    got = run_kernel(NumbaFloatKernel(), device, x, packed, cfg)
    assert torch.equal(got[:, ::2], torch.zeros_like(got[:, ::2])), f"seed {seed}"
    assert_close_rel(got, reference(x, packed, cfg), FLOAT_TOLERANCE[torch.float32], seed)


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_ok, reason="needs a GPU that numba can use")
def test_forward_is_captured_by_a_cuda_graph():
    gen, seed = fresh_generator()
    cfg = BitQuantConfig(weight_bits=1.58, activation_dtype="float16")
    kernel = NumbaFloatKernel()
    packed = pack_weight_to(random_packed(1.58, 300, 1500, "per_tensor", gen), torch.device("cuda"))
    prepared = kernel.prepare(packed, cfg)
    x = torch.randn(1, 1500, generator=gen).half().cuda()
    eager = kernel.forward(x, prepared)  # compiles outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        kernel.forward(x, prepared)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = kernel.forward(x, prepared)
    x.copy_(torch.randn(1, 1500, generator=gen).half().cuda())
    graph.replay()
    torch.cuda.synchronize()
    assert not torch.equal(y, eager)
    assert torch.equal(y, kernel.forward(x, prepared)), f"graph replay differs from eager (seed {seed})"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["row_slice", "transposed"])
def test_strided_activations(device, layout):
    """Rows further apart than in_features (a slice) and inputs not adjacent (a transpose) both work."""
    gen, seed = fresh_generator()
    cfg = BitQuantConfig(weight_bits=1.58, weight_granularity="per_channel", activation_dtype="float32")
    packed = random_packed(1.58, 10, 41, "per_channel", gen)
    base = torch.randn(5, 60, generator=gen)
    x = base[1:4, 7:48] if layout == "row_slice" else torch.randn(41, 3, generator=gen).t()
    assert not x.is_contiguous()
    got = run_kernel(NumbaFloatKernel(), device, x, packed, cfg)
    assert_close_rel(got, reference(x, packed, cfg), FLOAT_TOLERANCE[torch.float32], seed)

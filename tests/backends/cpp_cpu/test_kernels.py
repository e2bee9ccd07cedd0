"""cpp_cpu kernels against the reference backend, on every instruction set (AVX-512 VNNI, AVX2, scalar).

Integer-activation paths must agree bit for bit (exactness probe of
backends/torch_ref/kernels.py, and in general, since the epilogue rounds in the
reference's order); float-activation paths within float32 rounding.
"""
from __future__ import annotations

import math

import pytest
import torch

from backends.cpp_cpu.kernels import CppFloatActivationKernel, CppInt8ActivationKernel, CppXnorKernel
from backends.torch_ref.kernels import TorchReferenceKernel
from bitcore.config import BitQuantConfig
from bitcore.packing import pack_weight
from bitcore.quantize import quantize_activation_int8, quantize_weight

REF = TorchReferenceKernel()
EPILOGUES = ["none", "relu", "relu2"]
# (batch, in_features, out_features): odd in_features (not multiples of 4/8/32/64), one output, empty batch,
# batches that leave partial 4-token groups, and in_features just past a 256-input block.
SHAPES = [(1, 301, 37), (5, 77, 1), (0, 45, 9), (7, 257, 19), (3, 1, 5)]
WEIGHT_VALUES = {1: [-1, 1], 1.58: [-1, 0, 1], 2: [-3, -1, 1, 3], 4: list(range(-8, 8)), 8: list(range(-128, 128))}


def random_packed(cfg: BitQuantConfig, out_f: int, in_f: int, gen: torch.Generator, unit_scale: bool = False):
    """A packed weight with every value of the format present (including -8 / -128, which the packing allows)."""
    choices = torch.tensor(WEIGHT_VALUES[cfg.weight_bits], dtype=torch.int8)
    values = choices[torch.randint(len(choices), (out_f, in_f), generator=gen)]
    n_scales = 1 if cfg.weight_granularity == "per_tensor" else out_f
    scale = torch.ones(n_scales) if unit_scale else torch.rand(n_scales, generator=gen) + 0.05
    return pack_weight(values, scale, cfg.weight_bits, cfg.weight_granularity)


def strided(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as a transposed view or with a row stride larger than in_features."""
    if layout == "transposed":
        return x.T.contiguous().T
    if layout == "row_stride":
        wide = torch.zeros(x.shape[0], x.shape[1] + 3)
        wide[:, 1 : 1 + x.shape[1]] = x
        return wide[:, 1 : 1 + x.shape[1]]
    return x


def probe_input(batch: int, in_f: int, gen: torch.Generator) -> torch.Tensor:
    """Exactness probe: integer activations with each row's max |x| exactly 127, so x_scale is 1.0."""
    x = torch.randint(-127, 128, (batch, in_f), generator=gen).float()
    if batch:
        x[:, 0] = 127.0
    return x


def rounding_bound(y_ref: torch.Tensor, magnitude: torch.Tensor, terms: int, epilogue: str) -> torch.Tensor:
    """How far two float32 sums of ``terms`` products, added in any order, may differ: ``terms * u * sum |products|``
    (``magnitude``), plus the bias add and the epilogue (relu keeps the bound; relu2 squares the value)."""
    u = 2.0**-24
    bound = (terms + 4) * u * magnitude + 4 * u * y_ref.abs()
    if epilogue == "relu2":
        bound = bound * (2 * y_ref.abs().sqrt() + 1) + bound**2
    return bound + 1e-30


def run_both(kernel, cfg, packed, x, bias, epilogue):
    y = kernel.forward(x, kernel.prepare(packed, cfg), bias, epilogue)
    y_ref = REF.forward(x, REF.prepare(packed, cfg), bias, epilogue)
    return y, y_ref


@pytest.mark.parametrize("bits", [1, 1.58, 2, 4, 8])
@pytest.mark.parametrize("wg", ["per_tensor", "per_channel"])
@pytest.mark.parametrize("ag", ["per_tensor", "per_token"])
def test_int8_activations_bit_exact(isa, bits, wg, ag):
    gen = torch.Generator().manual_seed(hash((bits, wg, ag, isa)) % 2**31)
    cfg = BitQuantConfig(weight_bits=bits, weight_granularity=wg, activation_granularity=ag)
    for i, (batch, in_f, out_f) in enumerate(SHAPES):
        layout = ["contiguous", "transposed", "row_stride"][i % 3]
        epilogue = EPILOGUES[i % 3]
        bias = torch.randn(out_f, generator=gen) if i % 2 else None
        # the probe: the output is the integer accumulation itself
        probe = random_packed(cfg, out_f, in_f, gen, unit_scale=True)
        x = strided(probe_input(batch, in_f, gen), layout)
        y, y_ref = run_both(CppInt8ActivationKernel(), cfg, probe, x, None, "none")
        assert torch.equal(y, y_ref), f"probe {bits} {wg} {ag} shape {(batch, in_f, out_f)}"
        # fresh random data with real scales, bias and epilogue: still identical
        packed = random_packed(cfg, out_f, in_f, gen)
        x = strided(torch.randn(batch, in_f, generator=gen) * 3, layout)
        y, y_ref = run_both(CppInt8ActivationKernel(), cfg, packed, x, bias, epilogue)
        assert y.shape == (batch, out_f) and y.dtype == x.dtype
        assert torch.equal(y, y_ref), f"{bits} {wg} {ag} shape {(batch, in_f, out_f)} {epilogue}: " \
            f"max diff {(y - y_ref).abs().max().item() if y.numel() else 0}"


@pytest.mark.parametrize("bits", [1.58, 4, 8])
def test_bfloat16_rows_in_and_out_bit_exact(isa, bits):
    """bfloat16 x is widened and the output rounded by the op's own loops (bf16_rows.cpp), not torch's .to(): the
    reference's values exactly, strided rows, odd lengths (AVX2 tails), NaN-free and special rows alike."""
    gen = torch.Generator().manual_seed(hash(("bf16", bits, isa)) % 2**31)
    cfg = BitQuantConfig(weight_bits=bits, weight_granularity="per_channel", activation_granularity="per_token")
    for i, (batch, in_f, out_f) in enumerate(SHAPES + [(2, 2560, 77), (1, 19, 3)]):
        packed = random_packed(cfg, out_f, in_f, gen)
        wide = (torch.randn(batch, in_f + 5, generator=gen) * 3).to(torch.bfloat16)
        # contiguous, a transposed view, or rows further apart than in_features
        x = [wide[:, :in_f].contiguous(), wide[:, :in_f].T.contiguous().T, wide[:, 2 : 2 + in_f]][i % 3]
        bias = torch.randn(out_f, generator=gen) if i % 2 else None
        y, y_ref = run_both(CppInt8ActivationKernel(), cfg, packed, x, bias, EPILOGUES[i % 3])
        assert y.dtype == torch.bfloat16 and y.shape == (batch, out_f)
        assert torch.equal(y, y_ref), f"{bits} shape {(batch, in_f, out_f)}: {(y != y_ref).sum().item()} differ"


# Rows long enough for many 64-byte weight loads, block counts odd and even (a lone last block on
# the AVX-512 path), outputs enough for several work items (rows_per_item), and every token-group
# size (1-4 tokens and a partial group after full ones).
LONG_SHAPES = [(1, 2600, 300), (5, 1500, 650), (2, 4099, 97), (3, 640, 1100)]


@pytest.mark.parametrize("bits", [1, 1.58, 2, 4])
def test_int8_activations_long_rows_bit_exact(isa, bits):
    gen = torch.Generator().manual_seed(hash(("long", bits, isa)) % 2**31)
    cfg = BitQuantConfig(weight_bits=bits, weight_granularity="per_channel", activation_granularity="per_token")
    for batch, in_f, out_f in LONG_SHAPES:
        probe = random_packed(cfg, out_f, in_f, gen, unit_scale=True)
        y, y_ref = run_both(CppInt8ActivationKernel(), cfg, probe, probe_input(batch, in_f, gen), None, "none")
        assert torch.equal(y, y_ref), f"probe {bits} shape {(batch, in_f, out_f)}"
        packed = random_packed(cfg, out_f, in_f, gen)
        x = torch.randn(batch, in_f, generator=gen)
        y, y_ref = run_both(CppInt8ActivationKernel(), cfg, packed, x, torch.randn(out_f, generator=gen), "relu2")
        assert torch.equal(y, y_ref), f"{bits} shape {(batch, in_f, out_f)}"


@pytest.mark.parametrize("bits", [1.58, 4])
@pytest.mark.parametrize("group_size", [384, 1000])
def test_per_group_long_rows(isa, bits, group_size):
    """Groups of 3 ternary blocks (odd: a lone block per group on the AVX-512 path) and of 1000 inputs."""
    gen = torch.Generator().manual_seed(hash(("long-group", bits, group_size, isa)) % 2**31)
    cfg = BitQuantConfig(weight_bits=bits, weight_granularity="per_group", group_size=group_size,
                         activation_granularity="per_token")
    choices = torch.tensor(WEIGHT_VALUES[bits], dtype=torch.int8)
    for batch, in_f, out_f in LONG_SHAPES[:3]:
        values = choices[torch.randint(len(choices), (out_f, in_f), generator=gen)]
        groups = -(-in_f // group_size)
        probe = pack_weight(values, torch.ones(out_f, groups), bits, "per_group", group_size)
        y, y_ref = run_both(CppInt8ActivationKernel(), cfg, probe, probe_input(batch, in_f, gen), None, "none")
        assert torch.equal(y, y_ref), f"probe shape {(batch, in_f, out_f)}"


def test_isa_override_names_the_active_set(cpp_ops):
    """cpu_set_isa pins the kernels and cpu_features says which run; a set the CPU lacks falls to the best one below
    it (avx512vnni -> avxvnni -> avx2 -> scalar)."""
    features = cpp_ops.cpu_features().split("(")[0].split()
    has = {"avx512vnni": all(f in features for f in ("avx2", "avx512bw", "avx512vl", "avx512vnni")),
           "avxvnni": "avx2" in features and "avxvnni" in features, "avx2": "avx2" in features}
    below = {"avx512vnni": "avxvnni", "avxvnni": "avx2", "avx2": "scalar"}

    def expected(name):
        while name != "scalar" and not has[name]:
            name = below[name]
        return name

    try:
        for number, name in ((0, "scalar"), (1, "avx2"), (2, "avx512vnni"), (3, "avxvnni")):
            cpp_ops.cpu_set_isa(number)
            assert cpp_ops.cpu_features().endswith(f"(active: {expected(name)})"), (number, cpp_ops.cpu_features())
    finally:
        cpp_ops.cpu_set_isa(-1)
    assert cpp_ops.cpu_features().endswith(f"(active: {expected('avx512vnni')})")  # the default: the best set


@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("bits", [1, 1.58, 2, 4, 8])
def test_extreme_values_do_not_overflow(isa, bits, tokens):
    """Largest codes times +-127 over 4099 inputs: int16 partial sums must be widened in time, and the one-token
    kernel's slots masked in place (codes times up to 2^6) must not overflow their int32 lanes."""
    cfg = BitQuantConfig(weight_bits=bits, activation_granularity="per_token")
    lo, hi = WEIGHT_VALUES[bits][0], WEIGHT_VALUES[bits][-1]
    values = torch.tensor([[hi] * 4099, [lo] * 4099, [hi, lo] * 2049 + [hi]], dtype=torch.int8)
    packed = pack_weight(values, torch.ones(1), bits, "per_tensor")
    x = torch.tensor([[127.0] * 4099, [-127.0] * 4099, [127.0, -127.0] * 2049 + [127.0]])
    for rows in ([x] if tokens == 3 else x.split(1)):
        y, y_ref = run_both(CppInt8ActivationKernel(), cfg, packed, rows, None, "none")
        assert torch.equal(y, y_ref), (y, y_ref)


@pytest.mark.parametrize("bits", [1, 1.58, 2, 4])
@pytest.mark.parametrize("act", ["float32", "float16", "bfloat16"])
def test_float_activations_within_rounding(isa, bits, act):
    gen = torch.Generator().manual_seed(hash((bits, act, isa)) % 2**31)
    for i, (batch, in_f, out_f) in enumerate(SHAPES):
        cfg = BitQuantConfig(weight_bits=bits, activation_dtype=act,
                             weight_granularity=["per_tensor", "per_channel"][i % 2])
        packed = random_packed(cfg, out_f, in_f, gen)
        x = strided(torch.randn(batch, in_f, generator=gen), ["contiguous", "transposed", "row_stride"][i % 3])
        bias = torch.randn(out_f, generator=gen)
        epilogue = EPILOGUES[i % 3]
        y, y_ref = run_both(CppFloatActivationKernel(), cfg, packed, x, bias, epilogue)
        assert y.shape == (batch, out_f) and y.dtype == torch.float32
        # any float32 summation order: |err| <= K * u * sum |x||w|, plus the bias add and relu2 square
        w = REF.prepare(packed, cfg)
        magnitude = x.abs() @ (w.values.float().abs() * packed.scale.view(-1, 1)).T if batch else y
        bound = rounding_bound(y_ref, magnitude, in_f, epilogue)
        assert bool(((y - y_ref).abs() <= bound).all()), f"{bits} {act} shape {(batch, in_f, out_f)}"


def test_half_precision_input_keeps_its_dtype(cpp_ops):
    cfg = BitQuantConfig(weight_bits=1.58, activation_dtype="float32")
    gen = torch.Generator().manual_seed(3)
    packed = random_packed(cfg, 11, 65, gen)
    x = torch.randn(3, 65, generator=gen).to(torch.bfloat16)
    y, y_ref = run_both(CppFloatActivationKernel(), cfg, packed, x, None, "relu")
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), y_ref.float(), rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize("ag", ["per_tensor", "per_token"])
def test_xnor_popcount_exact(isa, ag):
    seed = hash((ag, isa)) % 2**31  # str hashes change per process: fresh inputs each run
    gen = torch.Generator().manual_seed(seed)
    cfg = BitQuantConfig(weight_bits=1, activation_dtype="binary", activation_granularity=ag)
    for i, (batch, in_f, out_f) in enumerate(SHAPES):
        # +-1 activations have mean|x| = 1 exactly in any summation order: the output is K - 2 * mismatches
        packed = random_packed(cfg, out_f, in_f, gen, unit_scale=True)
        x = strided(torch.randint(0, 2, (batch, in_f), generator=gen).float() * 2 - 1, ["transposed", "row_stride"][i % 2])
        y, y_ref = run_both(CppXnorKernel(), cfg, packed, x, None, "none")
        assert torch.equal(y, y_ref), f"shape {(batch, in_f, out_f)}"
        # random activations (and zeros, which count as +1): the scale mean|x| may differ in its last bit
        packed = random_packed(cfg, out_f, in_f, gen)
        x = torch.randn(batch, in_f, generator=gen)
        x[:, ::5] = 0.0
        bias = torch.randn(out_f, generator=gen)
        y, y_ref = run_both(CppXnorKernel(), cfg, packed, x, bias, EPILOGUES[i % 3])
        # the product (K - 2 * mismatches) * w_scale * mean|x| is at most in_f * w_scale * mean|x| in size, and
        # mean|x| is a sum of in_f terms; a wrong popcount is off by 2 * w_scale * mean|x|, far above this bound
        mean_abs = x.abs().mean(dim=1).max() if batch else torch.tensor(0.0)
        magnitude = in_f * packed.scale.view(1, -1) * mean_abs
        bound = rounding_bound(y_ref, magnitude, in_f, EPILOGUES[i % 3])
        assert bool(((y - y_ref).abs() <= bound).all()), f"seed {seed} shape {(batch, in_f, out_f)}"


@pytest.mark.parametrize("per_token", [False, True])
def test_activation_quantizer_matches_bitcore(isa, cpp_ops, per_token):
    """The C++ quantizer is bit-identical to bitcore.quantize (scales and values), ties included."""
    gen = torch.Generator().manual_seed(7 + per_token)
    x = torch.randn(9, 333, generator=gen) * torch.logspace(-4, 3, 9).view(-1, 1)
    # exact ties: x * (127 / amax) lands on k + 0.5 for amax = 127
    x[0, :20] = torch.arange(20) + 0.5
    x[0, 20] = 127.0
    x[1] = 0.0  # all-zero row: amax clamps to 1e-5
    q, scale = cpp_ops.cpu_quantize_int8(x, per_token)
    q_ref, scale_ref = quantize_activation_int8(x, "per_token" if per_token else "per_tensor")
    assert torch.equal(q, q_ref)
    assert torch.equal(scale, scale_ref)


@pytest.mark.parametrize("per_token", [False, True])
def test_many_rows_quantize_and_convert_in_chunks_on_two_threads(cpp_ops, per_token):
    """Past 2 * 16 rows the quantizer and the bf16 copies run in row chunks on the kernel threads (a prefill):
    the same values as bitcore.quantize and as torch_ref, the tensor absmax taken over every chunk (here in the
    last row, outside the first chunk)."""
    from backends.cpp_cpu.threads import pinned_threads

    gen = torch.Generator().manual_seed(21 + per_token)
    x = torch.randn(70, 301, generator=gen) * torch.logspace(-3, 2, 70).view(-1, 1)
    with pinned_threads(2):
        q, scale = cpp_ops.cpu_quantize_int8(x, per_token)
        cfg = BitQuantConfig(weight_bits=1.58, activation_granularity="per_token" if per_token else "per_tensor")
        packed = random_packed(cfg, 37, 301, gen)
        y, y_ref = run_both(CppInt8ActivationKernel(), cfg, packed, x.bfloat16(), None, "none")
    q_ref, scale_ref = quantize_activation_int8(x, "per_token" if per_token else "per_tensor")
    assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref)
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_ref)


def test_multithreaded_equals_single_threaded(cpp_ops):
    cfg = BitQuantConfig(weight_bits=1.58, activation_granularity="per_token")
    gen = torch.Generator().manual_seed(11)
    packed = random_packed(cfg, 203, 515, gen)
    kernel = CppInt8ActivationKernel()
    prepared = kernel.prepare(packed, cfg)
    x = torch.randn(13, 515, generator=gen)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = kernel.forward(x, prepared)
        torch.set_num_threads(max(2, before))
        y2 = kernel.forward(x, prepared)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(y1, y2)


def test_mismatched_weight_is_rejected(cpp_ops):
    cfg = BitQuantConfig(weight_bits=1.58)
    packed = random_packed(cfg, 4, 130, torch.Generator().manual_seed(0))
    prepared = CppInt8ActivationKernel().prepare(packed, cfg)
    with pytest.raises(RuntimeError, match=r"in_features=130\], got shape \[2, 200\]"):
        cpp_ops.cpu_linear_a8(torch.randn(2, 200), prepared.weight, prepared.scale, None, 130, "ternary", False, 0, "none")
    with pytest.raises(RuntimeError, match="epilogue: got 'gelu'"):
        cpp_ops.cpu_linear_a8(torch.randn(2, 130), prepared.weight, prepared.scale, None, 130, "ternary", False, 0, "gelu")


def test_ops_trace_under_torch_compile(cpp_ops):
    cfg = BitQuantConfig(weight_bits=1.58)
    packed = random_packed(cfg, 6, 40, torch.Generator().manual_seed(5))
    kernel = CppInt8ActivationKernel()
    prepared = kernel.prepare(packed, cfg)

    def f(x):
        return kernel.forward(x, prepared, None, "relu") * 2

    x = torch.randn(3, 40)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), f(x))


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_forked_child_runs_kernels(cpp_ops):
    """A forked process (e.g. a DataLoader worker) gets a fresh thread pool instead of the parent's."""
    import os

    cfg = BitQuantConfig(weight_bits=1, activation_dtype="binary")
    packed = random_packed(cfg, 300, 129, torch.Generator().manual_seed(9))
    kernel = CppXnorKernel()
    prepared = kernel.prepare(packed, cfg)
    x = torch.randn(9, 129)
    expected = kernel.forward(x, prepared)  # starts the parent's workers
    pid = os.fork()
    if pid == 0:  # child: report through the exit code only
        ok = torch.equal(kernel.forward(x, prepared), expected)
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0


@pytest.mark.parametrize("act", ["int8", "float32"])
def test_prepare_in_row_chunks(cpp_ops, monkeypatch, act):
    """Large weights are re-laid out a block of rows at a time; the chunk seams must not show."""
    import backends.cpp_cpu.kernels as cpp_kernels

    monkeypatch.setattr(cpp_kernels, "_PREPARE_ROWS", 7)
    cfg = BitQuantConfig(weight_bits=1.58, activation_dtype=act, weight_granularity="per_channel")
    gen = torch.Generator().manual_seed(13)
    packed = random_packed(cfg, 23, 133, gen, unit_scale=True)
    x = probe_input(5, 133, gen)
    kernel = CppInt8ActivationKernel() if act == "int8" else CppFloatActivationKernel()
    y, y_ref = run_both(kernel, cfg, packed, x, None, "none")
    assert torch.equal(y, y_ref)  # integer-valued inputs: float sums are exact too


@pytest.mark.parametrize("bits", [1, 1.58, 2, 4, 8])
@pytest.mark.parametrize("group_size", [7, 64, 100, 128, 300])
def test_per_group_weights(isa, bits, group_size):
    """Groups of any size (padded per group inside the kernel) against the reference."""
    seed = hash((bits, group_size, isa)) % 2**31  # str hashes change per process: fresh inputs each run
    gen = torch.Generator().manual_seed(seed)
    cfg = BitQuantConfig(weight_bits=bits, weight_granularity="per_group", group_size=group_size,
                         activation_granularity="per_token")
    choices = torch.tensor(WEIGHT_VALUES[bits], dtype=torch.int8)
    for batch, in_f, out_f in [(5, 301, 7), (1, 77, 3), (0, 45, 2)]:
        values = choices[torch.randint(len(choices), (out_f, in_f), generator=gen)]
        groups = -(-in_f // group_size)
        # probe: unit scales, integer activations with max 127: output is the exact integer sum
        probe = pack_weight(values, torch.ones(out_f, groups), bits, "per_group", group_size)
        x = strided(probe_input(batch, in_f, gen), "transposed")
        y, y_ref = run_both(CppInt8ActivationKernel(), cfg, probe, x, None, "none")
        assert torch.equal(y, y_ref), f"probe shape {(batch, in_f, out_f)}"
        # real scales: the float sum over groups may round in another order
        scale = torch.rand(out_f, groups, generator=gen) + 0.1
        packed = pack_weight(values, scale, bits, "per_group", group_size)
        x = torch.randn(batch, in_f, generator=gen)
        bias = torch.randn(out_f, generator=gen)
        y, y_ref = run_both(CppInt8ActivationKernel(), cfg, packed, x, bias, "relu")
        # each group's integer sum is exact; the sum of the groups' scaled sums may round in another order, and
        # rows whose groups cancel come out small beside those sums: bound by their magnitude, not the output's
        per_input_scale = scale.repeat_interleave(group_size, dim=1)[:, :in_f]
        dequantized_size = x.abs() + x.abs().amax(dim=1, keepdim=True) / 254  # |x_q * x_scale| at most this
        magnitude = dequantized_size @ (values.float().abs() * per_input_scale).T
        bound = rounding_bound(y_ref, magnitude, groups, "relu")
        assert bool(((y - y_ref).abs() <= bound).all()), f"seed {seed} shape {(batch, in_f, out_f)}: " \
            f"max diff {(y - y_ref).abs().max().item() if y.numel() else 0}"


def test_concurrent_python_threads(cpp_ops):
    """Calls from several Python threads (each with its own scratch buffers, sharing the pool) stay correct."""
    import threading

    gen = torch.Generator().manual_seed(17)
    cases = []
    for bits, act, kernel in [(1.58, "int8", CppInt8ActivationKernel()), (1, "binary", CppXnorKernel()),
                              (1.58, "float32", CppFloatActivationKernel())]:
        cfg = BitQuantConfig(weight_bits=bits, activation_dtype=act)
        prepared = kernel.prepare(random_packed(cfg, 130, 301, gen), cfg)
        x = torch.randn(9, 301, generator=gen)
        cases.append((kernel, prepared, x, kernel.forward(x, prepared)))
    failures = []

    def run(case):
        kernel, prepared, x, want = case
        for _ in range(50):
            if not torch.equal(kernel.forward(x, prepared), want):
                failures.append(kernel.name)
                return

    threads = [threading.Thread(target=run, args=(c,)) for c in cases * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures

"""Fixtures for the cpp_cpu tests: the built extension and the instruction set under test."""
from __future__ import annotations

import pytest
import torch

from backends.cpp_cpu.build import SPEC
from bitcore.extensions import missing_requirements

ISAS = {"avx512vnni": 2, "avxvnni": 3, "avx2": 1, "scalar": 0}


@pytest.fixture(scope="session")
def cpp_ops():
    """Build or load the extension; skip only where this machine cannot build at all."""
    missing = missing_requirements(SPEC)
    if missing:
        pytest.skip(f"cpp_cpu cannot be built here: {missing}")
    from backends.cpp_cpu.kernels import load_ops

    load_ops()  # a build failure with a compiler present is a test failure, not a skip
    return torch.ops.bitlab


@pytest.fixture(params=sorted(ISAS))
def isa(request, cpp_ops):
    """Run the test with the AVX-512 VNNI, AVX-VNNI and AVX2 kernels (where the CPU has them) and the scalar
    fallback."""
    features = cpp_ops.cpu_features().split("(")[0].split()
    needs = {"avx512vnni": ["avx2", "avx512f", "avx512bw", "avx512vl", "avx512vnni"], "avxvnni": ["avx2", "avxvnni"],
             "avx2": ["avx2"], "scalar": []}
    missing = [f for f in needs[request.param] if f not in features]
    if missing:
        pytest.skip(f"this CPU has no {' '.join(missing)}")
    cpp_ops.cpu_set_isa(ISAS[request.param])
    yield request.param
    cpp_ops.cpu_set_isa(-1)

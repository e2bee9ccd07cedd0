"""Fixtures for the cpp_cpu tests: the built extension and the instruction set under test."""
from __future__ import annotations

import pytest
import torch

from backends.cpp_cpu.build import SPEC
from bitcore.extensions import missing_requirements

ISAS = {"avx2": 1, "scalar": 0}


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
    """Run the test once with the AVX2 kernels (where the CPU has them) and once with the scalar fallback."""
    if request.param == "avx2" and "avx2" not in cpp_ops.cpu_features().split("(")[0]:
        pytest.skip("this CPU has no AVX2")
    cpp_ops.cpu_set_isa(ISAS[request.param])
    yield request.param
    cpp_ops.cpu_set_isa(-1)

"""How the cuda_ext extension is built (read by build_extensions.py and by backends.cuda_ext.ops).

Targets: sm_80 and sm_90a by default; ``BITLAB_CUDA_ARCHS`` (e.g. ``"90a"``) narrows the
list, which halves the build on a known GPU.  The kernel files (``csrc/*.cu``) include no
torch headers; ``csrc/bindings.cpp`` is the only file that does.
"""
from __future__ import annotations

import os
from pathlib import Path

from bitcore.extensions import ExtensionSpec

CSRC = Path(__file__).resolve().parent / "csrc"
CHECK_INCLUDE = Path(__file__).resolve().parents[2] / "bitcore" / "csrc"  # bitlab_check.h
ARCHS_ENV = "BITLAB_CUDA_ARCHS"
DEFAULT_ARCHS = ("80", "90a")
KERNEL_SOURCES = tuple(sorted(CSRC.glob("*.cu")))


def gencode_flags(archs=None) -> list:
    """nvcc -gencode flags for ``archs`` (default: $BITLAB_CUDA_ARCHS or sm_80 + sm_90a)."""
    if archs is None:
        env = os.environ.get(ARCHS_ENV, "").replace(",", ";").split(";")
        archs = [a.strip() for a in env if a.strip()] or list(DEFAULT_ARCHS)
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]


NVCC_FLAGS = ["-O3", "-std=c++17", "--threads=2", "-lineinfo"]

SPEC = ExtensionSpec(
    name="bitlab_cuda_ext",
    sources=[CSRC / "bindings.cpp", *KERNEL_SOURCES],
    extra_cflags=["-O3"],
    extra_cuda_cflags=NVCC_FLAGS + gencode_flags(),
    extra_include_paths=[str(CSRC), str(CHECK_INCLUDE)],
    cuda=True,
    requirements=("nvcc",),
)

EXTENSIONS = [SPEC]

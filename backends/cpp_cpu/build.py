"""The cpp_cpu extension: sources and flags (read by build_extensions.py and the plugin).

The kernels pick AVX2 or scalar code at run time (``__attribute__((target))`` plus
``__builtin_cpu_supports``), so the library is built for the baseline ISA and runs on
any x86-64 CPU; ``-ffp-contract=off`` keeps ``acc * x_scale * w_scale + bias`` rounded
exactly as the reference computes it (no fused multiply-add).
"""
from pathlib import Path

from bitcore.extensions import ExtensionSpec

CSRC = Path(__file__).resolve().parent / "csrc"
CHECK_INCLUDE = Path(__file__).resolve().parents[2] / "bitcore" / "csrc"  # bitlab_check.h

SPEC = ExtensionSpec(
    name="bitlab_cpp_cpu",
    sources=tuple(sorted(CSRC.glob("*.cpp"))),
    extra_cflags=("-O3", "-ffp-contract=off", "-fno-math-errno"),
    extra_include_paths=(str(CHECK_INCLUDE),),
    python_module=False,
)

EXTENSIONS = [SPEC]

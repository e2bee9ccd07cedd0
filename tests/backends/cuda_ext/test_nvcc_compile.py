"""CI guard: every cuda_ext kernel file compiles with nvcc for sm_80 and sm_90a (no GPU needed).

The kernel files include no torch headers (csrc/bitlab_launch.h is their whole host
interface), so a bare nvcc compiles them to object files. bindings.cpp needs torch's
headers: the host compiler checks it (syntax and types; linking needs a CUDA build of
torch and happens in the GPU tests' extension build).
"""
import os
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from backends.cuda_ext.build import CHECK_INCLUDE, CSRC, KERNEL_SOURCES, NVCC_FLAGS, gencode_flags

NVCC = shutil.which("nvcc")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    if NVCC is None:
        pytest.skip("nvcc not on PATH: the CUDA toolkit is not installed here")
    out = tmp_path_factory.mktemp("cuda_ext_objs")
    flags = [f for f in NVCC_FLAGS if f != "-lineinfo"] + gencode_flags(["80", "90a"])

    def build(src):
        cmd = [NVCC, *flags, "-Xcompiler", "-fPIC", "-I", str(CSRC), "-c", str(src), "-o", str(out / (src.name + ".o"))]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        return src.name, proc.returncode, proc.stderr

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = {name: (rc, err) for name, rc, err in pool.map(build, KERNEL_SOURCES)}
    results["_out"] = out
    return results


@pytest.mark.parametrize("source", [p.name for p in KERNEL_SOURCES])
def test_kernel_file_compiles_for_sm80_and_sm90a(compiled, source):
    rc, err = compiled[source]
    assert rc == 0, f"nvcc failed on {source}:\n{err[-4000:]}"
    assert "warning" not in err.lower(), f"nvcc warned on {source}:\n{err[-4000:]}"


def test_kernel_objects_link_together(compiled):
    # The extension links every kernel object into one library: a non-inline function defined
    # in a shared header would be defined twice (the compile of each file alone cannot see it).
    objs = sorted(str(p) for p in compiled["_out"].glob("*.o"))
    if len(objs) != len(KERNEL_SOURCES):
        pytest.skip("some kernel files failed to compile (reported by their own test)")
    cmd = [NVCC, "-shared", "-o", str(compiled["_out"] / "libcheck.so"), *objs]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"linking the kernel objects failed:\n{proc.stderr[-4000:]}"


def test_kernel_sources_are_torch_free():
    for src in list(KERNEL_SOURCES) + sorted(CSRC.glob("*.cuh")) + sorted(CSRC.glob("*.h")):
        text = src.read_text()
        assert "torch/" not in text and "ATen/" not in text, f"{src.name} includes torch headers"


PROBES = sorted(p.stem for p in (CSRC.parents[2] / "benchmarks" / "csrc").glob("*.cu"))


def test_the_probes_are_found():
    assert {"attention_timeline", "mlp_timeline", "code_fetch"} <= set(PROBES)


@pytest.mark.parametrize("probe", PROBES)
def test_benchmark_probe_compiles(tmp_path, probe):
    # benchmarks/csrc/<probe>.cu are the benchmarks' standalone programs; the timeline probes compile a kernel
    # file with its BITLAB_TIMELINE stamps (compiled out of the extension): a change to the kernel must keep
    # them building, and a probe that fails to build would first show on the GPU machine.
    if NVCC is None:
        pytest.skip("nvcc not on PATH: the CUDA toolkit is not installed here")
    source = CSRC.parents[2] / "benchmarks" / "csrc" / f"{probe}.cu"
    flags = [f for f in NVCC_FLAGS if f != "-lineinfo"] + gencode_flags(["90a"])
    cmd = [NVCC, *flags, "-c", str(source), "-o", str(tmp_path / f"{probe}.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"nvcc failed on {source.name}:\n{proc.stderr[-4000:]}"
    assert "warning" not in proc.stderr.lower(), f"nvcc warned on {source.name}:\n{proc.stderr[-4000:]}"



def test_bindings_parse_against_this_torchs_headers(tmp_path):
    # bindings.cpp (the ops' schemas and their checks) is otherwise first compiled on the GPU machine, where a
    # typo costs a device call.  A CPU build of torch ships the c10/cuda headers but not the one cmake generates
    # for CUDA builds; a stub stands in for it, and the host compiler checks the syntax and the types.
    from torch.utils import cpp_extension

    gxx = shutil.which("g++")
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME, "/usr/local/cuda",
             Path(NVCC).resolve().parents[1] if NVCC else None]
    includes = [Path(h) / "include" for h in homes if h and (Path(h) / "include" / "cuda_runtime.h").exists()]
    if gxx is None or not includes:
        pytest.skip("needs g++ and the CUDA toolkit's headers (CUDA_HOME, or /usr/local/cuda)")
    cuda_include = includes[0]

    headers = cpp_extension.include_paths()
    if not any((Path(h) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists() for h in headers):
        stub = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
        stub.parent.mkdir(parents=True)
        stub.write_text("#pragma once\n")
    cmd = [gxx, "-std=c++17", "-fsyntax-only", "-w", f"-I{tmp_path}", f"-I{CSRC}", f"-I{CHECK_INCLUDE}", f"-I{cuda_include}",
           *(f"-I{h}" for h in headers), f"-I{sysconfig.get_paths()['include']}", "-DTORCH_EXTENSION_NAME=bitlab_check",
           str(CSRC / "bindings.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"bindings.cpp does not compile:\n{proc.stderr[-4000:]}"

"""Building and loading backends' C++/CUDA extensions: ahead of time or on first use, cached.

One mechanism serves both: an extension is compiled with
``torch.utils.cpp_extension.load`` into a build directory keyed by the
extension name, the torch version and the Python version under
``$BITLAB_EXTENSIONS_DIR`` (default ``~/.cache/bitlab/extensions``).
``build_extensions.py`` fills that cache ahead of time; at run time a cached,
up-to-date build is loaded without compiling, otherwise it is compiled once
with a one-line message on stderr.

Example (in a backend)::

    SPEC = ExtensionSpec(name="bitlab_cpp_cpu", sources=[CSRC / "ternary.cpp"], extra_cflags=["-O3"])
    module = load_extension(SPEC)        # raises BackendUnavailableError with the reason
"""
from __future__ import annotations

import os
import shutil
import sys
import sysconfig
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from bitcore.errors import BackendUnavailableError

CACHE_ENV = "BITLAB_EXTENSIONS_DIR"
_loaded: Dict[str, object] = {}
_failed: Dict[str, str] = {}
_lock = threading.Lock()


@dataclass(frozen=True)
class ExtensionSpec:
    """How to build one extension module."""

    name: str
    sources: Sequence[Path]
    extra_cflags: Sequence[str] = ()
    extra_cuda_cflags: Sequence[str] = ()
    extra_ldflags: Sequence[str] = ()
    extra_include_paths: Sequence[str] = ()
    cuda: bool = False
    requirements: Sequence[str] = field(default_factory=tuple)  # executables that must be on PATH
    # False for a library that only registers torch.library ops (no PyInit_): it is loaded
    # with torch.ops.load_library and load_extension returns its path.
    python_module: bool = True


def cache_root() -> Path:
    root = os.environ.get(CACHE_ENV)
    return Path(root) if root else Path.home() / ".cache" / "bitlab" / "extensions"


def build_directory(spec: ExtensionSpec) -> Path:
    import torch

    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    tag = f"{spec.name}-torch{torch.__version__.replace('+', '_')}-{py}"
    return cache_root() / tag


def missing_requirements(spec: ExtensionSpec) -> Optional[str]:
    """Why this machine cannot build ``spec`` (None when it can)."""
    import torch

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r} not on PATH)"
    if not Path(sysconfig.get_paths()["include"], "Python.h").exists():
        return "Python development headers (Python.h) are missing"
    for exe in spec.requirements:
        if shutil.which(exe) is None:
            return f"{exe!r} not on PATH"
    if spec.cuda:
        from torch.utils import cpp_extension

        if torch.version.cuda is None:
            return f"this torch ({torch.__version__}) is a CPU build; CUDA extensions need a CUDA build"
        if cpp_extension.CUDA_HOME is None:
            return "CUDA toolkit not found (set CUDA_HOME or put nvcc on PATH)"
    for src in spec.sources:
        if not Path(src).exists():
            return f"source file missing: {src}"
    return None


def _built_library(spec: ExtensionSpec) -> Optional[Path]:
    directory = build_directory(spec)
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    for candidate in (directory / f"{spec.name}{suffix}", directory / f"{spec.name}.so"):
        if candidate.exists():
            return candidate
    return None


def load_extension(spec: ExtensionSpec, verbose: bool = False, announce: bool = True):
    """Load (compiling on first use) the extension; raise BackendUnavailableError with the reason."""
    with _lock:
        if spec.name in _loaded:
            return _loaded[spec.name]
        if spec.name in _failed:
            raise BackendUnavailableError(_failed[spec.name])
        missing = missing_requirements(spec)
        if missing:
            _failed[spec.name] = f"cannot build {spec.name}: {missing}"
            raise BackendUnavailableError(_failed[spec.name])
        directory = build_directory(spec)
        directory.mkdir(parents=True, exist_ok=True)
        if announce and _built_library(spec) is None:
            print(
                f"bitlab: compiling extension {spec.name} on first use (cached in {directory}); "
                f"run `python build_extensions.py` to do this ahead of time",
                file=sys.stderr,
                flush=True,
            )
        try:
            module = _compile_and_load(spec, directory, verbose)
        except Exception as exc:  # compiler errors arrive as RuntimeError / subprocess errors
            text = str(exc).strip().splitlines()
            detail = text[-1] if text else type(exc).__name__
            _failed[spec.name] = f"building {spec.name} failed: {detail} (rebuild with `python build_extensions.py -v` for the log)"
            raise BackendUnavailableError(_failed[spec.name]) from exc
        _loaded[spec.name] = module
        return module


def _compile_and_load(spec: ExtensionSpec, directory: Path, verbose: bool):
    from torch.utils import cpp_extension

    return cpp_extension.load(
        name=spec.name,
        sources=[str(s) for s in spec.sources],
        extra_cflags=list(spec.extra_cflags),
        extra_cuda_cflags=list(spec.extra_cuda_cflags),
        extra_ldflags=list(spec.extra_ldflags),
        extra_include_paths=list(spec.extra_include_paths),
        build_directory=str(directory),
        with_cuda=spec.cuda,
        is_python_module=spec.python_module,
        verbose=verbose,
    )


def extension_status(spec: ExtensionSpec) -> str:
    """One line: loaded, built and cached, failed (why), or not built yet."""
    if spec.name in _loaded:
        return "loaded"
    if spec.name in _failed:
        return _failed[spec.name]
    missing = missing_requirements(spec)
    if missing:
        return f"cannot build: {missing}"
    return "built (cached)" if _built_library(spec) else "not built yet (compiles on first use)"


def reset_for_tests(names: List[str]) -> None:
    """Forget load results for ``names`` (tests simulate missing compilers with this)."""
    with _lock:
        for n in names:
            _loaded.pop(n, None)
            _failed.pop(n, None)

"""Discovery: one conformance case per (kernel, key, device) the registry knows and this machine has."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

try:  # the generated-problem tests need hypothesis; where it is missing (the GPU box) only they are left out
    import hypothesis  # noqa: F401
except ImportError:
    collect_ignore = ["test_kernels_match_reference.py", "test_bitlinear_dispatch.py"]

from bitcore.kernels import BitKernel, KernelKey, KernelRegistry


@dataclass(frozen=True)
class Case:
    kernel: BitKernel
    key: KernelKey
    device: str

    def __str__(self) -> str:
        return f"{self.kernel.name}-{self.device}-{self.key}"


def devices_here() -> set:
    return {"cpu"} | ({"cuda"} if torch.cuda.is_available() else set())


def selected_backends(config) -> list:
    """Backends the run covers: all registered, or those named by --bitlab-backend (checked)."""
    known = KernelRegistry.backend_names()
    wanted = config.getoption("--bitlab-backend") or known
    unknown = [name for name in wanted if name not in known]
    if unknown:
        failures = "\n".join(f"  {f}" for f in KernelRegistry.plugin_failures()) or "  none"
        raise pytest.UsageError(
            f"--bitlab-backend: unknown backend(s) {unknown}; registered backends are {known}.\n"
            f"Plugin failures (a plugin that failed to load is listed here):\n{failures}"
        )
    return wanted


def cases(config, *, per_key: bool) -> list:
    """pytest params for every (kernel, key, device), or every (backend, device) when not per_key."""
    params = []
    here = devices_here()
    for backend in selected_backends(config):
        for kernel in [k for k in KernelRegistry.kernels() if k.backend == backend]:
            available = KernelRegistry.kernel_availability(kernel)
            for device in sorted(kernel.devices):
                marks = [pytest.mark.gpu] if device == "cuda" else []
                if device not in here:
                    marks.append(pytest.mark.skip(reason=f"no {device} device on this machine"))
                elif not available:
                    marks.append(pytest.mark.skip(reason=f"{kernel.name} unavailable: {available.reason}"))
                keys = sorted(kernel.keys) if per_key else [None]
                for key in keys:
                    case = Case(kernel, key, device)
                    params.append(pytest.param(case, id=str(case) if per_key else f"{kernel.name}-{device}", marks=marks))
    return params


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        metafunc.parametrize("case", cases(metafunc.config, per_key=True))
    if "backend_case" in metafunc.fixturenames:
        metafunc.parametrize("backend_case", cases(metafunc.config, per_key=False))

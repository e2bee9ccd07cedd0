"""The cpp_cpu plugin: cheap import, dispatch to it where it builds, a clear reason where it cannot."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bitcore.extensions as extensions
from backends.cpp_cpu.build import SPEC
from bitcore.config import BitQuantConfig
from bitcore.kernels import Registry
from bitlayers.bitlinear import BitLinear

ROOT = Path(__file__).resolve().parents[3]
BUILTINS = ("backends.torch_ref.plugin", "backends.cpp_cpu.plugin")


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=300)


def test_default_config_is_served_by_cpp(cpp_ops):
    """Seed 004's installation check: the default W1.58A8 per_tensor/per_tensor key has a C++ kernel."""
    layer = BitLinear(67, 5, quant_config=BitQuantConfig()).eval()
    kernel = layer.kernel()
    assert kernel.backend == "cpp_cpu" and kernel.has_cpp_backend
    x = torch.randn(3, 67)
    with torch.no_grad():
        y = layer(x)
        reference = BitLinear(67, 5, quant_config=BitQuantConfig(), backend="torch_ref")
        reference.load_state_dict(layer.state_dict())
        assert torch.equal(y, reference.eval()(x))


def test_import_and_registration_do_not_compile(tmp_path):
    result = run_python(
        "import backends.cpp_cpu.plugin as p, backends.cpp_cpu.kernels as k\n"
        "spec = p.bitlab_register_backend()\n"
        "print(spec.name, len(spec.kernels))\n"
        "print(k.status())\n",
        BITLAB_EXTENSIONS_DIR=str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert "cpp_cpu 3" in result.stdout
    assert "not built yet" in result.stdout
    assert not any(tmp_path.iterdir()), "registering the plugin created a build"


def test_missing_compiler_reports_reason_and_falls_back(tmp_path):
    """With no compiler (and no cached build) the backend is unavailable, says why, and BitLinear still runs."""
    result = run_python(
        "import torch\n"
        "from bitcore.kernels import KernelRegistry\n"
        "from bitcore.config import BitQuantConfig\n"
        "from bitlayers.bitlinear import BitLinear\n"
        "print(KernelRegistry.explain(BitQuantConfig()))\n"
        "layer = BitLinear(33, 4).eval()\n"
        "print('chosen', layer.kernel().name, tuple(layer(torch.randn(2, 33)).shape))\n",
        CXX="/nonexistent/c++", BITLAB_EXTENSIONS_DIR=str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert "cpp_cpu.CppInt8ActivationKernel" in result.stdout
    assert "no C++ compiler ('/nonexistent/c++' not on PATH)" in result.stdout
    assert "chosen torch_ref.TorchReferenceKernel (2, 4)" in result.stdout


def test_build_extensions_skips_with_reason(tmp_path):
    result = subprocess.run([sys.executable, "build_extensions.py", "cpp_cpu"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300,
                            env={**os.environ, "CXX": "/nonexistent/c++", "BITLAB_EXTENSIONS_DIR": str(tmp_path)})
    assert "skip   bitlab_cpp_cpu: no C++ compiler" in result.stdout
    assert "0 built, 1 skipped, 0 failed" in result.stdout


def test_failed_build_in_process(monkeypatch, cpp_ops):
    """A simulated missing toolchain makes only cpp_cpu unavailable, with the reason, in a fresh registry."""
    monkeypatch.setattr(extensions, "missing_requirements", lambda spec: "simulated: compiler removed")
    extensions.reset_for_tests([SPEC.name])
    try:
        registry = Registry(builtin=BUILTINS, use_entry_points=False)
        cfg = BitQuantConfig(weight_bits=1, activation_dtype="binary")
        explanation = str(registry.explain(cfg))
        assert "cannot build bitlab_cpp_cpu: simulated: compiler removed" in explanation
        assert registry.get_kernel_for_config(cfg).backend == "torch_ref"
        status = {b.name: b.availability for b in registry.backends()}
        assert not status["cpp_cpu"] and "simulated" in status["cpp_cpu"].reason
    finally:
        monkeypatch.undo()
        extensions.reset_for_tests([SPEC.name])
    # the real build is still there afterwards
    assert Registry(builtin=BUILTINS, use_entry_points=False).get_kernel_for_config(cfg).backend == "cpp_cpu"

"""Broken third-party plugins are isolated and reported; ties between plugins resolve deterministically.

The plugins are real installed distributions (fake_plugins.py) found through
the ``bitlab.backends`` entry-point group, in a child process running
``bitlab info`` the way a user would.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from backends.torch_ref.kernels import TorchReferenceKernel
from bitcore.config import BitQuantConfig
from bitcore.hookspecs import BackendSpec
from bitcore.kernels import BitKernel, Registry

from . import fake_plugins

REPO = Path(__file__).resolve().parents[2]
TERNARY_FP32 = BitQuantConfig(weight_bits=1.58, activation_dtype="float32")


def run_python(site: Path, code: str, hash_seed: str = "0") -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(REPO)]), PYTHONHASHSEED=hash_seed)
    env.pop("BITLAB_BACKEND", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def info_output(tmp_path_factory) -> str:
    site = fake_plugins.install(tmp_path_factory.mktemp("site"))
    return run_python(site, "import sys; from bitmodels.cli.main import main; sys.exit(main(['info']))")


def test_plugin_raising_at_import_is_reported_by_bitlab_info(info_output):
    line = next(l for l in info_output.splitlines() if "raises_at_import" in l)
    assert "failed at import" in line and "libfastbits.so" in line


def test_plugin_raising_at_registration_is_reported_by_bitlab_info(info_output):
    line = next(l for l in info_output.splitlines() if "raises_at_registration" in l)
    assert "failed at register" in line and "device table is empty" in line


def test_kernel_failing_its_self_check_is_disabled_and_reported(info_output):
    line = next(l for l in info_output.splitlines() if "SignFlipKernel" in l)
    assert "self-check failed" in line and "max |error|" in line
    # the registry table serves the ternary float32 key from the next candidate, not the broken kernel
    row = next(l for l in info_output.splitlines() if l.strip().startswith("w1.58/float32/per_tensor/none") and " cpu " in l)
    assert "SignFlipKernel" not in row and "tie_alpha.TieKernel" in row


def test_the_working_backends_still_serve_with_broken_plugins_around(info_output):
    assert "torch_ref    available" in info_output.replace("\t", " ")


def test_equal_priority_tie_resolves_the_same_way_in_every_process(tmp_path):
    site = fake_plugins.install(tmp_path, names=("tie_beta", "tie_alpha"))
    code = (
        "from bitcore.kernels import KernelRegistry; from bitcore import BitQuantConfig\n"
        "print(KernelRegistry.explain(BitQuantConfig(weight_bits=1.58, activation_dtype='float32'), 'cpu'))"
    )
    outputs = {run_python(site, code, hash_seed=seed) for seed in ("0", "12345")}
    assert len(outputs) == 1, f"the choice depends on the process: {outputs}"
    text = outputs.pop()
    assert "-> tie_alpha.TieKernel" in text
    assert "tie with ['tie_beta.TieKernel'] broken by name order" in text
    assert "same priority as tie_alpha.TieKernel; loses on name order" in text


def _tie_kernel(backend: str) -> BitKernel:
    k = type("TieKernel", (TorchReferenceKernel,), {})()
    k.backend, k.priority = backend, 700
    return k


def test_equal_priority_tie_does_not_depend_on_registration_order():
    chosen = []
    for order in (("zeta", "alpha", "mid"), ("mid", "zeta", "alpha"), ("alpha", "mid", "zeta")):
        reg = Registry(builtin=("backends.torch_ref.plugin",), use_entry_points=False)
        for name in order:
            reg.register_backend(BackendSpec(name=name, kernels=[_tie_kernel(name)]))
        exp = reg.explain(TERNARY_FP32, "cpu")
        chosen.append(exp.chosen.name)
        assert "broken by name order" in str(exp)
    assert chosen == ["alpha.TieKernel"] * 3


def test_self_check_failure_falls_back_and_explain_says_why(reference_registry):
    class Wrong(TorchReferenceKernel):
        backend, priority = "wrong", 900
        self_check = BitKernel.self_check  # the default check, not the reference's opt-out

        def forward(self, x, prepared, bias=None, activation="none"):
            return super().forward(x, prepared, bias, activation) * 1.01  # 1% off: a subtle bug

    reg = reference_registry
    reg.register_backend(BackendSpec(name="wrong", kernels=[Wrong()]))
    exp = reg.explain(TERNARY_FP32, "cpu")
    assert exp.chosen.backend == "torch_ref"
    reason = next(c.reason for c in exp.candidates if c.kernel == "wrong.Wrong")
    assert reason.startswith("self-check failed") and "against torch_ref" in reason
    wrong = next(k for k in reg.kernels() if k.backend == "wrong")
    status = reg.kernel_status(wrong)
    assert not status and status.reason.startswith("self-check failed")


def test_self_check_that_raises_is_a_failure_not_a_crash(reference_registry):
    class Exploding(TorchReferenceKernel):
        backend, priority = "exploding", 900

        def self_check(self):
            raise MemoryError("probe allocation failed")

    reg = reference_registry
    reg.register_backend(BackendSpec(name="exploding", kernels=[Exploding()]))
    exp = reg.explain(TERNARY_FP32, "cpu")
    assert exp.chosen.backend == "torch_ref"
    assert "self-check raised MemoryError: probe allocation failed" in str(exp)


def test_default_self_check_passes_for_a_correct_kernel_and_runs_once(reference_registry):
    calls = []

    class Counting(TorchReferenceKernel):
        backend, priority = "counting", 900

        def self_check(self):
            calls.append(1)
            return BitKernel.self_check(self)

    reg = reference_registry
    reg.register_backend(BackendSpec(name="counting", kernels=[Counting()]))
    for _ in range(3):
        assert reg.get_kernel_for_config(TERNARY_FP32, "cpu").backend == "counting"
        reg.explain(BitQuantConfig(weight_bits=1, activation_dtype="int8"), "cpu")
    assert len(calls) == 1

import sys
import types

import pytest

from bitcore.hookspecs import BackendSpec, hookimpl
from bitcore.plugins import ENTRY_POINT_GROUP, load_backends
from bitcore.kernels import Registry


def _plugin_module(name, body):
    mod = types.ModuleType(name)
    exec(body, mod.__dict__)
    return mod


def test_builtin_reference_loads_through_the_plugin_hook():
    specs, failures = load_backends(builtin=("backends.torch_ref.plugin",), use_entry_points=False)
    assert [s.name for s in specs] == ["torch_ref"] and not failures


def test_plugin_failing_at_import_is_reported_not_fatal(monkeypatch):
    mod = "bitlab_test_broken_at_import"
    monkeypatch.setitem(sys.modules, mod, None)  # import raises ImportError
    specs, failures = load_backends(builtin=("backends.torch_ref.plugin", mod), use_entry_points=False)
    assert [s.name for s in specs] == ["torch_ref"]
    assert failures[0].plugin == mod and failures[0].stage == "import"


def test_plugin_raising_in_its_hook_is_isolated():
    class Raising:
        @hookimpl
        def bitlab_register_backend(self):
            raise RuntimeError("GPU driver exploded")

    specs, failures = load_backends(builtin=("backends.torch_ref.plugin",), use_entry_points=False,
                                    extra_plugins=[Raising()])
    assert [s.name for s in specs] == ["torch_ref"]
    assert failures[0].stage == "register" and "GPU driver exploded" in failures[0].error


def test_plugin_returning_wrong_type_is_reported():
    class Wrong:
        @hookimpl
        def bitlab_register_backend(self):
            return ["not", "a", "spec"]

    _, failures = load_backends(builtin=(), use_entry_points=False, extra_plugins=[Wrong()])
    assert failures[0].stage == "validate" and "expected BackendSpec" in failures[0].error


def test_third_party_plugin_registered_through_real_entry_point():
    from importlib import metadata

    names = [ep.name for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)]
    if "example_dense" not in names:
        pytest.fail("examples/bitlab_example_plugin is not installed (scripts/bootstrap.sh installs it)")
    reg = Registry(builtin=("backends.torch_ref.plugin",), use_entry_points=True)
    assert "example_dense" in reg.backend_names()
    from bitcore.config import BitQuantConfig

    cfg = BitQuantConfig(activation_dtype="float32")
    assert reg.get_kernel_for_config(cfg, backend="example_dense").name == "example_dense.DequantDenseKernel"
    assert reg.get_kernel_for_config(cfg).backend == "torch_ref"  # priority -10: only when forced


def test_disable_env_skips_a_plugin(monkeypatch):
    monkeypatch.setenv("BITLAB_DISABLE_PLUGINS", "example_dense")
    specs, _ = load_backends(builtin=("backends.torch_ref.plugin",), use_entry_points=True)
    assert "example_dense" not in [s.name for s in specs]


def test_import_bitcore_survives_broken_builtin(monkeypatch):
    reg = Registry(builtin=("backends.torch_ref.plugin", "backends.does_not_exist.plugin"), use_entry_points=False)
    assert reg.backend_names() == ["torch_ref"]
    assert "does_not_exist" in str(reg.plugin_failures()[0])

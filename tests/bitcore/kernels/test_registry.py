import pytest
import torch

from bitcore.config import BitQuantConfig
from bitcore.errors import BackendUnavailableError, NoKernelError
from bitcore.hookspecs import BackendSpec
from bitcore.kernels import Availability, BitKernel, KernelKey, Registry, keys_product
from backends.torch_ref.kernels import TorchReferenceKernel

TERNARY_FP32 = BitQuantConfig(weight_bits=1.58, activation_dtype="float32")


def make_kernel(name, backend, priority, keys=None, devices=("cpu",), available=True, shape_limit=None):
    cls = type(name, (TorchReferenceKernel,), {})
    k = cls()
    k.backend = backend
    k.priority = priority
    k.devices = frozenset(devices)
    if keys is not None:
        k.keys = keys
    k.availability = (lambda: Availability.yes()) if available else (lambda: Availability.no("driver missing"))
    if shape_limit:
        k.check_shape = lambda in_f, out_f: shape_limit if in_f % 2 else None
    return k


@pytest.fixture
def registry():
    reg = Registry(builtin=("backends.torch_ref.plugin",), use_entry_points=False)
    return reg


def test_reference_serves_every_key_on_cpu_and_cuda(registry):
    for key in keys_product():
        cfg = BitQuantConfig(weight_bits=1.58 if key.weight_bits == 1.58 else int(key.weight_bits),
                             weight_granularity=key.weight_granularity, activation_dtype=key.activation_dtype)
        for dev in ("cpu", "cuda"):
            assert registry.explain(cfg, dev).chosen.backend == "torch_ref"


def test_highest_priority_wins_and_explain_says_why(registry):
    registry.register(make_kernel("Fast", "fastb", 100))
    exp = registry.explain(TERNARY_FP32, "cpu")
    assert exp.chosen.name == "fastb.Fast"
    statuses = {c.kernel: (c.status, c.reason) for c in exp.candidates}
    assert statuses["torch_ref.TorchReferenceKernel"][0] == "eligible"
    assert "lower priority" in statuses["torch_ref.TorchReferenceKernel"][1]
    assert "fastb.Fast" in str(exp)


def test_unavailable_kernel_is_rejected_with_reason(registry):
    registry.register(make_kernel("Broken", "gpu_only", 100, available=False))
    exp = registry.explain(TERNARY_FP32, "cpu")
    assert exp.chosen.backend == "torch_ref"
    reasons = {c.kernel: c.reason for c in exp.candidates}
    assert "driver missing" in reasons["gpu_only.Broken"]


def test_key_device_and_shape_rejections(registry):
    registry.register(make_kernel("OnlyBinary", "b1", 100, keys=keys_product(weight_bits=[1])))
    registry.register(make_kernel("OnlyCuda", "b2", 100, devices=("cuda",)))
    registry.register(make_kernel("EvenK", "b3", 100, shape_limit="needs even in_features"))
    exp = registry.explain(TERNARY_FP32, "cpu", in_features=7, out_features=3)
    reasons = {c.kernel: c.reason for c in exp.candidates}
    assert "does not serve" in reasons["b1.OnlyBinary"]
    assert "not cpu" in reasons["b2.OnlyCuda"]
    assert "needs even in_features" in reasons["b3.EvenK"]
    assert exp.chosen.backend == "torch_ref"
    assert registry.get_kernel_for_config(TERNARY_FP32, "cpu", in_features=8, out_features=3).backend == "b3"


def test_priority_tie_breaks_by_name_deterministically(registry):
    registry.register(make_kernel("Zeta", "tie_b", 7))
    registry.register(make_kernel("Alpha", "tie_a", 7))
    exp = registry.explain(TERNARY_FP32, "cpu")
    assert exp.chosen.name == "tie_a.Alpha"
    chosen = [c for c in exp.candidates if c.status == "chosen"][0]
    assert "tie with ['tie_b.Zeta']" in chosen.reason


def test_force_by_argument_context_and_env(registry, monkeypatch):
    registry.register(make_kernel("Fast", "fastb", 100))
    assert registry.get_kernel_for_config(TERNARY_FP32, "cpu", backend="torch_ref").backend == "torch_ref"
    with registry.force_backend("torch_ref"):
        assert registry.get_kernel_for_config(TERNARY_FP32, "cpu").backend == "torch_ref"
        assert "force_backend()" in str(registry.explain(TERNARY_FP32, "cpu"))
    assert registry.get_kernel_for_config(TERNARY_FP32, "cpu").backend == "fastb"
    monkeypatch.setenv("BITLAB_BACKEND", "torch_ref")
    assert registry.get_kernel_for_config(TERNARY_FP32, "cpu").backend == "torch_ref"
    assert "$BITLAB_BACKEND" in str(registry.explain(TERNARY_FP32, "cpu"))


def test_forced_backend_that_cannot_serve_is_an_error_not_a_fallback(registry):
    registry.register(make_kernel("OnlyBinary", "b1", 100, keys=keys_product(weight_bits=[1])))
    with pytest.raises(NoKernelError, match="does not serve w1.58"):
        registry.get_kernel_for_config(TERNARY_FP32, "cpu", backend="b1")


def test_unknown_forced_backend_lists_known(registry):
    with pytest.raises(BackendUnavailableError, match="unknown backend 'nope'.*torch_ref"):
        registry.get_kernel_for_config(TERNARY_FP32, "cpu", backend="nope")
    with pytest.raises(BackendUnavailableError):
        with registry.force_backend("nope"):
            pass


def test_register_decorator_form(registry):
    @registry.register()
    class DecoratedKernel(TorchReferenceKernel):
        backend = "deco"
        priority = 5

    assert registry.get_kernel_for_config(TERNARY_FP32).name == "deco.DecoratedKernel"
    registry.unregister("deco.DecoratedKernel")
    assert registry.get_kernel_for_config(TERNARY_FP32).backend == "torch_ref"


def test_register_backend_spec_with_unavailable_backend(registry):
    spec = BackendSpec(name="offline", kernels=[make_kernel("K", "offline", 100)],
                       availability=lambda: Availability.no("no device here"))
    registry.register_backend(spec)
    status = {b.name: b for b in registry.backends()}
    assert not status["offline"].availability
    assert "no device here" in status["offline"].availability.reason
    assert registry.get_kernel_for_config(TERNARY_FP32).backend == "torch_ref"


def test_failed_self_check_disables_kernel(registry):
    k = make_kernel("Liar", "liar", 100)
    k.self_check = lambda: "wrong answer on a 3x5 probe"
    registry.register(k)
    exp = registry.explain(TERNARY_FP32, "cpu")
    assert exp.chosen.backend == "torch_ref"
    assert any("self-check failed: wrong answer" in c.reason for c in exp.candidates)


def test_no_kernel_error_lists_every_candidate():
    reg = Registry(builtin=(), use_entry_points=False)
    reg.register(make_kernel("OnlyCuda", "b2", 1, devices=("cuda",)))
    with pytest.raises(NoKernelError, match="not cpu"):
        reg.get_kernel_for_config(TERNARY_FP32, "cpu")


def test_key_from_config_ignores_granularity_for_float_activations():
    a = KernelKey.from_config(BitQuantConfig(activation_dtype="float16", activation_granularity="per_token"))
    b = KernelKey.from_config(BitQuantConfig(activation_dtype="float16", activation_granularity="per_tensor"))
    assert a == b and a.activation_granularity == "none"


def test_default_device_is_cpu_and_accepts_torch_device(registry):
    assert registry.get_kernel_for_config(TERNARY_FP32) is registry.get_kernel_for_config(TERNARY_FP32, torch.device("cpu"))

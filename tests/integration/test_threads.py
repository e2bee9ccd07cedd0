"""One model used from several Python threads, and the registry changed while they dispatch."""
from __future__ import annotations

import sys
import threading
import time

import pytest
import torch

from backends.torch_ref.kernels import TorchReferenceKernel
from bitcore.config import BitQuantConfig
from bitcore.hookspecs import BackendSpec
from bitcore.kernels import KernelRegistry, Registry
from bitlayers import BitLinear

CONFIGS = [
    BitQuantConfig(weight_bits=1.58, activation_dtype="int8", activation_granularity="per_token"),
    BitQuantConfig(weight_bits=1, activation_dtype="float32", weight_granularity="per_channel"),
    BitQuantConfig(weight_bits=4, activation_dtype="int8", weight_granularity="per_group", group_size=16),
]


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    layers = []
    for i, cfg in enumerate(CONFIGS):
        layers += [BitLinear(37 if i == 0 else 29, 29, quant_config=cfg), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers).eval()


def run_threads(target, n: int, seconds: float) -> list:
    """Run ``target(i, stop)`` in n threads for ``seconds``; return the exceptions they raised."""
    errors, stop = [], threading.Event()

    def wrapped(i):
        try:
            target(i, stop)
        except BaseException as exc:  # collected and re-raised by the test
            errors.append(exc)
            stop.set()

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, so races show up in a short run
    try:
        threads = [threading.Thread(target=wrapped, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        time.sleep(seconds)
        stop.set()
        for t in threads:
            t.join(30)
    finally:
        sys.setswitchinterval(old)
    return errors


def test_threads_sharing_one_model_get_their_own_correct_answers():
    m = model()
    inputs = [torch.randn(1 + i, 37) for i in range(4)]
    with torch.no_grad():
        expected = [m(x) for x in inputs]
    done = [0] * len(inputs)

    def work(i, stop):
        with torch.no_grad():
            while not stop.is_set():
                y = m(inputs[i])
                assert torch.equal(y, expected[i]), f"thread {i}: result changed under concurrency"
                done[i] += 1

    errors = run_threads(work, len(inputs), 1.5)
    assert not errors, errors[0]
    assert min(done) > 0, f"a thread never finished a forward: {done}"


def test_fresh_model_first_forward_from_many_threads_at_once():
    """The lazy steps (kernel choice, self-check, prepare) racing on a layer's first call."""
    m = model()
    x = torch.randn(5, 37)
    barrier = threading.Barrier(4)
    results = [None] * 4

    def work(i, stop):
        barrier.wait()
        with torch.no_grad():
            results[i] = m(x)

    errors = run_threads(work, 4, 0.5)
    assert not errors, errors[0]
    for r in results[1:]:
        assert torch.equal(r, results[0])


class _ShadowKernel(TorchReferenceKernel):
    """The reference math under another name and a higher priority: a backend that comes and goes."""

    backend = "shadow"
    priority = 500


def test_registry_mutation_while_dispatching_keeps_every_result_correct():
    m = model()
    inputs = [torch.randn(3, 37) for _ in range(3)]
    with KernelRegistry.force_backend("torch_ref"), torch.no_grad():
        expected = [m(x) for x in inputs]
    served = {"shadow": 0}

    def dispatch(i, stop):
        with torch.no_grad():
            while not stop.is_set():
                assert torch.equal(m(inputs[i]), expected[i]), f"thread {i}: wrong result during registry changes"

    def mutate(stop):
        n = 0
        while not stop.is_set():
            KernelRegistry.register_backend(BackendSpec(name="shadow", kernels=[_ShadowKernel()]))
            if m[0].kernel().backend == "shadow":
                served["shadow"] += 1
            KernelRegistry.unregister("shadow")
            n += 1
        return n

    def target(i, stop):
        if i == 0:
            mutate(stop)
        else:
            dispatch(i - 1, stop)

    try:
        errors = run_threads(target, 4, 1.5)
    finally:
        if "shadow" in KernelRegistry.backend_names():
            KernelRegistry.unregister("shadow")
    assert not errors, repr(errors[0])
    assert served["shadow"] > 0, "the mutating thread never saw its backend chosen"
    assert "shadow" not in KernelRegistry.backend_names()


def test_explain_and_forcing_survive_concurrent_registration():
    """Readers of a private registry (explain with a forced backend, kernels(), backend_names())."""
    reg = Registry(builtin=("backends.torch_ref.plugin",), use_entry_points=False)
    cfg = BitQuantConfig(weight_bits=1.58, activation_dtype="float32")

    def target(i, stop):
        n = 0
        while not stop.is_set():
            if i == 0:
                name = f"b{n % 7}"
                kernels = []
                for j in range(20):  # many kernels per backend: a long dict to iterate over
                    k = type(f"K{j}", (_ShadowKernel,), {})()
                    k.backend = name
                    kernels.append(k)
                reg.register_backend(BackendSpec(name=name, kernels=kernels))
                reg.unregister(name)
            else:
                exp = reg.explain(cfg, "cpu", backend="torch_ref")
                assert exp.chosen is not None and exp.chosen.backend == "torch_ref", str(exp)
                reg.kernels()
                reg.backend_names()
            n += 1

    errors = run_threads(target, 3, 1.5)
    assert not errors, repr(errors[0])

"""Root test configuration: hypothesis profiles, ``--bitlab-backend``, shared fixtures, case counts.

Hypothesis profiles (pick one with ``BITLAB_HYPOTHESIS_PROFILE``; default ``ci``):

======== ============ ========================= =====================================
profile  examples     largest weight (elements)  use
======== ============ ========================= =====================================
ci       5 per test   2**18                      every CI run (2 cores, minutes)
dev      25 per test  2**21                      before sending a kernel change
thorough 200 per test 2**23                      nightly, or a new backend's first run
======== ============ ========================= =====================================

``pytest tests/conformance --bitlab-backend NAME`` restricts the conformance
suite to backend NAME (a third-party plugin is tested with that one command).
"""
from __future__ import annotations

import collections
import os

import pytest
import torch

PROFILE_ENV = "BITLAB_HYPOTHESIS_PROFILE"
PROFILES = {
    # name: (max_examples, largest weight matrix in elements)
    "ci": (5, 2**18),
    "dev": (25, 2**21),
    "thorough": (200, 2**23),
}
PROFILE = os.environ.get(PROFILE_ENV, "ci")
if PROFILE not in PROFILES:
    raise pytest.UsageError(f"{PROFILE_ENV}={PROFILE!r}: unknown profile; choose one of {sorted(PROFILES)}")

try:  # hypothesis is a test dependency; where it is missing only the conformance suite skips
    from hypothesis import HealthCheck, settings
except ImportError:
    settings = None
if settings is not None:
    for _name, (_examples, _) in PROFILES.items():
        settings.register_profile(
            _name,
            max_examples=_examples,
            deadline=None,
            database=None if _name == "ci" else settings.default.database,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
            print_blob=True,
        )
    settings.load_profile(PROFILE)

COUNTS = pytest.StashKey[collections.Counter]()


def pytest_addoption(parser):
    parser.addoption(
        "--bitlab-backend",
        action="append",
        default=[],
        metavar="NAME",
        help="run the conformance suite only for backend NAME (repeatable); other tests are unaffected",
    )


def pytest_configure(config):
    config.stash[COUNTS] = collections.Counter()


@pytest.fixture(scope="session")
def case_counter(request) -> collections.Counter:
    """Session-wide counter of conformance cases run, keyed by (backend, device, outcome)."""
    return request.config.stash[COUNTS]


@pytest.fixture(scope="session")
def max_weight_elements() -> int:
    """Largest weight matrix (in elements) a generated problem may have under the active profile."""
    return PROFILES[PROFILE][1]


@pytest.fixture
def reference_registry():
    """A private registry holding only the reference backend (tests may mutate it freely)."""
    from bitcore.kernels import Registry

    return Registry(builtin=("backends.torch_ref.plugin",), use_entry_points=False)


@pytest.fixture
def cuda_device() -> torch.device:
    """The CUDA device, or a clean skip where there is none."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device; torch.cuda.is_available() is False")
    return torch.device("cuda")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    counts = config.stash.get(COUNTS, None)
    if not counts:
        return
    per_backend = collections.defaultdict(collections.Counter)
    for (backend, device, outcome), n in counts.items():
        per_backend[f"{backend} on {device}"][outcome] += n
    terminalreporter.section(f"conformance cases run (hypothesis profile {PROFILE!r})")
    for name in sorted(per_backend):
        c = per_backend[name]
        detail = ", ".join(f"{k} {v}" for k, v in sorted(c.items()))
        terminalreporter.write_line(f"{name:<28} {sum(c.values()):>6} ({detail})")

"""The whole BitLab plugin contract: pluggy hook specifications.

A backend plugin is a module (or object) with a function marked ``@hookimpl``
named ``bitlab_register_backend`` that returns a :class:`BackendSpec`.  Built-in
backends (``backends.torch_ref``, ``backends.cpp_cpu``, ...) are loaded exactly
the way third-party plugins are; third parties are found through the
``bitlab.backends`` entry-point group::

    # pyproject.toml of a third-party package
    [project.entry-points."bitlab.backends"]
    my_backend = "my_backend.plugin"

    # my_backend/plugin.py
    from bitcore.hookspecs import BackendSpec, hookimpl

    @hookimpl
    def bitlab_register_backend():
        return BackendSpec(name="my_backend", kernels=[MyKernel()])

A plugin that fails to import, raises in its hook, or returns something that is
not a ``BackendSpec`` is isolated: ``import bitcore`` still works, and the
failure is listed by ``bitlab info`` and ``KernelRegistry.plugin_failures()``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional

import pluggy

from bitcore.kernels.interface import Availability, BitKernel

PROJECT_NAME = "bitlab"
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@dataclass
class BackendSpec:
    """What a plugin contributes: a named backend, its kernels, and whether it can run here."""

    name: str
    kernels: List[BitKernel] = field(default_factory=list)
    description: str = ""
    version: str = ""
    availability: Optional[Callable[[], Availability]] = None

    def check_availability(self) -> Availability:
        if self.availability is None:
            return Availability.yes()
        return self.availability()


@hookspec
def bitlab_register_backend() -> BackendSpec:
    """Return this plugin's :class:`BackendSpec` (its kernels and an availability probe).

    Called once per plugin when the registry first loads plugins.  Keep it cheap:
    do not compile or touch a GPU here; report that from ``availability``.
    """

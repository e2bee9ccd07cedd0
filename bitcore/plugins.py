"""The plugin manager: loads built-in backends and entry-point plugins, isolating broken ones.

Built-in backends are plugins too (:data:`BUILTIN_PLUGINS`), loaded through the
same hook third parties implement; third parties register under the
:data:`ENTRY_POINT_GROUP` entry-point group.  Nothing here raises: every
failure becomes a :class:`PluginFailure` that ``bitlab info`` prints.
"""
from __future__ import annotations

import importlib
import logging
import os
import traceback
from dataclasses import dataclass
from importlib import metadata
from typing import List, Sequence, Tuple

import pluggy

from bitcore import hookspecs
from bitcore.hookspecs import BackendSpec

log = logging.getLogger("bitlab.plugins")

ENTRY_POINT_GROUP = "bitlab.backends"
BUILTIN_PLUGINS: Tuple[str, ...] = (
    "backends.torch_ref.plugin",
    "backends.cpp_cpu.plugin",
    "backends.cuda_ext.plugin",
    "backends.numba_cuda.plugin",
)
# Comma-separated plugin names (built-in module or entry-point name) to skip entirely.
DISABLE_ENV = "BITLAB_DISABLE_PLUGINS"


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be loaded; ``stage`` is import, register or validate."""

    plugin: str
    stage: str
    error: str

    def __str__(self) -> str:
        return f"{self.plugin}: failed at {self.stage}: {self.error}"


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def make_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    return pm


def load_backends(
    builtin: Sequence[str] = BUILTIN_PLUGINS,
    use_entry_points: bool = True,
    extra_plugins: Sequence[object] = (),
) -> Tuple[List[BackendSpec], List[PluginFailure]]:
    """Load every plugin and call its hook; return (backend specs, failures)."""
    pm = make_plugin_manager()
    failures: List[PluginFailure] = []
    disabled = {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}

    for module_name in builtin:
        backend_name = module_name.split(".")[1] if module_name.startswith("backends.") else module_name
        if module_name in disabled or backend_name in disabled:
            continue
        try:
            module = importlib.import_module(module_name)
            pm.register(module, name=module_name)
        except Exception as exc:  # a broken plugin must not break import bitcore
            failures.append(PluginFailure(module_name, "import", _describe(exc)))
            log.debug("plugin %s failed to import:\n%s", module_name, traceback.format_exc())

    if use_entry_points:
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in disabled:
                continue
            try:
                pm.register(ep.load(), name=f"entrypoint:{ep.name}")
            except Exception as exc:
                failures.append(PluginFailure(f"entrypoint:{ep.name} ({ep.value})", "import", _describe(exc)))

    for plugin in extra_plugins:
        try:
            pm.register(plugin)
        except Exception as exc:
            failures.append(PluginFailure(repr(plugin), "import", _describe(exc)))

    specs: List[BackendSpec] = []
    # Call each implementation on its own so one raising plugin cannot hide the others.
    for impl in pm.hook.bitlab_register_backend.get_hookimpls():
        name = impl.plugin_name
        try:
            spec = impl.function()
        except Exception as exc:
            failures.append(PluginFailure(name, "register", _describe(exc)))
            continue
        if not isinstance(spec, BackendSpec):
            failures.append(
                PluginFailure(name, "validate", f"hook returned {type(spec).__name__}, expected BackendSpec")
            )
            continue
        specs.append(spec)
    specs.sort(key=lambda s: s.name)
    return specs, failures

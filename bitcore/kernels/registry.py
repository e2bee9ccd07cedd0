"""The kernel registry: one place that decides which kernel runs, and can say why.

Selection for a (config, device, shape): every registered kernel is a
candidate; it is rejected when it does not serve the key, the device, the
shape, when it or its backend is unavailable here, when it fails its
self-check, or when another backend is forced.  Among the rest the highest
priority wins; equal priorities break by kernel name (deterministic, and
``explain`` says so).

A backend can be forced three ways (first match wins): the ``backend=``
argument, the :meth:`Registry.force_backend` context manager, the
``BITLAB_BACKEND`` environment variable.  A forced backend that cannot serve
the request is an error, never a silent fallback.

Example::

    kernel = KernelRegistry.get_kernel_for_config(cfg, device="cpu")
    print(KernelRegistry.explain(cfg, device="cpu"))
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from bitcore.config import BitQuantConfig
from bitcore.errors import BackendUnavailableError, NoKernelError
from bitcore.kernels.interface import ALL_KEYS, Availability, BitKernel, KernelKey, device_type

if TYPE_CHECKING:  # hookspecs imports the kernel interface; import it lazily to avoid a cycle
    from bitcore.hookspecs import BackendSpec

log = logging.getLogger("bitlab.dispatch")
_UNCHECKED = object()

FORCE_ENV = "BITLAB_BACKEND"
_forced_backend: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("bitlab_forced_backend", default=None)


@dataclass(frozen=True)
class Candidate:
    kernel: str
    backend: str
    priority: int
    status: str  # "chosen", "eligible" (lost on priority/name), "rejected"
    reason: str


@dataclass
class Explanation:
    """Every candidate for a request and why it was or was not chosen."""

    key: KernelKey
    device: str
    forced: Optional[str]
    forced_by: str
    candidates: List[Candidate] = field(default_factory=list)
    chosen: Optional[BitKernel] = None

    def __str__(self) -> str:
        head = f"dispatch for {self.key} on {self.device}"
        if self.forced:
            head += f" (backend forced to {self.forced!r} by {self.forced_by})"
        lines = [head]
        width = max([len(c.kernel) for c in self.candidates] + [6])
        for c in self.candidates:
            lines.append(f"  {c.status:<8} {c.kernel:<{width}} prio={c.priority:<4} {c.reason}")
        lines.append(f"  -> {self.chosen.name if self.chosen else 'no kernel'}")
        return "\n".join(lines)


@dataclass
class BackendStatus:
    name: str
    availability: Availability
    kernels: List[BitKernel]
    description: str = ""
    version: str = ""


class Registry:
    """Holds kernels registered by backend plugins and selects among them."""

    def __init__(
        self,
        builtin: Optional[Sequence[str]] = None,
        use_entry_points: bool = True,
        autoload: bool = True,
    ) -> None:
        self._builtin = builtin
        self._use_entry_points = use_entry_points
        self._autoload = autoload
        self._lock = threading.RLock()
        self._loaded = False
        self._kernels: Dict[str, BitKernel] = {}
        self._backends: Dict[str, BackendSpec] = {}
        self._failures: list = []
        self._backend_availability: Dict[str, Availability] = {}
        self._kernel_availability: Dict[str, Availability] = {}
        self._self_check: Dict[str, Optional[str]] = {}
        self._cache: Dict[tuple, BitKernel] = {}
        self._generation = 0

    # ------------------------------------------------------------ loading
    def _ensure_loaded(self) -> None:
        if self._loaded or not self._autoload:
            return
        with self._lock:
            if self._loaded:
                return
            from bitcore.plugins import BUILTIN_PLUGINS, load_backends

            specs, failures = load_backends(
                builtin=BUILTIN_PLUGINS if self._builtin is None else self._builtin,
                use_entry_points=self._use_entry_points,
            )
            self._failures.extend(failures)
            for spec in specs:
                self._add_backend(spec)
            self._loaded = True

    def reload(self) -> None:
        """Forget everything and load the plugins again."""
        with self._lock:
            self._kernels.clear()
            self._backends.clear()
            self._failures.clear()
            self._loaded = False
            self._invalidate()
        self._ensure_loaded()

    def _invalidate(self) -> None:
        self._backend_availability.clear()
        self._kernel_availability.clear()
        self._self_check.clear()
        self._cache.clear()
        self._generation += 1

    def _add_backend(self, spec: BackendSpec) -> None:
        from bitcore.plugins import PluginFailure

        if spec.name in self._backends:
            self._failures.append(
                PluginFailure(spec.name, "validate", f"backend name {spec.name!r} is already registered")
            )
            return
        self._backends[spec.name] = spec
        for kernel in spec.kernels:
            if not isinstance(kernel, BitKernel):
                self._failures.append(
                    PluginFailure(spec.name, "validate", f"kernel {kernel!r} is not a BitKernel instance")
                )
                continue
            kernel.backend = spec.name if kernel.backend in ("", "unnamed") else kernel.backend
            self._add_kernel(kernel)

    def _add_kernel(self, kernel: BitKernel, replace: bool = False) -> None:
        if kernel.name in self._kernels and not replace:
            raise ValueError(f"kernel {kernel.name!r} is already registered (pass replace=True to override)")
        self._kernels[kernel.name] = kernel
        self._invalidate()

    # ------------------------------------------------------- registration
    def register_backend(self, spec: BackendSpec) -> None:
        """Add a whole backend at run time (as a plugin's hook would)."""
        self._ensure_loaded()
        with self._lock:
            self._add_backend(spec)
            self._invalidate()

    def register(self, kernel: Union[BitKernel, type, None] = None, *, replace: bool = False):
        """Register a kernel instance, or use as a class decorator: ``@KernelRegistry.register()``."""

        def _do(obj):
            instance = obj() if isinstance(obj, type) else obj
            if not isinstance(instance, BitKernel):
                raise TypeError(f"register expects a BitKernel subclass or instance, got {obj!r}")
            self._ensure_loaded()
            with self._lock:
                self._add_kernel(instance, replace=replace)
            return obj

        if kernel is None:
            return _do
        return _do(kernel)

    def unregister(self, name: str) -> None:
        with self._lock:
            if name in self._backends:
                spec = self._backends.pop(name)
                for k in spec.kernels:
                    self._kernels.pop(k.name, None)
            elif name in self._kernels:
                del self._kernels[name]
            else:
                raise KeyError(f"no kernel or backend named {name!r}; known: {sorted(self._kernels)}")
            self._invalidate()

    # ---------------------------------------------------------- inspection
    def kernels(self) -> List[BitKernel]:
        self._ensure_loaded()
        with self._lock:  # a snapshot: registration may run in another thread
            snapshot = list(self._kernels.values())
        return sorted(snapshot, key=lambda k: k.name)

    def backend_names(self) -> List[str]:
        self._ensure_loaded()
        with self._lock:
            return sorted({k.backend for k in self._kernels.values()} | set(self._backends))

    def backends(self) -> List[BackendStatus]:
        self._ensure_loaded()
        out = []
        for name in self.backend_names():
            spec = self._backends.get(name)
            kernels = [k for k in self.kernels() if k.backend == name]
            out.append(
                BackendStatus(
                    name=name,
                    availability=self._backend_available(name),
                    kernels=kernels,
                    description=spec.description if spec else "",
                    version=spec.version if spec else "",
                )
            )
        return out

    def plugin_failures(self) -> list:
        self._ensure_loaded()
        return list(self._failures)

    def served_keys(self, device: Union[str, torch.device, None] = None) -> List[KernelKey]:
        dev = device_type(device) if device is not None else None
        keys = set()
        for k in self.kernels():
            if dev is None or dev in k.devices:
                keys |= set(k.keys)
        return sorted(keys)

    # -------------------------------------------------------------- forcing
    @contextlib.contextmanager
    def force_backend(self, name: Optional[str]) -> Iterator[None]:
        """Within the block (this thread / task), dispatch only to backend ``name``."""
        if name is not None:
            self._check_backend_name(name)
        token = _forced_backend.set(name)
        try:
            yield
        finally:
            _forced_backend.reset(token)

    def forced_backend(self, backend: Optional[str] = None) -> Tuple[Optional[str], str]:
        if backend:
            return backend, "argument"
        ctx = _forced_backend.get()
        if ctx:
            return ctx, "force_backend()"
        env = os.environ.get(FORCE_ENV, "").strip()
        if env:
            return env, f"${FORCE_ENV}"
        return None, ""

    def _check_backend_name(self, name: str) -> None:
        names = self.backend_names()
        if name not in names:
            raise BackendUnavailableError(f"unknown backend {name!r}; registered backends: {names}")

    # ---------------------------------------------------------- availability
    def _backend_available(self, name: str) -> Availability:
        cached = self._backend_availability.get(name)
        if cached is not None:
            return cached
        spec = self._backends.get(name)
        try:
            result = spec.check_availability() if spec else Availability.yes()
        except Exception as exc:
            result = Availability.no(f"availability probe raised {type(exc).__name__}: {exc}")
        self._backend_availability[name] = result
        return result

    def kernel_availability(self, kernel: BitKernel) -> Availability:
        """Whether ``kernel`` (and its backend) can run here, with the reason when not."""
        self._ensure_loaded()
        return self._kernel_available(kernel)

    def kernel_status(self, kernel: BitKernel) -> Availability:
        """Availability plus the self-check (run now if it has not run): what ``bitlab info`` shows."""
        available = self.kernel_availability(kernel)
        if not available:
            return available
        failure = self._self_check_failure(kernel)
        return Availability.no(f"self-check failed: {failure}") if failure else available

    def _kernel_available(self, kernel: BitKernel) -> Availability:
        cached = self._kernel_availability.get(kernel.name)
        if cached is not None:
            return cached
        backend = self._backend_available(kernel.backend)
        if not backend:
            result = Availability.no(f"backend unavailable: {backend.reason}")
        else:
            try:
                result = kernel.availability()
            except Exception as exc:
                result = Availability.no(f"availability probe raised {type(exc).__name__}: {exc}")
        self._kernel_availability[kernel.name] = result
        return result

    def _self_check_failure(self, kernel: BitKernel) -> Optional[str]:
        # Work on a local: another thread may clear the cache (a registration) between the store and a re-read.
        cached = self._self_check.get(kernel.name, _UNCHECKED)
        if cached is not _UNCHECKED:
            return cached
        try:
            failure = kernel.self_check()
        except Exception as exc:
            failure = f"self-check raised {type(exc).__name__}: {exc}"
        self._self_check[kernel.name] = failure
        if failure:
            log.warning("kernel %s failed its self-check and is disabled: %s", kernel.name, failure)
        return failure

    # ------------------------------------------------------------- selection
    def explain(
        self,
        config: BitQuantConfig,
        device: Union[str, torch.device, None] = "cpu",
        *,
        backend: Optional[str] = None,
        in_features: Optional[int] = None,
        out_features: Optional[int] = None,
    ) -> Explanation:
        """List every candidate for the request and why it was or was not chosen."""
        self._ensure_loaded()
        key = KernelKey.from_config(config)
        dev = device_type(device)
        forced, forced_by = self.forced_backend(backend)
        if forced:
            self._check_backend_name(forced)
        rejected: List[Candidate] = []
        eligible: List[BitKernel] = []
        for kernel in self.kernels():
            reason = self._rejection(kernel, key, dev, forced, in_features, out_features)
            if reason:
                rejected.append(Candidate(kernel.name, kernel.backend, kernel.priority, "rejected", reason))
            else:
                eligible.append(kernel)
        eligible.sort(key=lambda k: (-k.priority, k.name))
        chosen: Optional[BitKernel] = None
        ranked: List[Candidate] = []
        for kernel in eligible:
            if chosen is None:
                failure = self._self_check_failure(kernel)
                if failure:
                    ranked.append(
                        Candidate(kernel.name, kernel.backend, kernel.priority, "rejected", f"self-check failed: {failure}")
                    )
                    continue
                chosen = kernel
                ties = [k.name for k in eligible if k is not kernel and k.priority == kernel.priority]
                reason = "highest priority"
                if ties:
                    reason += f"; tie with {ties} broken by name order"
                ranked.append(Candidate(kernel.name, kernel.backend, kernel.priority, "chosen", reason))
            else:
                why = (
                    f"lower priority than {chosen.name} ({chosen.priority})"
                    if kernel.priority < chosen.priority
                    else f"same priority as {chosen.name}; loses on name order"
                )
                ranked.append(Candidate(kernel.name, kernel.backend, kernel.priority, "eligible", why))
        return Explanation(key, dev, forced, forced_by, ranked + rejected, chosen)

    def _rejection(
        self,
        kernel: BitKernel,
        key: KernelKey,
        dev: str,
        forced: Optional[str],
        in_features: Optional[int],
        out_features: Optional[int],
    ) -> str:
        if forced and kernel.backend != forced:
            return f"backend {forced!r} is forced"
        if not kernel.serves(key):
            return f"does not serve {key}"
        if dev not in kernel.devices:
            return f"runs on {sorted(kernel.devices)}, not {dev}"
        available = self._kernel_available(kernel)
        if not available:
            return f"unavailable: {available.reason}"
        if in_features is not None and out_features is not None:
            limit = kernel.check_shape(in_features, out_features)
            if limit:
                return f"shape {out_features}x{in_features}: {limit}"
        return ""

    def get_kernel_for_config(
        self,
        config: BitQuantConfig,
        device: Union[str, torch.device, None] = "cpu",
        *,
        backend: Optional[str] = None,
        in_features: Optional[int] = None,
        out_features: Optional[int] = None,
    ) -> BitKernel:
        """The best available kernel for ``config`` on ``device`` (raises NoKernelError with reasons)."""
        self._ensure_loaded()
        forced, _ = self.forced_backend(backend)
        cache_key = (config, device_type(device), forced, in_features, out_features, self._generation)
        hit = self._cache.get(cache_key)
        if hit is not None:
            return hit
        explanation = self.explain(
            config, device, backend=backend, in_features=in_features, out_features=out_features
        )
        if explanation.chosen is None:
            raise NoKernelError(f"no kernel can serve this request\n{explanation}")
        chosen = explanation.chosen
        passed_over = [
            c
            for c in explanation.candidates
            if c.status == "rejected"
            and c.priority > chosen.priority
            and c.reason.startswith(("unavailable", "self-check", "shape"))
        ]
        for c in passed_over:
            log.info("dispatch %s on %s: fell back past %s (%s)", explanation.key, explanation.device, c.kernel, c.reason)
        log.debug("dispatch %s on %s -> %s", explanation.key, explanation.device, chosen.name)
        self._cache[cache_key] = explanation.chosen
        return explanation.chosen

    def table(self, devices: Sequence[str] = ("cpu", "cuda"), keys: Optional[Sequence[KernelKey]] = None) -> List[Tuple[KernelKey, str, str]]:
        """(key, device, chosen kernel name or the reason none) for every key served anywhere."""
        rows = []
        for key in keys or self.served_keys():
            cfg = _config_for_key(key)
            for dev in devices:
                exp = self.explain(cfg, dev)
                rows.append((key, dev, exp.chosen.name if exp.chosen else "-"))
        return rows


def _config_for_key(key: KernelKey) -> BitQuantConfig:
    bits = 1.58 if key.weight_bits == 1.58 else int(key.weight_bits)
    act_gran = "per_tensor" if key.activation_granularity == "none" else key.activation_granularity
    return BitQuantConfig(
        weight_bits=bits,
        weight_granularity=key.weight_granularity,
        activation_dtype=key.activation_dtype,
        activation_granularity=act_gran,
    )


def config_for_key(key: KernelKey) -> BitQuantConfig:
    """A BitQuantConfig whose key is ``key`` (group_size at its default)."""
    return _config_for_key(key)


__all__ = ["Registry", "Explanation", "Candidate", "BackendStatus", "config_for_key", "ALL_KEYS", "FORCE_ENV"]

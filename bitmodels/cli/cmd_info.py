"""``bitlab info``: versions, devices, every backend (available or why not), plugin failures, the registry table."""
from __future__ import annotations

import platform
import sys


def register(sub) -> None:
    p = sub.add_parser("info", help="versions, devices, backends and the kernel registry table")
    p.add_argument("--no-table", action="store_true", help="skip the per-key registry table")
    p.set_defaults(run=run)


def _version(module: str) -> str:
    try:
        mod = __import__(module)
        return getattr(mod, "__version__", "installed")
    except Exception as exc:
        return f"not available ({type(exc).__name__}: {exc})"


def cpu_features() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return platform.processor() or "unknown"
    wanted = ["avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "popcnt"]
    return " ".join(f for f in wanted if f in flags) or "none of avx2/avx512"


def run(args) -> int:
    import torch

    import bitcore
    from bitcore.kernels import KernelRegistry

    print("== versions")
    print(f"bitlab       {bitcore.__version__}")
    print(f"python       {sys.version.split()[0]}")
    print(f"torch        {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    for name in ("pluggy", "numba", "transformers", "yaml"):
        print(f"{name:<12} {_version(name)}")
    print("\n== devices")
    print(f"cpu          {platform.machine()}, {torch.get_num_threads()} threads, features: {cpu_features()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"cuda:{i}       {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB")
    else:
        print("cuda         not available")
    print("\n== backends")
    for b in KernelRegistry.backends():
        state = "available" if b.availability else f"UNAVAILABLE: {b.availability.reason}"
        print(f"{b.name:<12} {state}")
        for k in b.kernels:
            ka = KernelRegistry.kernel_status(k)  # availability, then the self-check
            kstate = "" if ka else f"  (disabled: {ka.reason})"
            print(f"    {k.name:<40} prio={k.priority:<4} devices={','.join(sorted(k.devices))} keys={len(k.keys)}{kstate}")
    failures = KernelRegistry.plugin_failures()
    print("\n== plugin failures")
    if not failures:
        print("none")
    for f in failures:
        print(f"  {f}")
    if not args.no_table:
        print("\n== registry: chosen kernel per key and device")
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        rows = KernelRegistry.table(devices=devices)
        for key, dev, chosen in rows:
            print(f"  {str(key):<42} {dev:<5} {chosen}")
    return 0

#!/usr/bin/env python3
"""Build every BitLab extension this machine can build, ahead of time, and say what was skipped and why.

Each backend with compiled code has a ``backends/<name>/build.py`` defining
``EXTENSIONS`` (a list of :class:`bitcore.extensions.ExtensionSpec`).  Builds
land in the same cache the backends load from at run time
(``$BITLAB_EXTENSIONS_DIR``, default ``~/.cache/bitlab/extensions``), so a
backend that finds its build there does not compile on first use.

    python build_extensions.py            # build all that can be built
    python build_extensions.py -v         # with compiler output
    python build_extensions.py cpp_cpu    # only these backends
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bitcore.extensions import build_directory, load_extension, missing_requirements  # noqa: E402


def backend_build_modules():
    import backends

    for info in sorted(pkgutil.iter_modules(backends.__path__), key=lambda i: i.name):
        if not info.ispkg:
            continue
        try:
            yield info.name, importlib.import_module(f"backends.{info.name}.build")
        except ModuleNotFoundError as exc:
            if exc.name == f"backends.{info.name}.build":
                continue  # pure-Python backend: nothing to build
            raise


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backends", nargs="*", help="only build these backends")
    parser.add_argument("-v", "--verbose", action="store_true", help="show compiler output")
    args = parser.parse_args(argv)
    built, skipped, failed = [], [], []
    for name, module in backend_build_modules():
        if args.backends and name not in args.backends:
            continue
        for spec in module.EXTENSIONS:
            reason = missing_requirements(spec)
            if reason:
                skipped.append((spec.name, reason))
                print(f"skip   {spec.name}: {reason}")
                continue
            start = time.perf_counter()
            try:
                load_extension(spec, verbose=args.verbose, announce=False)
            except Exception as exc:
                failed.append((spec.name, str(exc)))
                print(f"FAILED {spec.name}: {exc}")
                continue
            built.append(spec.name)
            print(f"built  {spec.name} in {time.perf_counter() - start:.1f}s -> {build_directory(spec)}")
    print(f"\n{len(built)} built, {len(skipped)} skipped, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

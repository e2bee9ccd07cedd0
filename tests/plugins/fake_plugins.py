"""Third-party plugin packages written to a temporary folder as real installed distributions.

Each plugin is a module of a package ``bitlab_fake_plugins`` plus a
``.dist-info`` folder whose ``entry_points.txt`` names it in the
``bitlab.backends`` group, so ``importlib.metadata`` finds it exactly as it
finds a pip-installed plugin once the folder is on ``sys.path`` (a child
process gets it through ``PYTHONPATH``).
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Dict

PACKAGE = "bitlab_fake_plugins"

_KERNEL_BASE = '''
from backends.torch_ref.kernels import TorchReferenceKernel
from bitcore.hookspecs import BackendSpec, hookimpl
from bitcore.kernels import BitKernel, keys_product

TERNARY_FP32 = keys_product(weight_bits=[1.58], activation_dtypes=["float32"], weight_granularities=["per_tensor"])
'''

_TIE = '''
    class TieKernel(TorchReferenceKernel):
        backend = "{name}"
        keys = TERNARY_FP32
        priority = 700

    @hookimpl
    def bitlab_register_backend():
        return BackendSpec(name="{name}", kernels=[TieKernel()])
'''

SOURCES: Dict[str, str] = {
    "raises_at_import": '''
        raise RuntimeError("libfastbits.so: cannot open shared object file (raised at import)")
    ''',
    "raises_at_registration": '''
        @hookimpl
        def bitlab_register_backend():
            raise RuntimeError("device table is empty (raised at registration)")
    ''',
    "fails_self_check": '''
        class SignFlipKernel(TorchReferenceKernel):
            """Claims the highest priority and computes -y: the default self-check must catch it."""
            backend = "fails_self_check"
            keys = TERNARY_FP32
            priority = 1000
            self_check = BitKernel.self_check  # the default check, not the reference's opt-out

            def forward(self, x, prepared, bias=None, activation="none"):
                return -super().forward(x, prepared, bias, activation)

        @hookimpl
        def bitlab_register_backend():
            return BackendSpec(name="fails_self_check", kernels=[SignFlipKernel()])
    ''',
    # two plugins claiming the same key at the same priority
    **{name: _TIE.format(name=name) for name in ("tie_beta", "tie_alpha")},
}


def install(root: Path, names=tuple(SOURCES)) -> Path:
    """Write the package and its dist-info under ``root``; return the folder to put on sys.path."""
    pkg = root / PACKAGE
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    for name in names:
        (pkg / f"{name}.py").write_text(_KERNEL_BASE + textwrap.dedent(SOURCES[name]))
    info = root / f"{PACKAGE}-0.0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {PACKAGE}\nVersion: 0.0.1\n")
    lines = "\n".join(f"{name} = {PACKAGE}.{name}" for name in names)
    (info / "entry_points.txt").write_text(f"[bitlab.backends]\n{lines}\n")
    return root

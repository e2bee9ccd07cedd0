"""Every Python snippet of the BitLab README users know (seed 004) runs as written.

The snippets continue one interactive session (example 2 uses ``torch`` imported
by example 1, the backend check uses ``BitLinear`` imported earlier), so they run
in order in one namespace, as a user pasting them would.
"""
import contextlib
import io
from pathlib import Path

import pytest

SNIPPETS = sorted((Path(__file__).resolve().parents[1] / "examples" / "seed004").glob("*.py"))


@pytest.fixture(scope="module")
def session():
    return {"__name__": "__seed004__"}


@pytest.mark.parametrize("path", SNIPPETS, ids=lambda p: p.stem)
def test_snippet_runs_as_written(path, session):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(path.read_text(), str(path), "exec"), session)
    text = out.getvalue()
    if path.stem == "01_first_quantized_layer":
        assert "Training output shape: torch.Size([32, 256])" in text
        assert "Quantized output shape: torch.Size([32, 256])" in text
    if path.stem == "03_prebuilt_models":
        assert "Auto model output: torch.Size([1, 10])" in text
    if path.stem in ("00_verify_installation", "07_check_cpp_backend"):
        assert "Has C++ backend: " in text
    if path.stem == "06_kernel_dispatch":
        assert "Selected kernel: " in text


def test_snippets_exist():
    assert len(SNIPPETS) == 10

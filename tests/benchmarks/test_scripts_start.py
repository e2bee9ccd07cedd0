"""Every benchmark script imports and answers --help without a GPU: the GPU runs happen on the lent machine,
so an import or argument error would otherwise first show there, costing a device call."""
import importlib
import os
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py") if 'if __name__ == "__main__"' in p.read_text())


@pytest.fixture(scope="module", autouse=True)
def importable():
    """The scripts import their siblings; some set environment defaults on import (restored after)."""
    environ = dict(os.environ)
    sys.path.insert(0, str(BENCHMARKS))
    yield
    sys.path.remove(str(BENCHMARKS))
    os.environ.clear()
    os.environ.update(environ)


def test_the_scripts_are_found():
    assert "bench_bitnet_generate" in SCRIPTS and "bench_norm_linear" in SCRIPTS


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_imports_and_answers_help(name, capsys):
    main = importlib.import_module(name).main
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(["--help"])
    except TypeError:  # main() without an argv parameter reads sys.argv
        argv = sys.argv
        sys.argv = [name, "--help"]
        try:
            with pytest.raises(SystemExit) as exit_info:
                main()
        finally:
            sys.argv = argv
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out

"""Benchmark outputs: NAME.json (meta + rows), NAME.md (the table) and NAME.png (the plot) in one folder."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch

GRAPH_TIMING = "CUDA-graph replay, rotating weight copies >= 3x L2, median per call"


def cuda_available(hint: str = "") -> bool:
    """True when torch sees a CUDA device; else says so on stderr (with ``hint``) for the script to exit 2."""
    if torch.cuda.is_available():
        return True
    import sys

    print("needs a CUDA device (torch.cuda.is_available() is False)" + (f"; {hint}" if hint else ""), file=sys.stderr)
    return False


def run_meta(args: str) -> dict:
    """Device, torch version, timing method, date and the command line of a GPU benchmark run."""
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "args": args,
            "timing": GRAPH_TIMING, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def write_outputs(out: Path, name: str, meta: dict, rows: list, markdown: Callable[[dict, list], str],
                  plot: Callable[[list, Path], None]) -> str:
    """Write the three files; a failing plot is reported and the table kept.  Returns the table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = markdown(meta, rows)
    (out / f"{name}.md").write_text(md)
    try:
        plot(rows, out / f"{name}.png")
    except Exception as exc:  # report, keep the table
        print(f"plot failed: {exc}")
    return md

"""Shared by the timeline benchmarks (bench_attention_timeline.py, bench_mlp_timeline.py): build a probe from
``benchmarks/csrc`` with nvcc for the current GPU, run it, parse the stage clocks it prints for every block of
the recorded launch (``backends/cuda_ext/csrc/bitlab_timeline.cuh``), and summarize them over blocks.
"""
from __future__ import annotations

import shutil
import statistics
import subprocess
from pathlib import Path

CSRC = Path(__file__).resolve().parent / "csrc"


def build_probe(name: str, tmp: Path) -> Path:
    """Compile ``benchmarks/csrc/<name>.cu`` for the current GPU (sm_90a on Hopper) into ``tmp``."""
    import torch

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise RuntimeError("nvcc not on PATH")
    major, minor = torch.cuda.get_device_capability()
    if major < 9:
        raise RuntimeError(f"GPU compute capability {major}.{minor}: the probed kernels need 9.0")
    arch = f"{major}{minor}" + ("a" if major == 9 else "")
    exe = tmp / name
    subprocess.run([nvcc, "-O3", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}",
                    str(CSRC / f"{name}.cu"), "-o", str(exe)], check=True)
    return exe


def run_probe(exe: Path, *args) -> dict:
    return parse(subprocess.run([str(exe), *map(str, args)], check=True, capture_output=True, text=True).stdout)


def parse(text: str) -> dict:
    """A probe's output as {span_us, clock_khz, plan (if printed): [ints], blocks: [{index, start_ns, end_ns,
    cycles: [at stages 1.., -1 where unset]}]}."""
    out = {"blocks": []}
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts[0] in ("span_us", "clock_khz"):
            out[parts[0]] = float(parts[1])
        elif parts[0] == "plan":
            out["plan"] = [int(v) for v in parts[1:]]
        elif parts[0] == "block":
            out["blocks"].append({"index": int(parts[1]), "start_ns": int(parts[2]), "end_ns": int(parts[3]),
                                  "cycles": [int(c) for c in parts[4:]]})
    if not out["blocks"]:
        raise RuntimeError("the timeline probe recorded no block:\n" + text)
    return out


def stage_summary(run: dict, stage_names, blocks=None) -> list:
    """Per stage (1..): over `blocks` (default all) the median and the largest microseconds since the block's
    start, and the median's step from the stage before (stages no block reached are None)."""
    blocks = run["blocks"] if blocks is None else blocks
    us_per_cycle = 1e3 / run["clock_khz"]
    stages, prev = [], 0.0
    for s, name in enumerate(stage_names):
        cycles = [b["cycles"][s] for b in blocks if s < len(b["cycles"]) and b["cycles"][s] >= 0]
        st = {"stage": name, "blocks": len(cycles), "us_from_start": None, "us_from_previous": None, "us_max": None}
        if cycles:
            st["us_from_start"] = statistics.median(cycles) * us_per_cycle
            st["us_max"] = max(cycles) * us_per_cycle
            st["us_from_previous"] = st["us_from_start"] - prev
            prev = st["us_from_start"]
        stages.append(st)
    return stages


def block_summary(run: dict) -> dict:
    """Blocks recorded, the spread of their starts, first start to last stamp, and the median block (us)."""
    blocks = run["blocks"]
    starts = [b["start_ns"] for b in blocks]
    ends = [b["end_ns"] for b in blocks if b["end_ns"]]
    return {"blocks": len(blocks), "starts_spread_us": (max(starts) - min(starts)) / 1e3,
            "kernel_us_first_start_to_last_end": (max(ends) - min(starts)) / 1e3 if ends else None,
            "block_us_median": statistics.median(b["end_ns"] - b["start_ns"] for b in blocks if b["end_ns"]) / 1e3
            if ends else None}


def stage_rows(by_mode: dict, stage_names, with_max: bool = False) -> list:
    """Markdown table lines: a row per stage, per mode the median us from start and step (and the slowest
    block's us from start)."""
    per_mode = ["us from start", "us step"] + (["slowest block"] if with_max else [])
    lines = ["| stage | " + " | ".join(f"{m} {c}" for m in by_mode for c in per_mode) + " |",
             "|---|" + "---:|" * (len(per_mode) * len(by_mode))]
    for s, name in enumerate(stage_names):
        cells = []
        for r in by_mode.values():
            st = r["stages"][s]
            if st["us_from_start"] is None:
                cells += [""] * len(per_mode)
                continue
            cells += [f"{st['us_from_start']:.2f}", f"{st['us_from_previous']:.2f}"]
            if with_max:
                cells.append(f"{st['us_max']:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def run_line(mode: str, r: dict, pair: str) -> str:
    """A markdown bullet for one run: blocks, the graph's time per layer `pair`, and the block_summary."""
    return (f"* `{mode}`: {r['blocks']} blocks; graph replay {r['span_us_per_layer_pair']:.2f} us per {pair} pair; "
            f"block starts spread over {r['starts_spread_us']:.2f} us; median block {r['block_us_median']:.2f} us; "
            f"first start to last stamp {r['kernel_us_first_start_to_last_end']:.2f} us (`%globaltimer`).")


def plot_stages(rows: list, path: Path, label_key: str = "mode") -> None:
    """A bar per row: the median block's stages, one after another."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 1.2 + 1.0 * len(rows)))
    for y, r in enumerate(rows):
        left = 0.0
        for s, st in enumerate(r["stages"]):
            if st["us_from_start"] is None:
                continue
            ax.barh(y, st["us_from_previous"], left=left, color=plt.cm.tab20(s % 20),
                    label=st["stage"] if y == 0 else None)
            left = st["us_from_start"]
    ax.set_yticks(range(len(rows)), [str(r[label_key]) for r in rows])
    ax.set_xlabel("us since the block started (median block)")
    ax.legend(fontsize=6, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.3))
    fig.savefig(path, dpi=120, bbox_inches="tight")

"""The timeline benchmarks' parsing and summaries (benchmarks/kernel_timeline.py, bench_mlp_timeline.py), on
a probe output written here: the GPU runs of the probes themselves happen in the benchmarks."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_mlp_timeline  # noqa: E402
import kernel_timeline  # noqa: E402

PROBE_OUTPUT = """span_us 12.5
plan 4 10 6
clock_khz 2000000
block 0 1000 9000 200 -1 600 4000
block 1 1100 9900 400 -1 1000 5000
block 3 1050 9500 600 -1 800 -1
"""


def test_parse_reads_every_block_and_the_plan():
    run = kernel_timeline.parse(PROBE_OUTPUT)
    assert run["span_us"] == 12.5 and run["clock_khz"] == 2e6 and run["plan"] == [4, 10, 6]
    assert [b["index"] for b in run["blocks"]] == [0, 1, 3]
    assert run["blocks"][1]["cycles"] == [400, -1, 1000, 5000]


def test_parse_refuses_an_output_without_blocks():
    with pytest.raises(RuntimeError, match="recorded no block"):
        kernel_timeline.parse("span_us 1.0\nclock_khz 2000000\n")


def test_stage_summary_takes_medians_over_the_blocks_that_reached_a_stage():
    run = kernel_timeline.parse(PROBE_OUTPUT)
    stages = kernel_timeline.stage_summary(run, ("a", "b", "c", "d"))
    # 2 GHz: 1000 cycles are 0.5 us
    assert stages[0]["us_from_start"] == pytest.approx(0.2) and stages[0]["us_max"] == pytest.approx(0.3)
    assert stages[1]["us_from_start"] is None and stages[1]["blocks"] == 0
    assert stages[2]["us_from_start"] == pytest.approx(0.4) and stages[2]["us_from_previous"] == pytest.approx(0.2)
    assert stages[3]["blocks"] == 2 and stages[3]["us_from_start"] == pytest.approx(2.25)
    summary = kernel_timeline.block_summary(run)
    assert summary["starts_spread_us"] == pytest.approx(0.1)
    assert summary["kernel_us_first_start_to_last_end"] == pytest.approx(8.9)


@pytest.mark.parametrize("blocks,pair_tiles,down_tiles", [(132, 432, 160), (132, 160, 432), (7, 7, 20), (5, 13, 5)])
def test_tiles_of_block_split_the_tiles_as_the_kernel_does(blocks, pair_tiles, down_tiles):
    plan = [blocks, pair_tiles, down_tiles]
    split = [bench_mlp_timeline.tiles_of_block(plan, b) for b in range(blocks)]
    assert sum(a for a, _ in split) == pair_tiles and sum(d for _, d in split) == down_tiles
    assert {a for a, _ in split} <= {pair_tiles // blocks, -(-pair_tiles // blocks)}
    assert {d for _, d in split} <= {down_tiles // blocks, -(-down_tiles // blocks)}

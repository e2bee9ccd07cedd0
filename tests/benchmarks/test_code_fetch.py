"""bench_code_fetch's parsing and sums, on CPU: the probe's output, the cost per fetched kilobyte, and the code
sizes read from a cubin's section list."""
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_code_fetch as bench  # noqa: E402

PROBE_OUTPUT = """clock_khz 1980000
sm 132
run 128 8 1 2.5000 700 760
run 128 8 16 2.9000 2300 2500
run 512 32 1 4.0000 2400 2600
run 512 32 4 5.5000 9600 9900
"""


def test_probe_output_is_parsed():
    probe = bench.parse_probe(PROBE_OUTPUT)
    assert probe["clock_khz"] == 1980000 and probe["sms"] == 132
    assert len(probe["runs"]) == 4
    last = probe["runs"][-1]
    assert last == {"threads": 512, "kb": 32, "kernels": 4, "footprint_kb": 128, "us_per_launch": 5.5,
                    "cycles_median": 9600, "cycles_p90": 9900}


def test_a_probe_that_printed_no_run_is_an_error():
    with pytest.raises(RuntimeError, match="no run"):
        bench.parse_probe("clock_khz 1\nsm 2\n")


def test_fetch_cost_is_per_kilobyte_over_the_cached_run_of_the_same_size():
    rows = bench.with_fetch_cost(bench.parse_probe(PROBE_OUTPUT)["runs"])
    cost = {(r["threads"], r["kb"], r["kernels"]): r["extra_cycles_per_kb"] for r in rows}
    assert cost[(128, 8, 1)] == 0
    assert cost[(128, 8, 16)] == (2300 - 700) / 8
    assert cost[(512, 32, 4)] == (9600 - 2400) / 32


def test_a_run_without_its_cached_baseline_has_no_cost():
    rows = bench.with_fetch_cost([{"threads": 128, "kb": 8, "kernels": 4, "cycles_median": 900}])
    assert rows[0]["extra_cycles_per_kb"] is None


def test_text_sections_are_read_from_the_section_list():
    listing = """There are 3 section headers:
  [Nr] Name              Type            Address          Off    Size   ES Flg Lk Inf Al
  [ 1] .shstrtab         STRTAB          0000000000000000 000040 0003c2 00      0   0  1
  [ 9] .text._Z6kernelPf PROGBITS        0000000000000000 000600 000480 00  AX  3   9 128
  [43] .text._Z5otherv   PROGBITS        0000000000000000 00a180 008400 00  AX  3   3 128
"""
    assert bench.parse_text_sections(listing) == {"_Z6kernelPf": 0x480, "_Z5otherv": 0x8400}


@pytest.mark.skipif(shutil.which("nvcc") is None or shutil.which("readelf") is None, reason="needs nvcc and readelf")
def test_code_sizes_of_a_real_source():
    rows = bench.kernel_code_sizes(("norm_quant.cu",))
    kernels = {r["kernel"] for r in rows}
    assert any("rms_norm_quant_kernel" in k for k in kernels)
    assert all(r["bytes"] > 1024 for r in rows)
    assert [r["bytes"] for r in rows] == sorted((r["bytes"] for r in rows), reverse=True)

"""scripts/benchmark.py: the harness runs and writes its tables; the Stan data it builds describe the
same grid and protocol as the zinckin problem; with pystan installed, both log densities agree."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest


SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
import benchmark  # noqa: E402


def test_harness_writes_results_for_a_small_case(tmp_path, capsys):
    assert benchmark.main(["--cells", "2", "--nuts-cells", "--repeats", "1", "--output", "2", "--output-draws", "20",
                           "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "benchmark.json").read_text())
    (out,) = results["output"]  # 2 cells x 20 draws: every cell kept per frame
    assert out["predictive_cells"] == 2 and out["draws"] == 20
    assert out["all_cells_per_frame_mb"] == 3 * 20 * 2 * 121 * 8 / 2**20
    assert out["all_cells_per_frame_mb"] < out["tree_mb"] < out["file_mb"] + 1
    (row,) = results["gradient"]
    assert row["cells"] == 2 and row["dim"] == 8 + 3 + 2 * 3 + 2 * 4
    assert np.isfinite(row["logp_at_truth"]) and row["grad_ms"] > 0 and row["compile_s"] > 0
    assert results["environment"]["versions"]["jax"]
    md = (tmp_path / "benchmark.md").read_text()
    assert "| 2 | 25 |" in md
    header, line = (tmp_path / "benchmark.csv").read_text().splitlines()
    assert header.startswith("cells,") and line.startswith("2,")


def test_stan_data_match_the_problem():
    """Every frame maps to its own time on the Stan grid, segments tile the grid from the protocol
    start to the last frame, and the unconstrained vector has one entry per numpyro coordinate."""
    case = benchmark.make_case(3, rtol=1e-6, atol=1e-9)
    d = case.stan_data
    grid = np.asarray(d["grid"])
    np.testing.assert_array_equal(grid[np.asarray(d["frame_at"]) - 1], np.asarray(case.problem.time_min))
    assert grid[0] == d["seg_start"][0] and d["seg_last"][-1] == d["G"]
    for k in range(d["K"]):
        assert grid[d["seg_first"][k] - 2] == d["seg_start"][k]  # the point before the first is the segment start
        if k + 1 < d["K"]:
            assert grid[d["seg_last"][k] - 1] == d["seg_start"][k + 1] and d["seg_first"][k + 1] == d["seg_last"][k] + 1
    assert d["seg_zo_free_uM"][-1] == 0.0 and d["seg_tpen"][-1] == 1.0 and d["seg_iono"][-2] == 1.0
    assert len(benchmark.stan_unconstrained(case.z_truth)) == case.flat_truth.size


@pytest.mark.skipif(importlib.util.find_spec("stan") is None, reason="pystan not installed (pip install '.[bench]')")
@pytest.mark.filterwarnings("ignore")  # pystan's web stack (aiohttp, marshmallow) warns about its own use of them
def test_stan_and_zinckin_log_densities_agree():
    tight = benchmark.make_case(3, rtol=1e-10, atol=1e-13, max_steps=100_000)
    posterior, _ = benchmark.stan_build(tight)
    check = benchmark.agreement(tight, posterior)
    assert check["max_rel_diff"] < 1e-8, check


def test_compile_time_counts_nested_traces_once():
    """The example fit's compile time is the union of jax's compile events: a nested jit's trace
    lies inside its caller's and is not added twice; separate compiles add up."""
    assert benchmark.union_seconds([]) == 0.0
    assert benchmark.union_seconds([(0.0, 4.0), (1.0, 2.0), (1.5, 3.0)]) == pytest.approx(4.0)
    assert benchmark.union_seconds([(5.0, 6.0), (0.0, 1.0), (0.5, 2.0)]) == pytest.approx(3.0)

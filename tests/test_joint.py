"""Joint fit of model C to imaging and transcript data with shared parameters (examples/coupled_joint).

The long test runs three NUTS fits (joint, imaging alone, transcripts alone) and is deselected by
default: run it with ``pytest -m long tests/test_joint.py -s``. Its last run (82 min, with the
config then on Tsit5) failed: 703 divergent joint draws, and the single-data-set fits did not
converge (docs/custom_models.md, "Joint fits"); with Kvaerno5 it has not been run yet.
"""

import dataclasses
import json
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from inference._config import load_config
from inference._custom import load_custom, run_custom


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "coupled_joint"


def test_joint_example_layout_is_one_batched_solve_with_separate_sites():
    """Both data sets are rows of one batched solve; each (data set, observable) is its own site."""
    config, base = load_config(EXAMPLE / "fit.toml")
    problem = load_custom(config, base)
    lay = problem.layout
    assert lay["ts"].shape == (2, 46) and lay["t0"].tolist() == [0.0, 0.0]
    assert lay["ts"][1, 5] == 1440.0 and (lay["ts"][1, 6:] == 1440.0).all()  # transcript row padded with its last time
    assert [s for s, _, _ in problem.sites()] == ["imaging__zc_nM", "transcripts__MT1_fc", "transcripts__ZnT1_fc",
                                                 "transcripts__ZIP4_fc"]
    assert lay["fixed"]["zo_after_uM"].tolist() == [30.0, 50.0] and lay["fixed"]["t_switch_min"].tolist() == [10.0, 0.0]


@pytest.mark.long
def test_joint_fit_recovers_shared_parameters_and_is_narrower_than_either_data_set():
    """Joint NUTS fit of the synthetic joint data set (both tables simulated from truth.json):
    converged, every estimated parameter's 90% interval holds the truth, and every parameter that
    both data sets inform (all but the two noise scales) has a narrower posterior (sd of the log)
    jointly than from either data set alone."""
    import arviz_stats as azs


    config, base = load_config(EXAMPLE / "fit.toml")
    truth = json.loads((EXAMPLE / "truth.json").read_text())["parameters"]
    joint = load_custom(config, base)
    sampler = config.sampler_config()
    problems = {"joint": joint, "imaging": dataclasses.replace(joint, datasets=joint.datasets[:1]),
                "transcripts": dataclasses.replace(joint, datasets=joint.datasets[1:])}
    report = {}
    for label, problem in problems.items():
        start = time.perf_counter()
        tree = run_custom(problem, sampler, key=jax.random.key(config.seed), progress_bar=False,
                          num_starts=config.sampler.map_starts).tree
        print(f"{label}: {time.perf_counter() - start:.0f} s", flush=True)
        post = tree["posterior"]
        rhat = azs.rhat(post.dataset)
        ess = azs.ess(post.dataset)
        report[label] = {
            n: {"sd_log": float(np.log(post[n]).std()), "q05": float(post[n].quantile(0.05)),
                "q95": float(post[n].quantile(0.95)), "r_hat": float(rhat[n]), "ess_bulk": float(ess[n])}
            for n in problem.model.sampled_names
        }
        report[label]["_divergences"] = int(tree["sample_stats"]["diverging"].sum())
        report[label]["_solver_failures"] = int(tree["sample_stats"]["solver_failures"].sum())
    print(json.dumps(report, indent=1))  # the figures quoted in docs/custom_models.md (run with -s)
    j = report["joint"]
    assert j["_divergences"] == 0
    names = joint.model.sampled_names
    for n in names:
        assert j[n]["r_hat"] < 1.01 and j[n]["ess_bulk"] > 400, (n, j[n])
        assert j[n]["q05"] <= truth[n] <= j[n]["q95"], (n, truth[n], j[n])
    shared = [n for n in names if n not in ("sigma_zc", "sigma_fc")]
    for n in shared:
        assert j[n]["sd_log"] < min(report["imaging"][n]["sd_log"], report["transcripts"][n]["sd_log"]), (
            n, {k: report[k][n]["sd_log"] for k in report})

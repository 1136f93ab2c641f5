"""Log-density gradients, determinism, solver-failure handling and the CLI on the example."""

import json
import re
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from jax.flatten_util import ravel_pytree
from numpyro.infer import init_to_median
from numpyro.infer.util import initialize_model

from data import EXAMPLE_DIR, load_imaging
from inference._cli import main
from inference._fit import SamplerConfig, build_problem, run_nuts
from inference._model import default_plan, imaging_model
from models import SolverConfig


@pytest.fixture(scope="module")
def small_problem():
    """Three cells of the bundled example, tight ODE tolerances."""
    ds = load_imaging(EXAMPLE_DIR / "traces.csv", EXAMPLE_DIR / "protocol.toml",
                      exclude_cells=[f"cell{i:03d}" for i in range(4, 13)])
    return ds, build_problem(ds, SolverConfig(rtol=1e-10, atol=1e-13, max_steps=20_000))


@pytest.mark.parametrize("centered", [True, False])
def test_log_density_gradient_matches_finite_differences(small_problem, centered):
    _, problem = small_problem
    plan = default_plan(probe_kd_nM=15.0, centered=centered)
    info, potential_fn, _, _ = initialize_model(jax.random.key(0), imaging_model, model_args=(problem, plan),
                                                init_strategy=init_to_median(num_samples=15))
    x0, unravel = ravel_pytree(info.z)
    x0 = x0 + 0.05 * jax.random.normal(jax.random.key(1), x0.shape)  # off the prior median
    f = jax.jit(lambda x: potential_fn(unravel(x)))
    g = np.asarray(jax.jit(jax.grad(lambda x: potential_fn(unravel(x))))(x0))
    h = 1e-5
    eye = np.eye(x0.size) * h
    fd = np.array([(f(x0 + e) - f(x0 - e)) / (2 * h) for e in eye])
    assert np.isfinite(g).all()
    np.testing.assert_allclose(g, fd, rtol=1e-4, atol=1e-4 * np.max(np.abs(fd)))


def test_failed_solve_gives_minus_infinity_and_is_counted(small_problem):
    ds, _ = small_problem
    problem = build_problem(ds, SolverConfig(max_steps=16))  # far too few steps for any cell
    plan = default_plan(probe_kd_nM=15.0)
    from numpyro.handlers import seed, trace

    tr = trace(seed(imaging_model, 0)).get_trace(problem, plan)
    assert int(tr["solver_failures"]["value"]) == 3
    assert float(tr["solver_ok"]["fn"].log_prob(0.0)) == -np.inf


def _tiny_fit(problem, cell_id):
    plan = default_plan(probe_kd_nM=15.0)
    cfg = SamplerConfig(num_warmup=30, num_samples=20, num_chains=2)
    return run_nuts(problem, plan, cfg, key=jax.random.key(7), cell_id=cell_id, progress_bar=False)


def test_same_seed_same_draws_and_tree_groups(small_problem):
    ds, _ = small_problem
    problem = build_problem(ds)
    a = _tiny_fit(problem, ds.traces.cell_id)
    b = _tiny_fit(problem, ds.traces.cell_id)
    for name in a.tree["posterior"].data_vars:
        np.testing.assert_array_equal(a.tree["posterior"][name].values, b.tree["posterior"][name].values)
    tree = a.tree
    for group in ("posterior", "posterior_predictive", "log_likelihood", "sample_stats", "observed_data", "constant_data"):
        assert group in tree.children, group
    assert tree["posterior"]["zc_rest_nM_cell"].dims == ("chain", "draw", "cell")
    assert tree["posterior_predictive"]["intensity"].dims == ("chain", "draw", "cell", "time")
    assert tree["log_likelihood"]["intensity"].shape == (2, 20, 3, 121)
    assert "solver_failures" in tree["sample_stats"]
    assert list(tree["observed_data"]["cell"].values) == ["cell001", "cell002", "cell003"]


@pytest.fixture(scope="module")
def example_run(tmp_path_factory):
    """The bundled example fitted from its config (``zinckin fit data/example/fit.toml``)."""
    out = tmp_path_factory.mktemp("example") / "run"
    assert main(["fit", str(EXAMPLE_DIR / "fit.toml"), "--out", str(out), "--no-progress"]) == 0
    return out


def test_fit_example_config_writes_run_directory(example_run, capsys):
    out = example_run
    for name in ("posterior.nc", "summary.csv", "run.json", "rank.png", "trace.png", "ppc_traces.png"):
        assert (out / name).stat().st_size > 0, name
    tree = xr.open_datatree(out / "posterior.nc", engine="h5netcdf")
    assert {"posterior", "posterior_predictive", "log_likelihood", "sample_stats", "observed_data",
            "constant_data"} <= set(tree.children)
    assert tree["posterior"].sizes["cell"] == 12
    assert tree["observed_data"]["intensity"].dims == ("cell", "time")
    run = json.loads((out / "run.json").read_text())
    assert run["diagnostics"]["max_r_hat"] < 1.05
    assert run["diagnostics"]["draws_with_solver_failures"] == 0
    # a second fit into the same folder must not overwrite it
    assert main(["fit", str(EXAMPLE_DIR / "fit.toml"), "--out", str(out), "--no-progress"]) == 2
    assert "already holds a fit" in capsys.readouterr().err
    assert not list(out.glob(".*.tmp*"))


REPORT_FIGURES = ("trace.png", "rank.png", "prior_posterior.png", "pair.png", "forest.png", "ppc_page1.png",
                  "loo_pit.png")


def test_report_of_the_example_run(example_run, capsys):
    """`zinckin report` on the example: every figure written and embedded, cells ordered worst first."""
    assert main(["report", str(example_run)]) == 0
    report = example_run / "report"
    page = (report / "report.html").read_text()
    for name in REPORT_FIGURES:
        assert (report / name).stat().st_size > 5000, name
        assert page.count(f'data-file="{name}"') == 1, name
    assert page.count("<img ") == len(REPORT_FIGURES)
    assert "Gate verdict: converged" in page
    scores = pd.read_csv(report / "fit_scores.csv")
    assert len(scores) == 12 and scores["score"].is_monotonic_decreasing
    assert sorted(scores["panel"]) == [f"cell{i:03d}" for i in range(1, 13)]
    # the example is simulated from the model: calibrated, most observations inside their 90% band
    assert scores["coverage_90"].mean() > 0.8


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Chromium (Debian package chromium)")
def test_example_report_renders_in_headless_chromium(example_run, tmp_path):
    """The report opens in a real browser with every image decoded (the page's own image check)."""
    if not (example_run / "report" / "report.html").exists():
        assert main(["report", str(example_run)]) == 0
    url = (example_run / "report" / "report.html").resolve().as_uri()
    common = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*common, "--virtual-time-budget=10000", "--dump-dom", url], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    check = re.search(r'id="image-check" data-loaded="(\d+)" data-total="(\d+)"', dom)
    assert check is not None, dom[-2000:]
    assert int(check.group(2)) == len(REPORT_FIGURES) and check.group(1) == check.group(2)
    shot = tmp_path / "report.png"
    subprocess.run([*common, "--hide-scrollbars", "--window-size=1280,2400", f"--screenshot={shot}", url],
                   capture_output=True, timeout=120, check=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000


def test_prior_predictive_check_of_the_example_config(tmp_path, capsys):
    assert main(["ppc", str(EXAMPLE_DIR / "fit.toml"), "--prior", "--draws", "40", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "40 of 40 prior draws solved" in out
    cover = float(re.search(r"inside the 90% prior predictive band: (\d+)% on average", out).group(1))
    assert cover > 50  # the example's priors reach its data
    assert (tmp_path / "prior_predictive.png").stat().st_size > 10_000
    assert main(["ppc", str(EXAMPLE_DIR / "fit.toml"), "--out", str(tmp_path)]) == 2  # --prior is required
    assert "pass --prior CONFIG" in capsys.readouterr().err


def test_bad_config_is_a_clear_error(tmp_path, capsys):
    cfg = tmp_path / "fit.toml"
    cfg.write_text('[data]\ntraces = "t.csv"\nprotocol = "p.toml"\n[sampler]\nnum_chains = 0\nwarmup = 3\n')
    assert main(["check", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "key 'sampler.num_chains'" in err and "key 'sampler.warmup': Extra inputs are not permitted" in err
    assert "Traceback" not in err
    cfg.write_text(f'[data]\ntraces = "{EXAMPLE_DIR / "traces.csv"}"\nprotocol = "{tmp_path / "missing.toml"}"\n')
    assert main(["check", str(cfg)]) == 2
    assert "missing.toml: the protocol file does not exist" in capsys.readouterr().err
    cfg.write_text('[data]\ntraces = "t.csv"\nprotocol = "p.toml"\n[solver]\nblock_rows = 0\n')
    assert main(["check", str(cfg)]) == 2
    assert "key 'solver.block_rows'" in capsys.readouterr().err


def test_solver_block_rows_setting():
    """``[solver] block_rows``: "auto" (default) blocks of models.CPU_BLOCK_ROWS on a CPU and one
    system on a GPU; "all" one system everywhere; an integer as given."""
    import models as m
    from inference._config import FitConfig

    def solver(**kw):
        return FitConfig.model_validate({"data": {"traces": "t.csv", "protocol": "p.toml"}, "solver": kw}).solver_config()

    assert solver().block_rows == "auto"
    assert m.ODESolver(layout="system").rows_per_block("cpu") == m.CPU_BLOCK_ROWS
    assert m.ODESolver(layout="system").rows_per_block("gpu") is None
    assert solver(block_rows="all").block_rows is None
    assert solver(block_rows=32).block_rows == 32


def test_check_example(capsys):
    assert main(["check", str(EXAMPLE_DIR / "fit.toml")]) == 0
    out = capsys.readouterr().out
    assert "12 cells x 121 frames" in out and "probe FluoZin-3 (Kd 15 nM)" in out


def test_simulate_writes_dataset_that_loads(tmp_path):
    out = tmp_path / "sim"
    assert main(["simulate", "--out", str(out), "--num-cells", "3", "--seed", "3"]) == 0
    ds = load_imaging(out / "traces.csv", out / "protocol.toml")
    truth = json.loads((out / "truth.json").read_text())
    assert ds.traces.intensity.shape == (3, 121)
    assert set(truth["cells"]["zc_rest_nM"]) == set(ds.traces.cell_id)
    assert (out / "COMMAND.txt").read_text().startswith("zinckin simulate")
    assert main(["simulate", "--out", str(out), "--num-cells", "3"]) == 2  # no silent overwrite


def test_numpyro_works_when_arviz_is_imported_first():
    """arviz-base registers numpyro as a lazy module; a script that imports arviz_stats before our
    packages must still get a working numpyro.factor (our packages import numpyro itself first)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = ("import arviz_stats\nimport inference\nimport numpyro\n"
            "from numpyro.infer.util import log_density\n"
            "def m():\n    numpyro.factor('f', -1.5)\n"
            "print(float(log_density(m, (), {}, {})[0]))\n")
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-c", code], cwd=root, env=dict(os.environ, PYTHONPATH=str(root)),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "-1.5"


def test_prediction_is_inlined_only_inside_a_jit_trace():
    """predict runs its compiled program when called eagerly (also under grad, linearize or vmap,
    as numpyro's initialisation does), and is inlined when traced by jit, also under grad or vmap
    inside it."""
    from inference._model import _inside_jit

    x = jnp.arange(3.0)
    assert not _inside_jit((x, 1.0))
    seen = []

    def probe(v):
        seen.append(_inside_jit(v))
        return jnp.sum(v**2)

    jax.grad(probe)(x)
    jax.linearize(probe, x)
    jax.vmap(probe)(x[:, None])
    assert seen == [False, False, False]
    jax.jit(probe)(x)
    jax.jit(jax.grad(probe))(x)
    jax.jit(jax.vmap(probe))(x[:, None])
    assert seen[3:] == [True, True, True]


def test_pointwise_intensity_matches_numpyro_log_likelihood_and_samples_the_noise_model(small_problem):
    """One pass of the model per draw gives numpyro's ``log_likelihood`` to rounding, the model's
    deterministic sites, and predictive draws whose standardised residuals about the predicted
    trace are N(0, 1)."""
    from numpyro.handlers import substitute, trace
    from numpyro.infer import Predictive, log_likelihood

    from inference._fit import pointwise_intensity

    _, problem = small_problem
    plan = default_plan(probe_kd_nM=15.0)
    prior = Predictive(imaging_model, num_samples=40)(jax.random.key(3), problem, plan)
    draws = {k: v for k, v in prior.items() if k not in ("intensity", "solver_failures")}
    from numpyro.handlers import seed

    latent = {k for k, s in trace(seed(imaging_model, 0)).get_trace(problem, plan).items()
              if s["type"] == "sample" and not s["is_observed"]}
    sampled = {k: v for k, v in draws.items() if k in latent}
    ll, ppc, det = pointwise_intensity(problem, plan, sampled, jax.random.key(4))
    expected = log_likelihood(imaging_model, draws, problem, plan)["intensity"]
    assert ll.shape == ppc.shape == (40, 3, 121)
    np.testing.assert_allclose(np.asarray(ll), np.asarray(expected), rtol=1e-12, atol=1e-12)
    # the deterministic sites, from the sample sites alone, are the model's own
    assert {"zc_nM", "solver_failures", "f_max"} <= set(det)
    for k in set(det) & set(prior):
        np.testing.assert_allclose(np.asarray(det[k]), np.asarray(prior[k]), rtol=1e-12, atol=1e-12)
    z = []
    for i in range(40):
        fn = trace(substitute(imaging_model, data={k: v[i] for k, v in draws.items()})).get_trace(problem, plan)["intensity"]["fn"]
        z.append((np.asarray(ppc[i]) - np.asarray(fn.mean)) / np.asarray(fn.base_dist.scale))
    z = np.concatenate([a.ravel() for a in z])
    assert abs(z.mean()) < 0.05 and abs(z.std() - 1.0) < 0.05


def test_predictive_subset_resolves_the_setting():
    from inference._fit import PREDICTIVE_BUDGET, predictive_subset

    assert predictive_subset("all", 10_000, 4000, 121) is None
    assert predictive_subset(50, 20, 100, 121) is None  # more than the cells: every cell
    np.testing.assert_array_equal(predictive_subset(3, 7, 100, 121), [0, 3, 6])  # spread evenly, ends included
    assert predictive_subset("auto", 12, 1800, 121) is None  # the example keeps everything
    keep = predictive_subset("auto", 10_000, 2000, 121)
    assert len(keep) == PREDICTIVE_BUDGET // (2000 * 121) and len(np.unique(keep)) == len(keep)
    assert keep[0] == 0 and keep[-1] == 9_999
    for bad in (0, -3, "some", 2.5, True):
        with pytest.raises(ValueError, match="predictive_cells"):
            predictive_subset(bad, 10, 10, 10)


def test_a_predictive_subset_keeps_the_full_trees_values(small_problem, tmp_path):
    """The kept cells' per-frame log likelihood and draws are the full pass's values for those
    cells; plots, panels and the pointwise LOO input read either tree."""
    from numpyro.handlers import seed, trace
    from numpyro.infer import Predictive

    from inference._fit import assemble_tree
    from inference._output import plot_ppc_traces
    from inference._report import predictive_panels
    from inference._review import per_frame_cells, pointwise

    ds, problem = small_problem
    plan = default_plan(probe_kd_nM=15.0)
    latent = {k for k, s in trace(seed(imaging_model, 0)).get_trace(problem, plan).items()
              if s["type"] == "sample" and not s["is_observed"]}
    prior = Predictive(imaging_model, num_samples=12)(jax.random.key(5), problem, plan)
    samples = {k: np.asarray(v).reshape((2, 6) + v.shape[1:]) for k, v in prior.items() if k in latent}
    samples["solver_failures"] = np.zeros((2, 6), dtype=int)
    cells = ds.traces.cell_id
    kw = dict(key=jax.random.key(6), cell_id=cells, max_tree_depth=0)
    full = assemble_tree(problem, plan, samples, None, **kw)
    part = assemble_tree(problem, plan, samples, None, predictive_cells=2, **kw)

    assert full.attrs["predictive_cells"] == 3 and part.attrs["predictive_cells"] == 2
    kept = [cells[0], cells[2]]
    assert per_frame_cells(full) == list(cells) and per_frame_cells(part) == kept
    for group, name in (("posterior_predictive", "intensity"), ("posterior", "zc_nM"), ("log_likelihood", "intensity")):
        a = part[group][name]
        assert a.dims == ("chain", "draw", "predictive_cell", "time")
        assert list(a["predictive_cell"].values) == kept
        np.testing.assert_array_equal(a.values, full[group][name].sel(cell=kept).values)
    np.testing.assert_array_equal(part["posterior"]["zc_rest_nM_cell"].values, full["posterior"]["zc_rest_nM_cell"].values)
    assert part["observed_data"]["intensity"].dims == ("cell", "time")  # every cell's data stays

    panels = predictive_panels(part)
    assert [p.title for p in panels] == kept
    full_panels = {p.title: p for p in predictive_panels(full)}
    for p in panels:
        np.testing.assert_array_equal(p.observed, full_panels[p.title].observed)
        np.testing.assert_allclose(p.band, full_panels[p.title].band)
    plot_ppc_traces(part, tmp_path / "ppc.png")
    assert (tmp_path / "ppc.png").stat().st_size > 5000

    pw_part, pw_full = pointwise(part), pointwise(full, cells=kept)
    assert pw_part.attrs["num_observations"] == 2 * 121
    for group in ("log_likelihood", "posterior_predictive", "observed_data"):
        np.testing.assert_array_equal(pw_part[group]["y"].values, pw_full[group]["y"].values)
    assert pointwise(full).attrs["num_observations"] == int(np.isfinite(full["observed_data"]["intensity"]).sum())


def _subset_config(tmp_path, name: str, predictive_cells) -> str:
    exclude = ", ".join(f'"cell{i:03d}"' for i in range(4, 13))
    value = f'"{predictive_cells}"' if isinstance(predictive_cells, str) else predictive_cells
    path = tmp_path / f"{name}.toml"
    path.write_text(f"""seed = 3
[data]
traces = "{EXAMPLE_DIR / 'traces.csv'}"
protocol = "{EXAMPLE_DIR / 'protocol.toml'}"
exclude_cells = [{exclude}]
[sampler]
method = "map"
approx_draws = 200
[output]
dir = "{tmp_path / name}"
predictive_cells = {value}
""")
    return str(path)


def test_fit_with_a_predictive_subset_reports_and_compares_on_the_kept_cells(tmp_path, capsys, monkeypatch):
    """`[output] predictive_cells` through the CLI: the written tree holds the subset, the report
    computes LOO and LOO-PIT over the kept cells, and `zinckin compare` compares it with a run
    that kept every cell on the cells both kept. A `method = "map"` fit of many cells warns that the Laplace
    approximation is off-centre (here "many" lowered to 3 for the second run)."""
    import inference._cli as cli

    assert main(["fit", _subset_config(tmp_path, "full", "all"), "--no-progress"]) == 0
    assert "Laplace approximation is centred" not in capsys.readouterr().err
    monkeypatch.setattr(cli, "LAPLACE_OFFCENTRE_CELLS", 3)
    assert main(["fit", _subset_config(tmp_path, "part", 2), "--no-progress"]) == 0
    assert 'method = "map" with 3 cells' in capsys.readouterr().err
    assert any("sqrt(cells)" in w for w in json.loads((tmp_path / "part" / "run.json").read_text())["warnings"])
    tree = xr.open_datatree(tmp_path / "part" / "posterior.nc", engine="h5netcdf")
    assert tree["posterior_predictive"]["intensity"].sizes["predictive_cell"] == 2
    assert tree["log_likelihood"]["intensity"].sizes["predictive_cell"] == 2
    assert (tmp_path / "part" / "ppc_traces.png").stat().st_size > 5000
    capsys.readouterr()
    assert main(["report", str(tmp_path / "part")]) == 0
    page = (tmp_path / "part" / "report" / "report.html").read_text()
    assert "The fit kept per-frame values for 2 of its 3 cells" in page
    assert 'data-file="loo_pit.png"' in page and "Panels of the 2 of 3 cells" in page
    assert main(["compare", str(tmp_path / "full"), str(tmp_path / "part"), "--out", str(tmp_path / "cmp")]) == 0
    assert "comparing on the observations of the 2 cells every run kept" in capsys.readouterr().out
    table = pd.read_csv(tmp_path / "cmp" / "compare.csv", index_col=0)
    assert set(table.index) == {"full", "part"}
    # the same model, data and seed: the same draws, so the same elpd over the shared cells
    np.testing.assert_allclose(table.loc["full", "elpd"], table.loc["part", "elpd"], rtol=1e-10)
    # a bad setting is a clear error naming the field
    assert main(["fit", _subset_config(tmp_path, "bad", 0), "--no-progress"]) == 2
    assert "predictive_cells" in capsys.readouterr().err

"""Posterior review on user-model runs: profile likelihoods name a planted non-identifiable pair,
LOO ranks the true model above a wrong one, and the report of such a run is complete.

The report of the bundled imaging example (and its headless-browser check) is in
tests/test_inference.py, next to the example fit it reads.
"""

import textwrap

import numpy as np
import pandas as pd
import pytest
from test_custom_model import MODEL_SRC

from inference._cli import main


def _derived(**replace) -> str:
    """A variant of test_custom_model's decay model (dx/dt = -k x, log-normal noise)."""
    src = MODEL_SRC
    for old, new in replace.values():
        assert old in src, old
        src = src.replace(old, new)
    return src


K_PARAM = 'Parameter("k", "1/h", dist.LogNormal(0.0, 1.0)),'
# dx/dt = -(a b) x: the data see only the product a b; x0 and the noise scale are identified
PAIR_SRC = _derived(name=('name="decay"', 'name="product_decay"'),
                    rhs=('-p["k"] * y["x"]', '-p["a"] * p["b"] * y["x"]'),
                    params=(K_PARAM, 'Parameter("a", "1/h", dist.LogNormal(0.0, 1.0)), '
                                     'Parameter("b", "1", dist.LogNormal(0.0, 1.0)),'))
# dx/dt = -k (x - x_inf): decay to a plateau (the truth) ...
PLATEAU_SRC = _derived(name=('name="decay"', 'name="plateau"'),
                       rhs=('-p["k"] * y["x"]', '-p["k"] * (y["x"] - p["x_inf"])'),
                       params=(K_PARAM, K_PARAM + ' Parameter("x_inf", "uM", dist.LogNormal(0.0, 1.0)),'))
# ... and decay to zero (wrong for that data)
DECAY_SRC = MODEL_SRC

SAMPLER = "\n[sampler]\nnum_warmup = 300\nnum_samples = 400\nnum_chains = 2\n"


def _project(folder, src, data_csv):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "m.py").write_text(textwrap.dedent(src))
    (folder / "d.csv").write_text(data_csv)
    (folder / "fit.toml").write_text(f'seed = 2\n[model]\nfile = "m.py"\n\n[[datasets]]\nfile = "d.csv"\n{SAMPLER}')
    return folder / "fit.toml"


def _simulated(tmp, src, params, times):
    """Data simulated by `zinckin simulate --config` from the given true values."""
    cfg = _project(tmp / "sim_model", src, "time,x\n" + "".join(f"{t:g},1\n" for t in times))
    args = ["simulate", "--config", str(cfg), "--out", str(tmp / "sim"), "--seed", "5"]
    for k, v in params.items():
        args += ["--param", f"{k}={v}"]
    assert main(args) == 0
    return (tmp / "sim" / "d.csv").read_text()


@pytest.fixture(scope="module")
def pair_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pair")
    data = _simulated(tmp, PAIR_SRC, {"a": 0.5, "b": 1.4, "x0": 8.0, "s": 0.05}, np.arange(0, 6.5, 0.5))
    cfg = _project(tmp / "fit", PAIR_SRC, data)
    main(["fit", str(cfg), "--out", str(tmp / "run"), "--no-progress"])  # the gate may fail on the ridge; the run is written
    assert (tmp / "run" / "posterior.nc").exists()
    return tmp / "run"


def test_profile_names_the_planted_product_pair_and_not_the_identified_parameters(pair_run, capsys):
    assert main(["profile", str(pair_run)]) == 0
    out = capsys.readouterr().out
    table = pd.read_csv(pair_run / "identifiability.csv", index_col=0)
    assert set(table.index) == {"a", "b", "x0", "s"}
    # a and b enter only as a b: the profile stays within the threshold over the whole grid
    for n in ("a", "b"):
        assert table.loc[n, "verdict"] == "flat", table
        assert table.loc[n, "max_drop"] < 0.1, table
        assert table.loc[n, "grid_high"] / table.loc[n, "grid_low"] > 50  # the grid spans the prior's range
    for n in ("x0", "s"):
        assert table.loc[n, "verdict"] == "identified", table
        assert table.loc[n, "lower95"] < table.loc[n, "best"] < table.loc[n, "upper95"]
    assert 7.0 < table.loc["x0", "best"] < 9.0
    assert "not identified by the data: a, b" in out
    curves = pd.read_csv(pair_run / "profiles.csv")
    assert curves["delta"].min() >= -1e-6 and (curves.groupby("parameter")["delta"].min().abs() < 1e-6).all()
    assert (pair_run / "profiles.png").stat().st_size > 0


def test_report_of_a_user_model_run_has_every_section(pair_run, capsys):
    assert main(["report", str(pair_run)]) == 0
    report = pair_run / "report"
    page = (report / "report.html").read_text()
    for name in ("trace.png", "rank.png", "prior_posterior.png", "pair.png", "ppc_page1.png", "loo_pit.png"):
        assert (report / name).stat().st_size > 0, name
        assert f'data-file="{name}"' in page, name  # embedded in the page
    for heading in ("Diagnostics", "Population parameters", "Prior and posterior", "Correlations",
                    "Predictions against the data", "Calibration", "Identifiability"):
        assert f">{heading}</h2>" in page, heading
    # the pair shows up as a strong posterior correlation
    assert "<td>a</td>" in page and "<td>b</td>" in page
    scores = pd.read_csv(report / "fit_scores.csv")
    assert list(scores["panel"]) == ["x"] and 0.3 < scores["score"].iloc[0] < 2.0
    assert "src=\"http" not in page and "<link" not in page  # nothing to fetch


def test_loo_ranks_the_true_model_above_a_wrong_one(tmp_path, capsys, pair_run):
    data = _simulated(tmp_path, PLATEAU_SRC, {"k": 0.8, "x_inf": 3.0, "x0": 10.0, "s": 0.05}, np.arange(0, 8.5, 0.5))
    runs = {}
    for name, src in (("plateau", PLATEAU_SRC), ("decay", DECAY_SRC)):
        cfg = _project(tmp_path / f"{name}_fit", src, data)
        main(["fit", str(cfg), "--out", str(tmp_path / name), "--no-progress"])
        runs[name] = tmp_path / name
    assert main(["compare", str(runs["decay"]), str(runs["plateau"]), "--out", str(tmp_path / "cmp")]) == 0
    table = pd.read_csv(tmp_path / "cmp" / "compare.csv", index_col=0)
    assert table.index[0] == "plateau" and table.loc["plateau", "rank"] == 0
    # not a coin toss: the wrong model is many standard errors behind
    assert abs(table.loc["decay", "elpd_diff"]) > 4 * table.loc["decay", "dse"], table
    assert table.loc["plateau", "elpd"] > table.loc["decay", "elpd"]
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 0
    assert "best by PSIS-LOO: plateau" in capsys.readouterr().out
    # runs of different data are refused, naming both
    assert main(["compare", str(runs["plateau"]), str(pair_run), "--out", str(tmp_path / "cmp2")]) == 2
    err = capsys.readouterr().err
    assert "runs plateau and run were fitted to different data (17 and 13 observations)" in err
    assert not (tmp_path / "cmp2" / "compare.csv").exists()


def test_report_refuses_a_folder_without_a_fit(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no finished fit there" in capsys.readouterr().err

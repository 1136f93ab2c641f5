"""User-defined models (models.ODEModel): declarations, checks, solves, gradients, data, CLI."""

import json
import textwrap
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from numpyro.infer import init_to_median
from numpyro.infer.util import initialize_model
from scipy.integrate import solve_ivp

from data import DataError, TimeSeries, read_timeseries
from inference._cli import main
from inference._custom import CustomProblem, build_dataset, custom_model, load_model_file
from models import LogNormal, ModelError, Normal, Observable, ODEModel, Parameter, PreEquilibrated, State, StudentT


ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
VALIDATION = ROOT.parent / "shared" / "validation"


def lv_model(**overrides):
    def vf(t, y, p):
        return {"u": (p["a"] - p["b"] * y["v"]) * y["u"], "v": (-p["c"] + p["d"] * y["u"]) * y["v"]}

    kw = dict(
        name="lv", time_unit="year", vector_field=vf,
        states=[State("u", "k", initial="u0"), State("v", "k", initial=4.0)],
        parameters=[Parameter("a", "1/year", dist.TruncatedNormal(1.0, 0.5, low=0.0)),
                    Parameter("b", "", dist.HalfNormal(0.1)), Parameter("c", "", dist.LogNormal(0.0, 0.5)),
                    Parameter("d", "", dist.HalfNormal(0.1)), Parameter("u0", "k", dist.LogNormal(3.0, 0.5)),
                    Parameter("s", "", dist.HalfNormal(0.5))],
        observables=[Observable("u", "u", LogNormal("s")), Observable("v", "v", LogNormal(0.2))],
    )
    kw.update(overrides)
    return ODEModel(**kw)


VALUES = {"a": 0.55, "b": 0.028, "c": 0.8, "d": 0.024, "u0": 34.0, "s": 0.25}


# ---------------------------------------------------------------------------------------------
# mistakes in a model are named before any sampling


def test_wrong_state_count_is_named():
    def vf(t, y, p):
        return [y["u"], y["v"], 0.0]

    with pytest.raises(ModelError, match=r"returned 3 derivatives, but the model has 2 states \(u, v\)"):
        lv_model(vector_field=vf).check(0.0, [1.0, 2.0])
    with pytest.raises(ModelError, match=r"missing \['v'\], unknown \['w'\]"):
        lv_model(vector_field=lambda t, y, p: {"u": y["u"], "w": y["v"]}).check(0.0, [1.0])


def test_parameter_without_a_prior_is_named():
    params = [Parameter("a", "1/year"), *lv_model().parameters[1:]]
    with pytest.raises(ModelError, match="parameter 'a' has no prior"):
        lv_model(parameters=params)
    # a parameter the vector field reads but the model never declares
    params = [p for p in lv_model().parameters if p.name != "d"]
    with pytest.raises(ModelError, match="reads parameter 'd', which the model does not declare"):
        lv_model(parameters=params).check(0.0, [1.0])


def test_nan_observable_is_named_with_time():
    obs = [Observable("u", lambda t, y, p: jnp.log(y["u"] - 40.0), Normal("s")), Observable("v", "v", LogNormal(0.2))]
    with pytest.raises(ModelError, match=r"observable 'u' returned nan at t0=0"):
        lv_model(observables=obs).check(0.0, [1.0, 2.0], VALUES)
    # finite at the start, NaN later along the trajectory: the time is named
    obs = [Observable("u", lambda t, y, p: jnp.sqrt(y["u"] - 30.0), Normal("s")), Observable("v", "v", LogNormal(0.2))]
    with pytest.raises(ModelError, match=r"observable 'u' returned nan at t=[0-9.]+ "):
        lv_model(observables=obs).check(0.0, np.arange(1.0, 21.0), VALUES)


@pytest.mark.parametrize("change, message", [
    (dict(observables=[Observable("u", "x", Normal(1.0))]), "observes state 'x', which is not declared"),
    (dict(observables=[Observable("u", "u", Normal("sigma_u"))]), "noise scale refers to parameter 'sigma_u'"),
    (dict(observables=[Observable("u", "u", "gaussian")]), "is not one of Normal, LogNormal, StudentT"),
    (dict(states=[State("u", initial="u0"), State("u", initial=1.0)]), "state names \\['u'\\] are declared more than once"),
    (dict(states=[State("u", initial="u0"), State("v")]), "state 'v' has no initial value"),
    (dict(states=[State("u", initial="u_start"), State("v", initial=1.0)]), "initial refers to parameter 'u_start'"),
    (dict(parameters=[Parameter("a", "", "normal(1, 1)")]), "neither a numpyro distribution nor a number"),
    (dict(parameters=[Parameter("a", "", dist.Normal(jnp.zeros(2), 1.0))]), "the prior must be scalar"),
    (dict(initial=PreEquilibrated(baseline={"dose": 0.0})), "baseline sets 'dose', which is not a parameter"),
])
def test_declaration_mistakes_are_named(change, message):
    with pytest.raises(ModelError, match=message):
        lv_model(**change)


def test_user_exception_is_wrapped_with_the_function_name():
    def vf(t, y, p):
        raise ZeroDivisionError("oops")

    with pytest.raises(ModelError, match="vector_field raised ZeroDivisionError: oops"):
        lv_model(vector_field=vf).check(0.0, [1.0])


def test_model_file_errors(tmp_path):
    with pytest.raises(ModelError, match="the model file does not exist"):
        load_model_file(tmp_path / "nope.py")
    bad = tmp_path / "bad.py"
    bad.write_text("import math\nx = 1\ny = math.sqrt(-1)\n")
    with pytest.raises(ModelError, match=r"raised ValueError: math domain error \(line 3: y = math.sqrt\(-1\)\)"):
        load_model_file(bad)
    other = tmp_path / "other.py"
    other.write_text("model = 3\n")
    with pytest.raises(ModelError, match="'model' is a int, not a models.ODEModel"):
        load_model_file(other)
    with pytest.raises(ModelError, match="defines no object 'm2'"):
        load_model_file(other, "m2")


# ---------------------------------------------------------------------------------------------
# numerics: solves against SciPy, gradients against finite differences, pre-equilibration


def test_example_models_match_scipy():
    """Lotka-Volterra and the PK model (with its t > 0 dosing switch) against SciPy at tight tolerance."""
    lv = load_model_file(EXAMPLES / "lynx_hare" / "lotka_volterra.py")
    p = {"alpha": 0.55, "beta": 0.028, "gamma": 0.8, "delta": 0.024, "hare_0": 34.0, "lynx_0": 5.9,
         "sigma_hare": 0.25, "sigma_lynx": 0.25}
    ts = np.arange(0.0, 21.0)
    ys, ok = lv.solve(lv.params_view(p), 0.0, jnp.asarray(ts))
    ref = solve_ivp(lambda t, y: [(p["alpha"] - p["beta"] * y[1]) * y[0], (-p["gamma"] + p["delta"] * y[0]) * y[1]],
                    (0.0, 20.0), [34.0, 5.9], method="Radau", t_eval=ts, rtol=1e-12, atol=1e-12)
    assert bool(ok)
    np.testing.assert_allclose(np.asarray(ys), ref.y.T, rtol=1e-6)

    pk = load_model_file(EXAMPLES / "pk_mm_elimination" / "one_compartment.py")
    q = {"k_a": 0.77, "K_m": 1.5, "V_m": 0.9, "sigma": 0.13, "D": 30.0, "V": 2.0}
    ts = np.arange(0.5, 10.01, 0.5)
    ys, ok = pk.solve(pk.params_view(q), 0.0, jnp.asarray(ts))

    def rhs(t, y):
        return [q["D"] * q["k_a"] / q["V"] * np.exp(-q["k_a"] * t) - q["V_m"] / q["V"] * y[0] / (q["K_m"] + y[0])]

    ref = solve_ivp(rhs, (0.0, 10.0), [0.0], method="LSODA", t_eval=ts, rtol=1e-12, atol=1e-12)
    assert bool(ok)
    np.testing.assert_allclose(np.asarray(ys)[:, 0], ref.y[0], rtol=1e-6)


def _problem(model, times, observed, t0=0.0, constants=None, name="d", units=None):
    """A data set from arrays: ``observed[k]`` of shape (n_time,), or (n_units, n_time) with ``units``."""
    values = {k: np.atleast_2d(np.asarray(v, dtype=float)) for k, v in observed.items()}
    series = TimeSeries(path=Path("mem.csv"), times=np.asarray(times, dtype=float), values=values,
                        lines=np.zeros(next(iter(values.values())).shape, int), units=units)
    return build_dataset(model, name, series, t0=t0, time_factor=1.0, constants=constants or {})


def _grad_check(problem, rtol=1e-5, **init):
    """Gradient of the potential against central differences, element by element."""
    info, potential, _, _ = initialize_model(jax.random.key(1), custom_model, model_args=(problem,), **init)
    z = jax.tree.map(lambda v: v + 0.05, info.z)
    g = jax.jit(jax.grad(potential))(z)
    potential = jax.jit(potential)
    h = 1e-6
    for name in z:
        for i in np.ndindex(np.shape(z[name])):
            step = jnp.zeros_like(z[name]).at[i].set(h)
            fd = (potential({**z, name: z[name] + step}) - potential({**z, name: z[name] - step})) / (2 * h)
            np.testing.assert_allclose(np.asarray(g[name])[i], np.asarray(fd), rtol=rtol, atol=1e-6, err_msg=f"{name}{list(i)}")


def test_log_density_gradient_matches_finite_differences():
    lv = lv_model()
    t = np.arange(0.0, 11.0)
    ys, _ = lv.solve(lv.params_view(VALUES), 0.0, jnp.asarray(t))
    data = _problem(lv, t, {"u": np.asarray(ys[:, 0]) * 1.05, "v": np.asarray(ys[:, 1]) * 0.97})
    _grad_check(CustomProblem(model=lv, datasets=(data,)))


def test_preequilibrated_start_is_a_steady_state_with_implicit_gradients():
    """A production/degradation model with a stimulus: the start solves f = 0 under the baseline
    (stimulus off) to 1e-8, and d(start)/d(params) matches the analytic steady state."""

    def vf(t, y, p):
        k_in = p["k_prod"] * (1.0 + p["stim"])
        return {"x": k_in - p["k_deg"] * y["x"] - p["k_bind"] * y["x"] * (p["total"] - y["c"]) + p["k_off"] * y["c"],
                "c": p["k_bind"] * y["x"] * (p["total"] - y["c"]) - p["k_off"] * y["c"]}

    m = ODEModel(name="pe", time_unit="min", vector_field=vf,
                 states=[State("x", "nM", initial=1.0), State("c", "nM", initial=0.5)],
                 parameters=[Parameter("k_prod", "nM/min", dist.LogNormal(0.0, 0.5)),
                             Parameter("k_deg", "1/min", dist.LogNormal(-1.0, 0.5)),
                             Parameter("k_bind", "1/(nM min)", dist.LogNormal(0.0, 0.5)),
                             Parameter("k_off", "1/min", dist.LogNormal(0.0, 0.5)),
                             Parameter("total", "nM", 10.0), Parameter("stim", "1", 2.0),
                             Parameter("sd", "nM", dist.HalfNormal(0.1))],
                 observables=[Observable("x", "x", Normal("sd"))],
                 initial=PreEquilibrated(baseline={"stim": 0.0}))

    def start(k_prod, k_deg):
        vals = {"k_prod": k_prod, "k_deg": k_deg, "k_bind": 1.3, "k_off": 0.7, "total": 10.0, "stim": 2.0, "sd": 0.1}
        y0, ok = m.initial_state(0.0, m.params_view(vals))
        return y0, ok

    y0, ok = start(1.2, 0.4)
    assert bool(ok)
    base = {"k_prod": 1.2, "k_deg": 0.4, "k_bind": 1.3, "k_off": 0.7, "total": 10.0, "stim": 0.0}
    resid = m.rhs(0.0, y0, m.params_view({**base, "sd": 0.1}))
    assert float(jnp.max(jnp.abs(resid))) < 1e-8
    # analytic: x* = k_prod / k_deg; c* = total x / (K + x) with K = k_off / k_bind
    np.testing.assert_allclose(float(y0[0]), 1.2 / 0.4, rtol=1e-10)
    g = jax.jacfwd(lambda a, b: start(a, b)[0], argnums=(0, 1))(1.2, 0.4)
    kd = 0.7 / 1.3
    dx = np.array([1 / 0.4, -1.2 / 0.4**2])
    dc = 10.0 * kd / (kd + 3.0) ** 2 * dx
    np.testing.assert_allclose([float(g[0][0]), float(g[1][0])], dx, rtol=1e-8)
    np.testing.assert_allclose([float(g[0][1]), float(g[1][1])], dc, rtol=1e-8)
    # the solve starts there and relaxes to the stimulated steady state; the gradient of the log
    # density through pre-equilibration + solve matches finite differences
    ts = np.linspace(0.0, 30.0, 7)
    ys, ok = m.solve(m.params_view({**base, "stim": 2.0, "sd": 0.1}), 0.0, jnp.asarray(ts))
    assert bool(ok) and abs(float(ys[-1, 0]) - 3 * 1.2 / 0.4) < 0.05
    data = _problem(m, ts, {"x": np.asarray(ys[:, 0]) + 0.02})
    _grad_check(CustomProblem(model=m, datasets=(data,)), rtol=1e-4)


def test_student_t_and_per_dataset_parameters_have_the_right_shapes():
    lv = lv_model(observables=[Observable("u", "u", StudentT("s", df=5.0)), Observable("v", "v", LogNormal(0.2))])
    t = np.arange(0.0, 6.0)
    ys, _ = lv.solve(lv.params_view(VALUES), 0.0, jnp.asarray(t))
    d1 = _problem(lv, t, {"u": np.asarray(ys[:, 0]), "v": np.asarray(ys[:, 1])}, name="a")
    d2 = _problem(lv, t, {"u": np.asarray(ys[:, 0])}, name="b")
    problem = CustomProblem(model=lv, datasets=(d1, d2), per_dataset=("s",))
    assert [s for s, _, _ in problem.sites()] == ["a__u", "a__v", "b__u"]
    info, potential, _, _ = initialize_model(jax.random.key(0), custom_model, model_args=(problem,))
    assert info.z["s"].shape == (2,)
    assert np.isfinite(float(potential(info.z)))
    with pytest.raises(ModelError, match="per_dataset parameter 'q' is not an estimated parameter"):
        CustomProblem(model=lv, datasets=(d1,), per_dataset=("q",))
    with pytest.raises(ModelError, match="sets constant 'a', which is not a fixed parameter"):
        CustomProblem(model=lv, datasets=(_problem(lv, t, {"u": np.asarray(ys[:, 0])}, constants={"a": 1.0}),))


# ---------------------------------------------------------------------------------------------
# data


@pytest.mark.parametrize("text, message", [
    ("t,u\n0,1\n1,abc\n", "line 3, column 'u': 'abc' is not a number"),
    ("t,u\n0,1\n1,NaN\n", "line 3, column 'u': 'NaN' is not a finite number"),
    ("t,u\n0,1\n2,1\n1,1\n", "line 4, column 't': time 1 is earlier than the time on line 3"),
    ("t,u\n0,1\n0,1\n", "line 3, column 't': time 0 repeats"),
    ("t,u,note\n0,1,x\n", "columns \\['note'\\] are not observables"),
    ("time,u\n0,1\n", "no time column 't'"),
    ("t,u\n0,1\n1,-2\n", "line 3, column 'u': value -2 is not positive, but 'u' has log-normal noise"),
    ("t,u\n0,1\n1,\n", "line 3: the row has a time but no measurement"),
    ("t,w\n0,1\n", "columns \\['w'\\] are not observables"),
])
def test_timeseries_errors_name_file_line_and_fix(tmp_path, text, message):
    path = tmp_path / "series.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=message) as e:
        read_timeseries(path, time_column="t", columns=["u", "v"], positive=["u"])
    assert str(path) in str(e.value) and "Fix:" in str(e.value)


def test_empty_cells_are_missing_measurements(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("t,u,v\n0,1,\n1,,2\n2,3,4\n")
    s = read_timeseries(path, time_column="t", columns=["u", "v"])
    unit, idx, vals = s.observed("u")
    assert unit.tolist() == [0, 0] and idx.tolist() == [0, 2] and vals.tolist() == [1.0, 3.0]


def test_bundled_example_tables_equal_the_shared_validation_sets():
    if not VALIDATION.exists():
        pytest.skip("../shared/validation is not beside this checkout")
    lh = json.loads((VALIDATION / "hudson_lynx_hare.json").read_text())
    s = read_timeseries(EXAMPLES / "lynx_hare" / "lynx_hare.csv", time_column="year", columns=["hare", "lynx"])
    assert s.times.tolist() == [0, *lh["ts"]]
    assert s.values["hare"][0].tolist() == [lh["y_init"][0], *[r[0] for r in lh["y"]]]
    assert s.values["lynx"][0].tolist() == [lh["y_init"][1], *[r[1] for r in lh["y"]]]
    pk = json.loads((VALIDATION / "one_comp_mm_elim_abs.json").read_text())
    s = read_timeseries(EXAMPLES / "pk_mm_elimination" / "concentrations.csv", time_column="time", columns=["C_hat"])
    assert s.times.tolist() == pk["times"] and s.values["C_hat"][0].tolist() == pk["C_hat"]


# ---------------------------------------------------------------------------------------------
# the command line


def _write_config(tmp_path, model_src: str, data: str, extra: str = "") -> Path:
    (tmp_path / "m.py").write_text(textwrap.dedent(model_src))
    (tmp_path / "d.csv").write_text(data)
    cfg = tmp_path / "fit.toml"
    cfg.write_text(f'[model]\nfile = "m.py"\n\n[[datasets]]\nfile = "d.csv"\n{extra}')
    return cfg


MODEL_SRC = """
    import numpyro.distributions as dist
    from models import LogNormal, Observable, ODEModel, Parameter, State

    def vf(t, y, p):
        return {"x": -p["k"] * y["x"]}

    model = ODEModel(name="decay", time_unit="h", vector_field=vf,
                     states=[State("x", "uM", initial="x0")],
                     parameters=[Parameter("k", "1/h", dist.LogNormal(0.0, 1.0)),
                                 Parameter("x0", "uM", dist.LogNormal(2.0, 1.0)),
                                 Parameter("s", "1", dist.HalfNormal(0.5))],
                     observables=[Observable("x", "x", LogNormal("s"), "uM")])
"""


def test_cli_check_reports_a_model_mistake_before_sampling(tmp_path, capsys):
    src = MODEL_SRC.replace('return {"x": -p["k"] * y["x"]}', 'return [-p["k"] * y["x"], 0.0]')
    cfg = _write_config(tmp_path, src, "time,x\n0,7\n1,3\n")
    assert main(["fit", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "returned 2 derivatives, but the model has 1 states (x)" in err
    assert not (tmp_path / "run").exists()


def test_cli_converts_data_time_units(tmp_path, capsys):
    cfg = _write_config(tmp_path, MODEL_SRC, "min,x\n0,7\n60,3\n120,1.2\n", 'time_column = "min"\ntime_unit = "min"\n')
    assert main(["check", str(cfg)]) == 0
    assert "3 times up to 2;" in capsys.readouterr().out  # 120 min = 2 h, the model's unit
    cfg.write_text(cfg.read_text().replace('time_unit = "min"', 'time_unit = "fortnight"'))
    assert main(["check", str(cfg)]) == 2
    assert "unknown time unit 'fortnight'" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["map", "svi"])
def test_cli_approximate_fit_and_simulate_recover_a_decay_rate(tmp_path, capsys, method):
    """simulate -> MAP + Laplace or SVI fit through the command line: the truth lies within 3.3
    sds of the approximation's mean (99.9% two-sided per parameter, so a miss means bias, not bad luck)."""
    cfg = _write_config(tmp_path, MODEL_SRC, "time,x\n" + "".join(f"{t},1\n" for t in np.arange(0, 6.5, 0.5)),
                        f'\n[sampler]\nmethod = "{method}"\nsvi_steps = 1500\n')
    assert main(["simulate", "--config", str(cfg), "--out", str(tmp_path / "sim"), "--param", "k=0.7",
                 "--param", "x0=8", "--param", "s=0.05", "--seed", "3"]) == 0
    (tmp_path / "d.csv").write_text((tmp_path / "sim" / "d.csv").read_text())
    assert main(["fit", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    import pandas as pd

    summary = pd.read_csv(tmp_path / "run" / "summary.csv", index_col=0)
    for name, truth in {"k": 0.7, "x0": 8.0}.items():
        assert abs(summary.loc[name, "mean"] - truth) < 3.3 * summary.loc[name, "sd"], summary
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["method"] == {"map": "laplace", "svi": "svi"}[method] and run["diagnostics"]["map_grad_norm"] < 1e-3
    assert "gate" not in run and "no gate verdict" in capsys.readouterr().out
    if method == "svi":
        assert run["diagnostics"]["svi_steps"] == 1500 and run["diagnostics"]["nonfinite_steps"] == 0
        assert {r["parameter"] for r in run["map_vs_posterior"]} >= {"k", "x0", "s"}


@pytest.mark.slow
@pytest.mark.parametrize("example", ["lynx_hare", "pk_mm_elimination"])
def test_classic_examples_fit_from_their_configs(tmp_path, example):
    """The two worked examples run end to end from their configs and converge by the strict gate;
    each observable's LOO works on the DataTree and the 90% predictive intervals cover most data."""
    import arviz_stats as azs
    import xarray as xr

    out = tmp_path / example
    assert main(["fit", str(EXAMPLES / example / "fit.toml"), "--out", str(out), "--no-progress"]) == 0
    diag = json.loads((out / "run.json").read_text())["diagnostics"]
    assert diag["max_r_hat"] < 1.01 and diag["min_ess_bulk"] > 400 and diag["min_ess_tail"] > 400, diag
    assert diag["divergences"] == 0 and diag["draws_with_solver_failures"] == 0, diag
    tree = xr.open_datatree(out / "posterior.nc", engine="h5netcdf")
    inside = total = 0
    for name in tree["observed_data"].data_vars:
        with warnings.catch_warnings():  # a high Pareto k for an influential point is a finding, not a failure
            warnings.filterwarnings("ignore", message="Estimated shape parameter of Pareto")
            elpd = azs.loo(tree, var_name=name)
        assert np.isfinite(elpd.elpd)
        y = np.asarray(tree["observed_data"][name])
        q = np.quantile(np.asarray(tree["posterior_predictive"][name]).reshape(-1, y.size), [0.05, 0.95], axis=0)
        inside += int(((y >= q[0]) & (y <= q[1])).sum())
        total += y.size
    assert inside >= 0.75 * total, (inside, total)
    for name in ("summary.csv", "fit.png", "rank.png", "trace.png"):
        assert (out / name).stat().st_size > 0


# ---------------------------------------------------------------------------------------------
# several units (cells, samples) per data set: long tables, batched solves, per-unit parameters


def decay_model(**overrides):
    kw = dict(name="decay", time_unit="h", vector_field=lambda t, y, p: {"x": -p["k"] * y["x"]},
              states=[State("x", "uM", initial="x0")],
              parameters=[Parameter("k", "1/h", dist.LogNormal(0.0, 1.0)), Parameter("x0", "uM", dist.LogNormal(2.0, 1.0)),
                          Parameter("s", "1", dist.HalfNormal(0.5))],
              observables=[Observable("x", "x", LogNormal("s"), "uM")])
    kw.update(overrides)
    return ODEModel(**kw)


def test_long_table_with_units_reads_each_units_own_times(tmp_path):
    path = tmp_path / "cells.csv"
    path.write_text("cell,t,u\nA,0,1\nA,1,2\nB,0.5,3\nB,1,4\nB,2,5\n")
    s = read_timeseries(path, time_column="t", columns=["u"], unit_column="cell")
    assert s.units == ("A", "B") and s.times.tolist() == [0.0, 0.5, 1.0, 2.0]
    unit, idx, vals = s.observed("u")
    assert unit.tolist() == [0, 0, 1, 1, 1] and idx.tolist() == [0, 2, 1, 2, 3] and vals.tolist() == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("text, message", [
    ("cell,t,u\nA,0,1\nA,0,2\n", "line 3, column 't': time 0 of unit 'A' repeats the time on line 2"),
    ("cell,t,u\nA,1,1\nB,0,1\nA,0,2\n", "line 4, column 't': time 0 of unit 'A' is earlier than the time on line 2"),
    ("cell,t,u\nA,0,1\n,1,2\n", "line 3, column 'cell': the unit label is empty"),
    ("sample,t,u\nA,0,1\n", "no unit column 'cell'"),
])
def test_long_table_errors_name_file_line_and_unit(tmp_path, text, message):
    path = tmp_path / "cells.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=message) as e:
        read_timeseries(path, time_column="t", columns=["u"], unit_column="cell")
    assert str(path) in str(e.value) and "Fix:" in str(e.value)


def test_batched_rows_equal_single_solves_and_fail_independently():
    """One vmapped solve of several rows gives each row's own solution; a row that exceeds the
    step bound fails alone, with finite placeholders, and does not change the others."""
    from models import ODESolver

    lv = lv_model()
    ts = np.arange(0.0, 11.0)
    rows = [dict(VALUES), {**VALUES, "a": 0.8, "u0": 20.0}, {**VALUES, "c": 1.3}]
    values = {n: np.array([r[n] for r in rows]) for n in VALUES}
    ys, ok = lv.solve_batch(values, np.zeros(3), np.tile(ts, (3, 1)))
    assert np.asarray(ok).all()
    for r, row in enumerate(rows):
        y1, ok1 = lv.solve(lv.params_view(row), 0.0, jnp.asarray(ts))
        np.testing.assert_allclose(np.asarray(ys[r]), np.asarray(y1), rtol=1e-10)
    # the middle row is made to need thousands of steps (a fast oscillation): with a bound of 200 it fails alone
    stiff = {n: v.copy() for n, v in values.items()}
    stiff["a"][1], stiff["c"][1] = 300.0, 300.0
    ys2, ok2 = lv.solve_batch(stiff, np.zeros(3), np.tile(ts, (3, 1)), ODESolver("tsit5", rtol=1e-8, atol=1e-10, max_steps=200))
    assert np.asarray(ok2).tolist() == [True, False, True]
    assert np.isfinite(np.asarray(ys2)).all()
    np.testing.assert_array_equal(np.asarray(ys2)[[0, 2]], np.asarray(ys)[[0, 2]])


def _unit_problem(centered=False, num_units=5, seed=0, solver=None):
    m = decay_model()
    rng = np.random.default_rng(seed)
    ts = np.array([0.0, 0.5, 1.0, 2.0, 3.0, 4.0])
    k = 0.7 * np.exp(0.3 * rng.normal(size=num_units))
    x = 8.0 * np.exp(-np.outer(k, ts)) * np.exp(0.05 * rng.normal(size=(num_units, ts.size)))
    data = _problem(m, ts, {"x": x}, units=tuple(f"cell{i}" for i in range(num_units)))
    return CustomProblem(model=m, datasets=(data,), per_unit=("k",), centered=centered, solver=solver), k


@pytest.mark.parametrize("centered", [False, True])
def test_per_unit_parameters_sites_and_gradients(centered):
    from models import ODESolver

    # tight tolerances: central differences with h = 1e-6 amplify solver error by 1e6
    problem, _ = _unit_problem(centered, solver=ODESolver("tsit5", rtol=1e-12, atol=1e-12))
    assert problem.summary_names() == ["k", "x0", "s", "k_sd"]
    info, potential, _, _ = initialize_model(jax.random.key(0), custom_model, model_args=(problem,))
    assert info.z["k_unit" if centered else "k_z"].shape == (5,) and info.z["k_sd"].shape == ()
    # at the prior medians (a random start can put the potential at ~1e9, where central differences lose digits)
    _grad_check(problem, rtol=1e-5, init_strategy=init_to_median(num_samples=15))


def test_per_unit_mistakes_are_named():
    problem, _ = _unit_problem()
    with pytest.raises(ModelError, match="per_unit parameter 'q' is not an estimated parameter"):
        CustomProblem(model=problem.model, datasets=problem.datasets, per_unit=("q",))
    m = decay_model(parameters=[Parameter("k", "1/h", dist.Uniform(0.0, 2.0)), *decay_model().parameters[1:]])
    with pytest.raises(ModelError, match="per_unit parameter 'k' has a prior with support"):
        CustomProblem(model=m, datasets=problem.datasets, per_unit=("k",))
    single = _problem(problem.model, [0.0, 1.0], {"x": [1.0, 0.5]})
    with pytest.raises(ModelError, match="need a data set with units"):
        CustomProblem(model=problem.model, datasets=(single,), per_unit=("k",))


def test_per_unit_fit_recovers_each_units_rate():
    """NUTS on five simulated cells with their own decay rates: every cell's 90% interval holds
    its true rate (simultaneous over the cells at 98%: 90% marginals of five would miss by chance
    about 41% of the time), and failed solves are rare: they occur only inside divergent
    transitions (counted by replay) and in at most 1% of draws (the gate's default)."""
    from inference._custom import run_custom
    from inference._fit import SamplerConfig

    problem, k_true = _unit_problem(num_units=5, seed=1)
    fit = run_custom(problem, SamplerConfig(num_warmup=300, num_samples=400, adapt_mass_matrix=True),
                     key=jax.random.key(2), progress_bar=False)
    tree = fit.tree
    units = np.asarray(tree["posterior"]["k_unit"]).reshape(-1, 5)
    lo, hi = np.quantile(units, [0.01 / 5 * 10 / 2, 1 - 0.01 / 5 * 10 / 2], axis=0)
    assert ((lo <= k_true) & (k_true <= hi)).all(), (lo, k_true, hi)
    assert list(tree["posterior"]["k_unit"].coords["unit"].values) == [f"cell{i}" for i in range(5)]
    failures = tree["sample_stats"]["solver_failures"].values
    diverging = tree["sample_stats"]["diverging"].values
    assert (failures[~diverging] == 0).all() and (failures > 0).mean() <= 0.01, failures.sum()
    assert np.isfinite(units).all()
    assert tree["constant_data"]["x_unit"].shape == tree["observed_data"]["x"].shape


def test_cli_simulate_and_fit_a_long_table_with_units(tmp_path, capsys):
    """simulate writes a long table per unit from --param values (population and unit sd);
    check and a MAP fit read it back through unit_column."""
    rows = "".join(f"{c},{t},1\n" for c in ("c1", "c2", "c3") for t in (0, 1, 2, 3))
    cfg = _write_config(tmp_path, MODEL_SRC, "cell,time,x\n" + rows,
                        'unit_column = "cell"\n\n[sampler]\nmethod = "map"\n')
    cfg.write_text(cfg.read_text().replace('file = "m.py"', 'file = "m.py"\nper_unit = ["k"]'))
    assert main(["simulate", "--config", str(cfg), "--out", str(tmp_path / "sim"), "--param", "k=0.5",
                 "--param", "k_sd=0.4", "--param", "s=0.05", "--seed", "1"]) == 0
    truth = json.loads((tmp_path / "sim" / "truth.json").read_text())
    assert sorted(truth["units"]["k"]) == ["c1", "c2", "c3"]
    text = (tmp_path / "sim" / "d.csv").read_text()
    assert text.splitlines()[0] == "cell,time,x" and len(text.splitlines()) == 13
    (tmp_path / "d.csv").write_text(text)
    assert main(["check", str(cfg)]) == 0
    assert "3 units" in capsys.readouterr().out
    assert main(["fit", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    import xarray as xr

    tree = xr.open_datatree(tmp_path / "run" / "posterior.nc", engine="h5netcdf")
    assert tree["posterior"]["k_unit"].sizes["unit"] == 3

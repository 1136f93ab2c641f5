"""Run directories: the diagnostics gate, provenance, --from-run, checkpoint/resume, atomic results."""

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from test_custom_model import MODEL_SRC  # x' = -k x, estimated x0, log-normal sd

from inference._cli import main
from inference._gate import EXIT_NOT_CONVERGED, GateThresholds, gate


ROOT = Path(__file__).resolve().parents[1]

# x(t) = 8 exp(-0.7 t) with 5% log-normal noise (fixed draws, seed 3)
DATA = "time,x\n" + "".join(
    f"{t:g},{8 * np.exp(-0.7 * t) * np.exp(0.05 * e):.6g}\n"
    for t, e in zip(np.arange(0, 6.5, 0.5), np.random.default_rng(3).normal(size=13)))


def _config(tmp_path, sampler: str, output: str = "") -> Path:
    (tmp_path / "m.py").write_text(textwrap.dedent(MODEL_SRC))
    (tmp_path / "d.csv").write_text(DATA)
    cfg = tmp_path / "fit.toml"
    cfg.write_text(f'seed = 5\n\n[model]\nfile = "m.py"\n\n[[datasets]]\nfile = "d.csv"\n\n[sampler]\n{sampler}\n'
                   f'\n[output]\n{output}\n')
    return cfg


def _posterior(run_dir: Path) -> dict:
    with xr.open_datatree(run_dir / "posterior.nc", engine="h5netcdf") as tree:
        return {k: tree["posterior"][k].values.copy() for k in tree["posterior"].data_vars}


# ---------------------------------------------------------------------------------------------
# the gate


def _tree(post: dict, *, diverging=None, energy=None, depth=None, failures=None):
    shape = next(iter(post.values())).shape
    rng = np.random.default_rng(0)
    stats = {"diverging": np.zeros(shape, bool) if diverging is None else diverging,
             "energy": rng.normal(size=shape) if energy is None else energy,
             "reached_max_tree_depth": np.zeros(shape, bool) if depth is None else depth,
             "solver_failures": np.zeros(shape, int) if failures is None else failures}
    dims = ["chain", "draw"]
    return xr.DataTree.from_dict({
        "posterior": xr.Dataset({k: (dims, v) for k, v in post.items()}),
        "sample_stats": xr.Dataset({k: (dims, v) for k, v in stats.items()}),
    })


def test_gate_checks_each_diagnostic_against_its_threshold():
    rng = np.random.default_rng(1)
    good = {"a": rng.normal(size=(4, 1000)), "b": rng.normal(size=(4, 1000))}
    ok = gate(_tree(good), ["a", "b"])
    assert ok["verdict"] == "converged" and ok["failed"] == [] and ok["warnings"] == []
    # one chain elsewhere: R-hat fails
    shifted = {"a": good["a"] + np.array([0, 0, 0, 3.0])[:, None], "b": good["b"]}
    assert "r_hat" in gate(_tree(shifted), ["a", "b"])["failed"]
    # strongly autocorrelated draws: ESS fails
    walk = {"a": np.cumsum(rng.normal(size=(4, 1000)), axis=1) * 0.01 + good["a"] * 0.001, "b": good["b"]}
    assert {"ess_bulk", "ess_tail"} <= set(gate(_tree(walk), ["a", "b"])["failed"])
    # one divergence fails by default; a per-run threshold can allow it
    div = np.zeros((4, 1000), bool)
    div[2, 10] = True
    assert gate(_tree(good, diverging=div), ["a"])["failed"] == ["divergences"]
    assert gate(_tree(good, diverging=div), ["a"], GateThresholds(max_divergences=1))["verdict"] == "converged"
    # energy as a slow random walk: E-BFMI far below 0.2
    slow = np.cumsum(rng.normal(size=(4, 1000)), axis=1)
    res = gate(_tree(good, energy=slow), ["a"])
    assert res["failed"] == ["bfmi"] and [c for c in res["checks"] if c["check"] == "bfmi"][0]["value"] < 0.2
    # tree depth saturation only warns; a few solver failures warn, many fail
    depth = np.ones((4, 1000), bool)
    res = gate(_tree(good, depth=depth), ["a"])
    assert res["verdict"] == "converged" and res["warnings"] == ["tree_depth"]
    few = np.zeros((4, 1000), int)
    few[0, :5] = 2
    assert gate(_tree(good, failures=few), ["a"])["warnings"] == ["solver_failures"]
    many = np.zeros((4, 1000), int)
    many[:, :100] = 1
    assert gate(_tree(good, failures=many), ["a"])["failed"] == ["solver_failures"]


def test_gate_flags_an_under_warmed_run_and_passes_a_good_one(tmp_path, capsys):
    """Through ``zinckin fit``: 3 warmup iterations and 60 draws -> exit status 3 and a stored
    'not converged' verdict; 300 + 1000 -> exit status 0, 'converged'."""
    bad = _config(tmp_path, "num_warmup = 3\nnum_samples = 60\nnum_chains = 2")
    assert main(["fit", str(bad), "--out", str(tmp_path / "bad"), "--no-progress"]) == EXIT_NOT_CONVERGED
    out = capsys.readouterr().out
    assert "NOT CONVERGED" in out
    record = json.loads((tmp_path / "bad" / "run.json").read_text())
    assert record["gate"]["verdict"] == "not converged" and "ess_bulk" in record["gate"]["failed"]
    good = _config(tmp_path, "num_warmup = 300\nnum_samples = 1000\nnum_chains = 2")
    assert main(["fit", str(good), "--out", str(tmp_path / "good"), "--no-progress"]) == 0
    record = json.loads((tmp_path / "good" / "run.json").read_text())
    assert record["gate"]["verdict"] == "converged", record["gate"]
    # the MAP the chains started from sits within the bulk of this near-Gaussian posterior
    rows = {r["parameter"]: r for r in record["map_vs_posterior"]}
    assert set(rows) == {"k", "x0", "s"}
    assert abs(rows["k"]["z_score"]) < 1 and abs(rows["x0"]["z_score"]) < 1, rows
    assert "converged: every check of the gate passed" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# provenance and --from-run


def test_run_records_provenance_and_from_run_reproduces_the_draws(tmp_path, capsys):
    cfg = _config(tmp_path, "num_warmup = 100\nnum_samples = 200\nnum_chains = 2", "checkpoint_every = 80")
    run = tmp_path / "run"
    assert main(["fit", str(cfg), "--out", str(run), "--no-progress"]) in (0, EXIT_NOT_CONVERGED)
    prov = json.loads((run / "run.json").read_text())["provenance"]
    assert (run / "config.toml").read_text() == cfg.read_text()
    assert not (run / "checkpoint.pkl").exists()
    import hashlib

    for key, name in (("model.file", "m.py"), ("datasets[0].file", "d.csv")):
        assert prov["inputs"][key]["sha256"] == hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
    for pkg in ("python", "jax", "jaxlib", "numpyro", "diffrax", "equinox", "optax", "arviz"):
        assert prov["versions"][pkg], pkg
    assert prov["precision"] == "float64" and prov["seed"] == 5 and prov["devices"]["platform"] == "cpu"
    assert prov["git"]["commit"] is None or len(prov["git"]["commit"]) == 40
    assert set(prov["wall_seconds"]) >= {"load", "fit", "write", "total"}
    assert prov["resolved_config"]["sampler"]["num_samples"] == 200
    # the stored run reproduces itself, draw for draw
    assert main(["fit", "--from-run", str(run), "--out", str(tmp_path / "again"), "--no-progress"]) in (0, EXIT_NOT_CONVERGED)
    a, b = _posterior(run), _posterior(tmp_path / "again")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    # an input that changed since is named, and nothing is fitted
    (tmp_path / "d.csv").write_text(DATA.replace("time,x", "time,x ").replace("\n0,", "\n0.0,"))
    capsys.readouterr()
    assert main(["fit", "--from-run", str(run), "--out", str(tmp_path / "third"), "--no-progress"]) == 2
    assert "d.csv (datasets[0].file) changed since the run" in capsys.readouterr().err
    assert not (tmp_path / "third").exists()


def test_fit_refuses_to_start_over_an_unfinished_run(tmp_path, capsys):
    cfg = _config(tmp_path, "num_warmup = 10\nnum_samples = 10\nnum_chains = 1")
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pkl").write_bytes(pickle.dumps({"format": 1}))
    assert main(["fit", str(cfg), "--out", str(run)]) == 2
    assert f"zinckin fit --resume {run}" in capsys.readouterr().err
    assert main(["fit", "--resume", str(tmp_path / "nothing")]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert main(["fit", str(cfg), "--resume", str(run)]) == 2
    assert "exactly one of CONFIG, --resume RUN_DIR or --from-run RUN_DIR" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# killed processes


def _zinckin(*args) -> list[str]:
    return [sys.executable, "-c", "from inference._cli import entry; entry()", *args]


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_ENABLE_X64="1")
    env.pop("XLA_FLAGS", None)
    return env


def test_sigkill_mid_sampling_then_resume_gives_the_uninterrupted_draws(tmp_path):
    """A fit killed (SIGKILL) after its second checkpoint and resumed with ``--resume`` ends with
    draws bit-identical to the same fit run without interruption."""
    cfg = _config(tmp_path, "num_warmup = 100\nnum_samples = 400\nnum_chains = 2", "checkpoint_every = 50")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    res = subprocess.run(_zinckin("fit", str(cfg), "--out", str(whole), "--no-progress"), cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=900)
    assert res.returncode in (0, EXIT_NOT_CONVERGED), res.stderr
    proc = subprocess.Popen(_zinckin("fit", str(cfg), "--out", str(cut), "--no-progress"), cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ck, done = cut / "checkpoint.pkl", 0
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and proc.poll() is None:
        if ck.exists():
            done = pickle.loads(ck.read_bytes())["num_done"]
            if done >= 100:
                break
        time.sleep(0.02)
    assert proc.poll() is None, "the fit finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cut / "posterior.nc").exists() and 100 <= pickle.loads(ck.read_bytes())["num_done"] < 400
    res = subprocess.run(_zinckin("fit", "--resume", str(cut), "--no-progress"), cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=900)
    assert res.returncode in (0, EXIT_NOT_CONVERGED), res.stderr
    assert "resuming the fit" in res.stdout
    a, b = _posterior(whole), _posterior(cut)
    assert a.keys() == b.keys() and a["k"].shape == (2, 400)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert json.loads((cut / "run.json").read_text())["provenance"]["resumed"] is True


WRITER = """
import sys, time, numpy as np, xarray as xr
from pathlib import Path
from inference._output import write_tree

real = xr.DataTree.to_netcdf
def slow_disk(self, *args, **kwargs):  # the netCDF is written in full, then the "disk" takes a second
    real(self, *args, **kwargs)
    time.sleep(1.0)
xr.DataTree.to_netcdf = slow_disk
value = float(sys.argv[2])
tree = xr.DataTree.from_dict({"posterior": xr.Dataset({"x": (("chain", "draw", "cell"), np.full((4, 500, 500), value))})})
print("writing", flush=True)
write_tree(tree, Path(sys.argv[1]))
print("done", flush=True)
time.sleep(30)
"""


def test_kill_while_writing_results_leaves_the_old_or_the_new_file(tmp_path):
    """SIGKILL at several moments while posterior.nc is being replaced (the write made slow so
    that kills land inside it): the file under the final name is always a complete tree, the old
    one or the new one, and kills before the rename leave the old one."""
    path = tmp_path / "posterior.nc"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)

    def write(value, delay=None):
        proc = subprocess.Popen([sys.executable, str(script), str(path), str(value)], cwd=ROOT, env=_env(),
                                stdout=subprocess.PIPE, text=True)
        with proc.stdout:
            assert proc.stdout.readline().strip() == "writing"
            if delay is None:
                assert proc.stdout.readline().strip() == "done"
            else:
                time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    write(1)
    seen = []
    for delay in (0.0, 0.3, 0.7, 3.0):
        write(2, delay)
        with xr.open_datatree(path, engine="h5netcdf") as tree:
            x = tree["posterior"]["x"].values
        assert x.shape == (4, 500, 500)
        values = set(np.unique(x).tolist())
        assert values in ({1.0}, {2.0}), values
        seen.append(values.pop())
        if seen[-1] == 2.0:  # put the old file back for the next round
            write(1)
    assert seen[0] == 1.0 and seen[-1] == 2.0, seen  # killed inside the write: old file; after it: new


# ---------------------------------------------------------------------------------------------
# solver failures inside sampling

BLOWUP_SRC = """
    import numpyro.distributions as dist
    from models import LogNormal, Observable, ODEModel, ODESolver, Parameter, State

    def vf(t, y, p):  # x = 1 / (1 - a t): blows up at t = 1/a
        return {"x": p["a"] * y["x"] ** 2}

    model = ODEModel(name="blowup", time_unit="h", vector_field=vf,
                     states=[State("x", "1", initial=1.0)],
                     parameters=[Parameter("a", "1/h", dist.LogNormal(-0.7, 0.5)),
                                 Parameter("s", "1", dist.HalfNormal(0.5))],
                     observables=[Observable("x", "x", LogNormal("s"), "1")],
                     solver=ODESolver(method="tsit5", rtol=1e-6, atol=1e-9, max_steps=256))
"""


def test_solver_failures_inside_nuts_are_counted_and_the_run_completes(tmp_path):
    """Four cells of x' = a_cell x^2, observed to t = 0.9 h; cells whose proposed a_cell exceeds
    1/0.9 blow up (non-finite state or max_steps) inside NUTS trajectories. The run completes,
    every draw is finite, and the failed solves are counted per draw in sample_stats (replayed
    divergent transitions) and reported by the gate."""
    from inference._config import load_config
    from inference._custom import load_custom, run_custom
    from inference._fit import SamplerConfig

    (tmp_path / "m.py").write_text(textwrap.dedent(BLOWUP_SRC))
    rng = np.random.default_rng(0)
    rows = []
    for cell, a in zip("ABCD", (0.3, 0.5, 0.8, 1.05)):
        for t in np.arange(0.0, 0.95, 0.1):
            rows.append(f"{cell},{t:.1f},{np.exp(0.3 * rng.normal()) / (1 - a * t):.6g}\n")
    (tmp_path / "d.csv").write_text("cell,time,x\n" + "".join(rows))
    cfg = tmp_path / "fit.toml"
    cfg.write_text('[model]\nfile = "m.py"\nper_unit = ["a"]\n\n[[datasets]]\nfile = "d.csv"\nunit_column = "cell"\n')
    config, base = load_config(cfg)
    problem = load_custom(config, base)
    import jax

    fit = run_custom(problem, SamplerConfig(num_warmup=200, num_samples=300, num_chains=2),
                     key=jax.random.key(3), progress_bar=False)
    tree = fit.tree
    failures = tree["sample_stats"]["solver_failures"].values
    assert failures.shape == (2, 300)
    for name in tree["posterior"].data_vars:
        assert np.isfinite(tree["posterior"][name].values).all(), name
    diverging = tree["sample_stats"]["diverging"].values
    assert failures.sum() > 0 and diverging.sum() > 0
    assert (failures[~diverging] == 0).all()  # a failure always ends its trajectory as a divergence
    res = gate(tree, problem.summary_names())
    check = [c for c in res["checks"] if c["check"] == "solver_failures"][0]
    assert check["value"] == pytest.approx((failures > 0).mean()) and check["status"] in ("warn", "fail")


def test_an_empty_cache_setting_turns_the_persistent_compilation_cache_off(monkeypatch, tmp_path):
    """``ZINCKIN_COMPILATION_CACHE=""`` and ``compilation_cache_dir = ""`` both mean no persistent
    cache (the benchmark's cold compile timing relies on it); a path turns it on there."""
    import jax

    from inference._cli import _compilation_cache
    from inference._config import RuntimeSection

    saved = jax.config.jax_compilation_cache_dir
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        monkeypatch.setenv("ZINCKIN_COMPILATION_CACHE", "")
        assert _compilation_cache(RuntimeSection()) is None
        assert jax.config.jax_compilation_cache_dir is None
        monkeypatch.delenv("ZINCKIN_COMPILATION_CACHE")
        assert _compilation_cache(RuntimeSection(compilation_cache_dir="")) is None
        assert jax.config.jax_compilation_cache_dir is None
        monkeypatch.setenv("ZINCKIN_COMPILATION_CACHE", str(tmp_path / "cache"))
        assert _compilation_cache(RuntimeSection()) == str(tmp_path / "cache")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cache")
    finally:
        jax.config.update("jax_compilation_cache_dir", saved)

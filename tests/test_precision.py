"""float32 opt-in (``[runtime] precision = "float32"``): its error against float64, its warnings.

jax's precision is process-wide, so every float32 computation here runs in a subprocess.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from test_custom_model import MODEL_SRC  # x' = -k x, estimated x0, log-normal sd

from inference._cli import FLOAT32_MIN_RTOL, precision_warnings


ROOT = Path(__file__).resolve().parents[1]

# The bundled imaging example (12 cells x 121 frames): trajectories, log density and gradient at
# a fixed point in unconstrained space (the float64 run's prior-median start, passed on to the
# float32 run), each printed as JSON.
_EXAMPLE_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_enable_x64", sys.argv[1] == "float64")
    import jax.numpy as jnp
    import numpy as np
    from jax.flatten_util import ravel_pytree
    from numpyro.infer import init_to_median
    from numpyro.infer.util import constrain_fn, initialize_model
    from data import EXAMPLE_DIR, load_imaging
    from inference._fit import build_problem
    from inference._model import default_plan, imaging_model
    from models import SolverConfig

    ds = load_imaging(EXAMPLE_DIR / "traces.csv", EXAMPLE_DIR / "protocol.toml")
    plan = default_plan(probe_kd_nM=ds.protocol.probe_kd_nM)
    point = json.loads(sys.stdin.read() or "null")
    for rtol in sys.argv[3:]:
        problem = build_problem(ds, SolverConfig(rtol=float(rtol), atol=float(sys.argv[2]), max_steps=100_000))
        info, pot, _, _ = initialize_model(jax.random.key(0), imaging_model, model_args=(problem, plan),
                                           init_strategy=init_to_median(num_samples=15))
        flat, unravel = ravel_pytree(info.z)
        flat = jnp.asarray(point if point is not None else flat, dtype=flat.dtype)
        value, grad = jax.jit(jax.value_and_grad(lambda x: pot(unravel(x))))(flat)
        det = constrain_fn(imaging_model, (problem, plan), {}, unravel(flat), return_deterministic=True)
        print(json.dumps({"rtol": float(rtol), "dtype": str(value.dtype), "flat": np.asarray(flat, dtype=float).tolist(),
                          "potential": float(value), "grad": np.asarray(grad, dtype=float).tolist(),
                          "zc": np.asarray(det["zc_nM"], dtype=float).tolist(),
                          "failures": int(det["solver_failures"])}), flush=True)
""")


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("XLA_FLAGS", None)
    env.pop("JAX_ENABLE_X64", None)
    return env


def _example(precision, atol, rtols, point=None) -> dict:
    res = subprocess.run([sys.executable, "-c", _EXAMPLE_SCRIPT, precision, str(atol), *map(str, rtols)], cwd=ROOT,
                         env=_env(), input=json.dumps(point), capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    runs = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    return {r["rtol"]: r for r in runs}


@pytest.mark.slow
def test_float32_error_against_float64_on_the_example():
    """float32 against a float64 reference (rtol 1e-10), at the same point: at rtol 1e-5 and 1e-6,
    free zinc within 0.5% everywhere, log density to 1e-4 relative, gradient to 1e-4 (relative
    norm). The figures are printed (docs/inference.md, "Precision")."""
    ref = _example("float64", 1e-13, [1e-10])[1e-10]
    runs = _example("float32", 1e-6, [1e-5, 1e-6, 1e-7], point=ref["flat"])
    zr, gr = np.asarray(ref["zc"]), np.asarray(ref["grad"])
    errors = {}
    for rtol, run in runs.items():
        assert run["dtype"] == "float32" and ref["dtype"] == "float64"
        errors[rtol] = {
            "failed_cells": run["failures"],
            "zc_max_rel": float(np.max(np.abs(np.asarray(run["zc"]) - zr) / np.abs(zr))),
            "potential_rel": abs(run["potential"] - ref["potential"]) / abs(ref["potential"]),
            "potential_abs": abs(run["potential"] - ref["potential"]),
            "grad_rel_norm": float(np.linalg.norm(np.asarray(run["grad"]) - gr) / np.linalg.norm(gr)),
        }
    print(json.dumps(errors, indent=1))
    for rtol in (1e-5, 1e-6):
        e = errors[rtol]
        assert e["failed_cells"] == 0 and e["zc_max_rel"] < 5e-3 and e["potential_rel"] < 1e-4, (rtol, e)
        assert e["grad_rel_norm"] < 1e-4, (rtol, e)


def test_precision_warnings_name_each_unsafe_setting():
    assert precision_warnings("float64", method="nuts", rtol=1e-8, implicit=True, newton_tol=1e-12) == []
    assert precision_warnings("float32", method="map", rtol=FLOAT32_MIN_RTOL) == []
    w = precision_warnings("float32", method="nuts", rtol=1e-7, implicit=True, newton_tol=1e-9)
    assert len(w) == 4
    assert "NUTS" in w[0] and "rtol 1e-07" in w[1] and "implicit solver" in w[2] and "tol 1e-09" in w[3]


def test_float32_fit_through_the_cli_warns_records_and_recovers(tmp_path):
    """A float32 MAP fit of a decay (truth k = 0.7, x0 = 8): float32 draws, the rtol warning printed
    and stored in run.json, precision float32 in the provenance, the truth within 3.3 sds."""
    rng = np.random.default_rng(5)
    t = np.arange(0.0, 6.5, 0.5)
    x = 8.0 * np.exp(-0.7 * t) * np.exp(0.05 * rng.standard_normal(t.size))
    (tmp_path / "m.py").write_text(textwrap.dedent(MODEL_SRC))
    (tmp_path / "d.csv").write_text("time,x\n" + "".join(f"{a},{b:.6g}\n" for a, b in zip(t, x)))
    cfg = tmp_path / "fit.toml"
    cfg.write_text('[model]\nfile = "m.py"\n\n[[datasets]]\nfile = "d.csv"\n\n[solver]\nmethod = "tsit5"\nrtol = 1e-7\n'
                   '\n[sampler]\nmethod = "map"\n\n[runtime]\nprecision = "float32"\n')
    res = subprocess.run([sys.executable, "-c", "from inference._cli import entry; entry()", "fit", str(cfg), "--out",
                          str(tmp_path / "run"), "--no-progress"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "warning: float32 with solver rtol 1e-07" in res.stderr
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["provenance"]["precision"] == "float32"
    assert len(run["warnings"]) == 1 and "rtol" in run["warnings"][0]
    tree = xr.open_datatree(tmp_path / "run" / "posterior.nc", engine="h5netcdf")
    post = tree["posterior"]
    assert post["k"].dtype == np.float32
    for name, truth in {"k": 0.7, "x0": 8.0}.items():
        assert abs(float(post[name].mean()) - truth) < 3.3 * float(post[name].std()), (name, float(post[name].mean()))

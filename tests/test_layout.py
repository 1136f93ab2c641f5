"""The two layouts of batched solves (models.ODESolver.layout): one vmapped solve per row, or all
rows as one system with shared steps and per-row error control."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.infer.util import initialize_model
from reference import solve_full_reference
from test_dynamics import PARAM_SETS, TS, _as_dict

import models as m
from inference._model import ImagingProblem, imaging_model
from inference._simulate import SimulationSettings, simulate_imaging


def _rows(protocol):
    values = [{**_as_dict(m.default_params(**PARAM_SETS[name])), "sigma_zc": 0.1} for name in PARAM_SETS]
    return {k: jnp.asarray([v[k] for v in values]) for k in values[0]}


def _solve(protocol, values, layout, rtol, atol, t0=None, block_rows=None):
    model = m.flux_model(protocol)
    n = len(values["zc_rest_nM"])
    solver = m.ODESolver("tsit5", rtol=rtol, atol=atol, max_steps=50_000, dt0=1e-3, dtmax=1.0, layout=layout,
                         block_rows=block_rows)
    t0 = jnp.zeros(n) if t0 is None else t0
    return jax.jit(lambda v, t0: model.solve_batch(v, t0, jnp.broadcast_to(jnp.asarray(TS), (n, TS.size)), solver))(values, t0)


def test_system_layout_matches_radau_and_is_as_accurate_as_rows(example_protocol):
    """The three parameter sets of test_dynamics as three rows of one system. Tight tolerance:
    every row equals the full-equation Radau solution in the fast-binding limit (as the rows
    layout does in test_dynamics). At the fit's tolerance (1e-6 / 1e-9), each row's error
    against that reference is no larger than under the rows layout, with a factor 3 allowed for
    the different step sequences: the shared step is never longer than the row's own error
    control allows."""
    values = _rows(example_protocol)
    refs = np.stack([np.log(solve_full_reference(_as_dict(m.default_params(**PARAM_SETS[name])), example_protocol.start_min,
                                                 example_protocol.kind, example_protocol.zn_ext_uM, TS, kon=6e5)[0])
                     for name in PARAM_SETS])
    ys, ok = _solve(example_protocol, values, "system", 1e-10, 1e-13)
    assert bool(np.all(ok))
    np.testing.assert_allclose(np.exp(np.asarray(ys[..., 0])), np.exp(refs), rtol=1e-5)
    errors = {}
    for layout in ("rows", "system"):
        ys, ok = _solve(example_protocol, values, layout, 1e-6, 1e-9)
        assert bool(np.all(ok))
        errors[layout] = np.max(np.abs(np.asarray(ys[..., 0]) - refs), axis=1)
    assert np.all(errors["system"] <= 3 * errors["rows"]), errors


def test_rows_of_a_system_must_share_their_start(example_protocol):
    """The system layout integrates all rows from one start: rows that start elsewhere are not
    silently solved from the wrong time, the solve fails (counted, not raised)."""
    values = _rows(example_protocol)
    _, ok = _solve(example_protocol, values, "system", 1e-6, 1e-9, t0=jnp.asarray([0.0, 0.0, 0.5]))
    assert not bool(np.any(ok))
    with pytest.raises(m.ModelError, match="layout"):
        m.ODESolver(layout="columns")


def test_system_in_blocks_matches_radau_and_a_failed_block_fails_alone(example_protocol):
    """Five rows (the three parameter sets, then the first two again) in blocks of two: three
    systems, the last padded. At tight tolerance every row equals Radau; at the fit's tolerance
    each row's error stays within 3x that of the rows layout. A row that starts elsewhere fails
    its own block only (rows 4 and its padding), and the other blocks are solved as before."""
    three = _rows(example_protocol)
    values = {k: jnp.concatenate([v, v[:2]]) for k, v in three.items()}
    refs = np.stack([np.log(solve_full_reference(_as_dict(m.default_params(**PARAM_SETS[name])), example_protocol.start_min,
                                                 example_protocol.kind, example_protocol.zn_ext_uM, TS, kon=6e5)[0])
                     for name in PARAM_SETS])
    refs = np.concatenate([refs, refs[:2]])
    ys, ok = _solve(example_protocol, values, "system", 1e-10, 1e-13, block_rows=2)
    assert ys.shape == (5, TS.size, 2) and bool(np.all(ok))
    np.testing.assert_allclose(np.exp(np.asarray(ys[..., 0])), np.exp(refs), rtol=1e-5)
    rows, _ = _solve(example_protocol, values, "rows", 1e-6, 1e-9)
    blocked, ok = _solve(example_protocol, values, "system", 1e-6, 1e-9, block_rows=2)
    assert bool(np.all(ok))
    err_rows = np.max(np.abs(np.asarray(rows[..., 0]) - refs), axis=1)
    err_blocked = np.max(np.abs(np.asarray(blocked[..., 0]) - refs), axis=1)
    assert np.all(err_blocked <= 3 * err_rows), (err_blocked, err_rows)

    failing, ok = _solve(example_protocol, values, "system", 1e-6, 1e-9, t0=jnp.asarray([0.0, 0.0, 0.0, 0.0, 0.5]),
                         block_rows=2)
    assert np.asarray(ok).tolist() == [True, True, True, True, False]
    np.testing.assert_array_equal(np.asarray(failing[:4]), np.asarray(blocked[:4]))
    with pytest.raises(m.ModelError, match="block_rows"):
        m.ODESolver(layout="system", block_rows=0)
    with pytest.raises(ValueError, match="block_rows"):
        m.SolverConfig(block_rows=-2)


def test_imaging_potential_same_under_both_layouts_and_gradient_matches_finite_differences(example_protocol):
    """The imaging model's log density with the (default) system layout equals the rows layout's
    to the solver tolerance, and its gradient equals central finite differences."""
    sim = simulate_imaging(example_protocol, SimulationSettings(num_cells=4), key=jax.random.key(2))
    t, y = jnp.asarray(sim["time_min"]), jnp.asarray(sim["intensity"])
    fmin, fmax = sim["cells"]["f_min"], sim["cells"]["f_max"]
    from inference._model import default_plan

    plan = default_plan(probe_kd_nM=15.0)
    values, fns = {}, {}
    layouts = {"rows": m.SolverConfig(layout="rows"), "system": m.SolverConfig(layout="system", block_rows=None),
               "system in blocks of 3": m.SolverConfig(layout="system", block_rows=3)}
    for layout, solver in layouts.items():
        problem = ImagingProblem(model=m.ZincFluxRapidEquilibrium(example_protocol), time_min=t, intensity=y,
                                 mask=jnp.ones(y.shape, bool), f_min_ref=jnp.asarray(fmin), f_max_ref=jnp.asarray(fmax),
                                 sigma_ref=jnp.asarray(sim["cells"]["sigma"]), solver=solver)
        info, potential, _, _ = initialize_model(jax.random.key(0), imaging_model, model_args=(problem, plan))
        from jax.flatten_util import ravel_pytree

        x0, unravel = ravel_pytree(info.z)
        fns[layout] = f = jax.jit(lambda x, potential=potential, unravel=unravel: potential(unravel(x)))
        values[layout] = float(f(x0))
    assert m.SolverConfig().layout == "system"
    assert values["system"] == pytest.approx(values["rows"], rel=1e-6)
    assert values["system in blocks of 3"] == pytest.approx(values["rows"], rel=1e-6)
    h = 1e-5
    for layout in ("system", "system in blocks of 3"):
        f = fns[layout]
        g = np.asarray(jax.jit(jax.grad(f))(x0))
        rng = np.random.default_rng(0)
        for i in rng.choice(x0.size, size=8, replace=False):
            e = np.zeros(x0.size)
            e[i] = h
            fd = (float(f(x0 + e)) - float(f(x0 - e))) / (2 * h)
            assert g[i] == pytest.approx(fd, rel=1e-4, abs=1e-4 * np.max(np.abs(g))), (layout, i)


SYSTEM_DEVICES_SCRIPT = """
import json, jax, numpy as np
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from numpyro.infer.util import initialize_model
from data import read_protocol
from inference._model import ImagingProblem, default_plan, imaging_model
from inference._simulate import SimulationSettings, simulate_imaging
import models as m
protocol = read_protocol("data/example/protocol.toml").to_inputs(30.0)
sim = simulate_imaging(protocol, SimulationSettings(num_cells=5), key=jax.random.key(4))
y = jnp.asarray(sim["intensity"])
c = sim["cells"]
from models._compat import enable_shard_map_solves
out = {"devices": jax.device_count(), "shard_map": enable_shard_map_solves()}
for block in (None, 1, "auto"):
    problem = ImagingProblem(model=m.ZincFluxRapidEquilibrium(protocol), time_min=jnp.asarray(sim["time_min"]), intensity=y,
                             mask=jnp.ones(y.shape, bool), f_min_ref=jnp.asarray(c["f_min"]), f_max_ref=jnp.asarray(c["f_max"]),
                             sigma_ref=jnp.asarray(c["sigma"]), solver=m.SolverConfig(layout="system", block_rows=block))
    info, pot, _, _ = initialize_model(jax.random.key(0), imaging_model, model_args=(problem, default_plan(probe_kd_nM=15.0)))
    x0, unravel = ravel_pytree(info.z)
    v, g = jax.jit(jax.value_and_grad(lambda x: pot(unravel(x))))(x0)
    out[str(block)] = {"value": float(v), "grad": np.asarray(g).tolist()}
print(json.dumps(out))
"""


def test_system_layout_over_four_devices_gives_the_same_log_density_and_gradient(tmp_path):
    """Five cells as one system, rows padded to 8 and split over 4 forced CPU devices, against one
    device: log density and gradient equal to 1e-10 relative (the shared step's error norm is a
    maximum over rows, the same on any layout; sums differ only in order). The same with blocks
    of one row: on one device five blocks one after another, on four devices (``shard_map``)
    blocks cut within each device's two rows. With the CPU's default blocks, each device's two
    rows are one block of their own: other systems than one device's five-row block, so equal
    only to within the solver tolerance."""
    import json
    import subprocess
    import sys

    from test_runs import ROOT, _env

    (tmp_path / "s.py").write_text(SYSTEM_DEVICES_SCRIPT)
    out = {}
    for n in (1, 4):
        env = dict(_env(), XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
        res = subprocess.run([sys.executable, str(tmp_path / "s.py")], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        out[n] = json.loads(res.stdout.strip().splitlines()[-1])
    assert out[1]["devices"] == 1 and out[4]["devices"] == 4
    assert out[4]["shard_map"], "equinox's closure-conversion check could not be patched: blocks fall back to vmap"
    for block in ("None", "1"):
        one, four = out[1][block], out[4][block]
        assert four["value"] == pytest.approx(one["value"], rel=1e-10), block
        np.testing.assert_allclose(four["grad"], one["grad"], rtol=1e-10, atol=1e-10 * np.max(np.abs(one["grad"])))
    # on one device "auto" (blocks of 64) is the five-row system
    assert out[1]["auto"]["value"] == pytest.approx(out[1]["None"]["value"], rel=1e-12)
    # five one-row systems, or four two-row ones, are not the five-row system: different steps,
    # equal to the tolerance
    for one, other in ((out[1]["1"], out[1]["None"]), (out[4]["auto"], out[1]["auto"])):
        assert one["value"] == pytest.approx(other["value"], rel=1e-6)
        assert one["value"] != other["value"]

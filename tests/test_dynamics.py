"""Model A against independent SciPy Radau solutions of the full equations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import solve_full_reference

import models as m


PARAM_SETS = {
    "defaults": {},
    "fast_release_low_rest": {"zc_rest_nM": 0.15, "release_stim_per_min": 0.8, "stim_decay_min": 1.0,
                              "zip_vmax_nM_per_min": 600.0, "znt_km_nM": 10.0},
    "high_rest_strong_buffer": {"zc_rest_nM": 2.0, "mt_sites_nM": 4000.0, "mt_kd_nM": 8.0,
                                "iono_perm_per_min": 0.1, "tpen_rate_per_min": 300.0, "probe_kd_nM": 9.0},
}
TS = np.linspace(0.0, 30.0, 121)


def _as_dict(p):
    return {k: float(getattr(p, k)) for k in m.PARAM_SPECS}


def _ref(protocol, p, kon):
    return solve_full_reference(_as_dict(p), protocol.start_min, protocol.kind, protocol.zn_ext_uM, TS, kon=kon)


@pytest.mark.parametrize("name", list(PARAM_SETS))
def test_full_model_matches_scipy_radau(example_protocol, name):
    """diffrax Kvaerno5 on the full (stiff) equations vs SciPy Radau, rtol 1e-10, all segments."""
    p = m.default_params(**PARAM_SETS[name])
    zc_ref, frac_ref = _ref(example_protocol, p, kon=6.0)
    traj = m.solve(m.ZincFluxFull(example_protocol), p, TS, config=m.full_model_config())
    assert bool(traj.success)
    np.testing.assert_allclose(np.asarray(traj.zc_nM), zc_ref, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(traj.probe_fraction), frac_ref, rtol=1e-5)


@pytest.mark.parametrize("name", list(PARAM_SETS))
def test_rapid_equilibrium_matches_full_equations(example_protocol, name):
    """The fitting model (Tsit5, ln Zc) vs Radau on the full equations in the fast-binding limit.

    With k_on = 6e5 /nM/min (binding 1e5 times faster than physiological), the full equations are
    within 1e-5 of their rapid-equilibrium limit; the rapid-equilibrium solve must be too, on every
    frame, calibration segments included.
    """
    p = m.default_params(**PARAM_SETS[name])
    zc_ref, frac_ref = _ref(example_protocol, p, kon=6e5)
    traj = m.solve(m.ZincFluxRapidEquilibrium(example_protocol), p, TS,
                   config=m.SolverConfig(rtol=1e-11, atol=1e-13, max_steps=100_000))
    assert bool(traj.success)
    np.testing.assert_allclose(np.asarray(traj.zc_nM), zc_ref, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(traj.probe_fraction), frac_ref, rtol=1e-5)


def test_reduction_error_shrinks_like_one_over_kon(example_protocol):
    """The gap between full and reduced model is first order in 1/k_on, and small at k_on = 6."""
    p = m.default_params()
    traj = m.solve(m.ZincFluxRapidEquilibrium(example_protocol), p, TS,
                   config=m.SolverConfig(rtol=1e-11, atol=1e-13, max_steps=100_000))
    gaps = []
    for kon in (6.0, 60.0, 600.0):
        _, frac_ref = _ref(example_protocol, p, kon=kon)
        gaps.append(np.max(np.abs(np.asarray(traj.probe_fraction) - frac_ref)))
    # physiological binding: under 1% of the dynamic range, below a 3% imaging noise
    assert gaps[0] < 0.01
    np.testing.assert_allclose(gaps[0] / gaps[1], 10.0, rtol=0.05)
    np.testing.assert_allclose(gaps[1] / gaps[2], 10.0, rtol=0.05)


def test_resting_state_is_steady(example_protocol):
    """Without stimulus the derived V_znt and k_leak make the initial state a steady state."""
    model = m.ZincFluxRapidEquilibrium(example_protocol)
    p = m.default_params(zc_rest_nM=0.7, store_rest_nM=3000.0)
    dy = model.vector_field(0.5, model.initial_state(p), p)
    assert abs(float(dy.log_zc)) < 1e-12
    assert abs(float(dy.zs_nM)) < 1e-9


def test_closed_cell_conserves_zinc():
    """With all transport off (no ZIP influx, efflux, ionophore, TPEN) total cytosolic + store zinc is conserved.

    A stimulus moves zinc from stores into the cytosol, where MT and probe buffer it; the sum
    Zc + Z_MT + Z_P + Zs must stay constant in both formulations.
    """
    protocol = m.ProtocolInputs(start_min=(0.0, 1.0), kind=("baseline", "stimulus"), zn_ext_uM=(1.0, 1.0), end_min=10.0)
    p = m.default_params(zip_vmax_nM_per_min=1e-12)  # J_zip ~ 0, hence V_znt ~ 0 too
    ts = np.linspace(0.0, 10.0, 41)
    traj = m.solve(m.ZincFluxFull(protocol), p, ts, config=m.full_model_config())
    red = m.ZincFluxRapidEquilibrium(protocol)

    def total_reduced(t_grid):
        import diffrax

        sol = diffrax.diffeqsolve(diffrax.ODETerm(red.vector_field), diffrax.Tsit5(), 0.0, 10.0, 1e-3,
                                  red.initial_state(p), args=p, saveat=diffrax.SaveAt(ts=jnp.asarray(t_grid)),
                                  stepsize_controller=diffrax.ClipStepSizeController(
                                      diffrax.PIDController(rtol=1e-10, atol=1e-12), jump_ts=jnp.asarray([1.0])),
                                  max_steps=100_000)
        zc = jnp.exp(sol.ys.log_zc)
        return (zc + p.mt_sites_nM * zc / (p.mt_kd_nM + zc) + p.probe_total_nM * zc / (p.probe_kd_nM + zc)
                + sol.ys.zs_nM)

    total0 = p.zc_rest_nM + p.mt_sites_nM * p.zc_rest_nM / (p.mt_kd_nM + p.zc_rest_nM) \
        + p.probe_total_nM * p.zc_rest_nM / (p.probe_kd_nM + p.zc_rest_nM) + p.store_rest_nM
    assert bool(traj.success)
    assert float(jnp.max(traj.zc_nM)) > 3 * p.zc_rest_nM  # the stimulus really moved zinc
    np.testing.assert_allclose(np.asarray(total_reduced(ts)), total0, rtol=1e-8)


@pytest.mark.parametrize("name", list(PARAM_SETS))
def test_public_api_model_a_equals_the_module_and_radau(example_protocol, name):
    """models.flux_model (model A written with the public ODEModel API, as the imaging fit uses
    it) gives the Module's solution, and the full-equation Radau reference in the fast-binding
    limit as test_rapid_equilibrium_matches_full_equations does."""
    p = m.default_params(**PARAM_SETS[name])
    model = m.flux_model(example_protocol)
    values = {**_as_dict(p), "sigma_zc": 0.1}
    model.check(0.0, TS, values)
    ys, ok = jax.jit(lambda v: model.solve(v, 0.0, jnp.asarray(TS), m.ODESolver("tsit5", rtol=1e-10, atol=1e-13,
                                                                                      max_steps=50_000, dt0=1e-3,
                                                                                      dtmax=1.0)))(values)
    traj = m.solve(m.ZincFluxRapidEquilibrium(example_protocol), p, TS,
                   config=m.SolverConfig(rtol=1e-10, atol=1e-13, max_steps=50_000))
    assert bool(ok) and bool(traj.success)
    np.testing.assert_allclose(np.exp(np.asarray(ys[:, 0])), np.asarray(traj.zc_nM), rtol=1e-9)
    zc_ref, _ = _ref(example_protocol, p, kon=6e5)
    np.testing.assert_allclose(np.exp(np.asarray(ys[:, 0])), zc_ref, rtol=1e-5)


def test_solver_failure_is_reported_not_raised(example_protocol):
    """Too few steps: success is False and the outputs are finite placeholders, no exception."""
    p = m.default_params()
    traj = jax.jit(lambda p: m.solve(m.ZincFluxRapidEquilibrium(example_protocol), p, TS,
                                     config=m.SolverConfig(max_steps=5)))(p)
    assert not bool(traj.success)
    assert np.all(np.isfinite(np.asarray(traj.zc_nM)))


def test_protocol_validation_messages():
    with pytest.raises(ValueError, match="first segment must be 'baseline'"):
        m.ProtocolInputs(start_min=(0.0,), kind=("stimulus",), zn_ext_uM=(1.0,), end_min=1.0)
    with pytest.raises(ValueError, match="must strictly increase"):
        m.ProtocolInputs(start_min=(0.0, 0.0), kind=("baseline", "fmax"), zn_ext_uM=(1.0, 1.0), end_min=1.0)
    with pytest.raises(ValueError, match="baseline extracellular zinc must be > 0"):
        m.ProtocolInputs(start_min=(0.0,), kind=("baseline",), zn_ext_uM=(0.0,), end_min=1.0)
    with pytest.raises(ValueError, match="rtol must be in"):
        m.SolverConfig(rtol=2.0)


def test_docs_list_every_parameter_with_its_default_prior():
    """docs/models.md stays true to the code: every parameter with its unit and default prior."""
    from pathlib import Path

    text = (Path(__file__).parent.parent / "docs" / "models.md").read_text()
    for name, spec in m.PARAM_SPECS.items():
        row = next((line for line in text.splitlines() if line.startswith(f"| `{name}` |")), None)
        assert row is not None, name
        assert f"LogNormal(log {spec.median:g}, {spec.log_sd:g})" in row, name

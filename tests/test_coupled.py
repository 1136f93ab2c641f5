"""Model C (coupled fluxes + MTF-1 feedback): reference solves, reductions, pre-equilibration, gradients."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import solve_coupled_reference

from models import (
    COUPLED_GENES,
    GENE_SPECS,
    MTF1Transcription,
    ODESolver,
    ProtocolInputs,
    SolverConfig,
    ZincFluxRapidEquilibrium,
    coupled_model,
    default_params,
    default_transcription_params,
    solve,
)


MODEL = coupled_model()
HALF_LIVES = [GENE_SPECS[g].half_life_h for g in COUPLED_GENES]
# off the prior medians, so that no term is at a special value
VALUES = {**MODEL.reference_values(), "zc_rest_nM": 0.4, "zip_vmax_nM_per_min": 250.0, "zip_km_uM": 2.5,
          "znt_km_nM": 60.0, "mt_sites_nM": 1800.0, "mtf1_k_nM": 0.8, "mtf1_hill": 2.2, "amplitude_MT1": 12.0,
          "amplitude_ZnT1": 2.5, "amplitude_ZIP4": 4.0, "protein_half_life_h_MT1": 8.0,
          "protein_half_life_h_ZnT1": 14.0, "protein_half_life_h_ZIP4": 6.0}
TS = np.array([0.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 360.0, 720.0, 1440.0])


def _view(**changes):
    return MODEL.params_view({k: jnp.asarray(v, dtype=jnp.float64) for k, v in {**VALUES, **changes}.items()})


def _residual(p, y):
    """max |f| relative to the state scale (ln states: absolute; store zinc: relative)."""
    f = np.asarray(MODEL.rhs(jnp.asarray(-math.inf), y, p))
    scale = np.ones_like(f)
    scale[1] = max(abs(float(y[1])), 1.0)
    return float(np.max(np.abs(f) / scale))


@pytest.mark.parametrize("before, after", [(0.2, 2.0), (2.0, 30.0)])
def test_preequilibrated_start_is_a_steady_state_and_time_courses_match_radau(before, after):
    """The start is a steady state in the culture medium to 1e-8; the time course after the medium
    change matches an independent NumPy model solved by SciPy Radau (rtol 1e-11) with both the
    default explicit solver and Kvaerno5."""
    p = _view(zo_before_uM=before, zo_after_uM=after, t_switch_min=5.0)
    y0, ok = MODEL.initial_state(0.0, p, jnp.float64)
    assert bool(ok)
    assert _residual(p, y0) < 1e-8
    ref = solve_coupled_reference({k: float(v) for k, v in p.items()}, np.asarray(y0), TS, HALF_LIVES)
    for method in ("tsit5", "kvaerno5"):
        ys, ok = MODEL.solve(p, 0.0, jnp.asarray(TS), ODESolver(method, rtol=1e-9, atol=1e-11, max_steps=100_000))
        assert bool(ok), method
        np.testing.assert_allclose(np.asarray(ys)[:, [0, *range(2, 8)]], ref[:, [0, *range(2, 8)]], atol=2e-6, err_msg=method)
        np.testing.assert_allclose(np.asarray(ys)[:, 1], ref[:, 1], rtol=1e-6, err_msg=method)
    # the switch matters: free zinc and ZIP4 move the expected ways
    assert (ref[-1, 4] < ref[0, 4]) and (ref[3, 0] > ref[0, 0])


def test_reduces_to_model_a_when_transcription_is_frozen():
    """Protein frozen at the reference level (infinite half-lives) and cells cultured in the
    reference medium: free zinc follows model A under the same medium step."""
    frozen = {f"protein_half_life_h_{g}": 1e30 for g in COUPLED_GENES}
    p = _view(zo_before_uM=2.0, zo_after_uM=30.0, t_switch_min=5.0, **frozen)
    ts = np.linspace(0.0, 60.0, 61)
    ys, ok = MODEL.solve(p, 0.0, jnp.asarray(ts), ODESolver("tsit5", rtol=1e-10, atol=1e-12))
    assert bool(ok)
    protocol = ProtocolInputs(start_min=(0.0, 5.0), kind=("baseline", "zinc"), zn_ext_uM=(2.0, 30.0), end_min=60.0)
    flux = default_params(**{k: VALUES[k] for k in ("zc_rest_nM", "zip_vmax_nM_per_min", "zip_km_uM", "znt_km_nM",
                                                    "seq_vmax_nM_per_min", "seq_km_nM", "store_rest_nM", "mt_sites_nM",
                                                    "mt_kd_nM", "probe_total_nM", "probe_kd_nM")})
    traj = solve(ZincFluxRapidEquilibrium(protocol), flux, ts, config=SolverConfig(rtol=1e-10, atol=1e-12, max_steps=100_000))
    assert bool(traj.success)
    np.testing.assert_allclose(np.exp(np.asarray(ys)[:, 0]), np.asarray(traj.zc_nM), rtol=1e-6)
    assert float(np.exp(ys[-1, 0])) > 2 * VALUES["zc_rest_nM"]  # the step did raise free zinc


@pytest.mark.parametrize("medium", [0.5, 8.0, 40.0])
def test_reduces_to_model_b_at_steady_state(medium):
    """At its steady state in a medium, model C's mRNA fold changes equal model B's steady-state
    fold changes at the effective dose that gives model B the same free-zinc ratio (feedback off
    in B, whose zinc balance is a different, linear one: the agreement tests the shared MTF-1
    regulation through two different solvers)."""
    p = _view(zo_before_uM=medium, zo_after_uM=medium)
    y, ok = MODEL.initial_state(0.0, p, jnp.float64)
    assert bool(ok)
    ratio = float(jnp.exp(y[0])) / VALUES["zc_rest_nM"]
    b = MTF1Transcription.for_genes(COUPLED_GENES, feedback=False)
    # B's steady state is z = 1 + G u / (K_abs + u); at u = K_abs this is 1 + G / 2
    bp = default_transcription_params(b, zc_rest_nM=VALUES["zc_rest_nM"], mtf1_k_nM=VALUES["mtf1_k_nM"],
                                      mtf1_hill=VALUES["mtf1_hill"], uptake_gain=2.0 * (ratio - 1.0),
                                      amplitude=jnp.asarray([VALUES[f"amplitude_{g}"] for g in COUPLED_GENES]))
    fc_b, ok_b = b.fold_change(bp, bp.absorption_km_mgkg)
    assert bool(ok_b)
    np.testing.assert_allclose(np.exp(np.asarray(y)[2:5]), np.asarray(fc_b), rtol=1e-8)
    np.testing.assert_allclose(np.asarray(y)[5:8], np.asarray(y)[2:5], atol=1e-9)  # protein follows mRNA at steady state


def test_log_density_gradient_matches_finite_differences():
    """Through pre-equilibration (implicit) and the solve: imaging-like free zinc and fold changes."""
    from numpyro.infer import init_to_median
    from numpyro.infer.util import initialize_model

    from data import TimeSeries
    from inference._custom import CustomProblem, build_dataset, custom_model

    m = coupled_model(fixed=(*MODEL.fixed, "protein_half_life_h_MT1", "protein_half_life_h_ZnT1", "protein_half_life_h_ZIP4"))
    values = {"zc_nM": [0.5, 1.0, 0.9, 0.7, 0.6], "MT1_fc": [np.nan, np.nan, 1.5, 4.0, 3.0], "ZIP4_fc": [np.nan, np.nan, 0.9, 0.5, 0.6]}
    series = TimeSeries(path="mem.csv", times=np.array([0.0, 10.0, 60.0, 360.0, 1440.0]), lines=np.zeros((1, 5), int),
                        values={k: np.array([v]) for k, v in values.items()})
    ds = build_dataset(m, "d", series, t0=0.0, time_factor=1.0, constants={"zo_before_uM": 0.5, "zo_after_uM": 10.0})
    problem = CustomProblem(model=m, datasets=(ds,))
    info, potential, _, _ = initialize_model(jax.random.key(1), custom_model, model_args=(problem,),
                                             init_strategy=init_to_median(num_samples=15))
    z = jax.tree.map(lambda v: v + 0.03, info.z)
    pot = jax.jit(potential)
    assert np.isfinite(float(pot(z)))
    g = jax.jit(jax.grad(potential))(z)
    for name in z:
        h = 1e-6
        fd = (pot({**z, name: z[name] + h}) - pot({**z, name: z[name] - h})) / (2 * h)
        np.testing.assert_allclose(float(g[name]), float(fd), rtol=1e-4, atol=1e-5, err_msg=name)

"""Model B (MTF-1 transcription) and the steady-state solver, against SciPy and finite differences."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import mtf1_steady_reference, mtf1_time_course_reference

import models as m
from data import TARGET_GENES


GENES = ["MT1", "ZnT1", "ZIP4", "ZIP5"]
PARAM_SETS = {
    "defaults": {},
    "steep_sensitive": {"mtf1_k_nM": 0.8, "mtf1_hill": 3.5, "uptake_gain": 40.0, "absorption_km_mgkg": 150.0},
    "shallow_saturating": {"mtf1_k_nM": 4.0, "mtf1_hill": 1.2, "uptake_gain": 4.0, "absorption_km_mgkg": 15.0,
                           "zc_rest_nM": 0.2},
}
DOSES = [0.0, 30.0, 90.0, 180.0]


# jitted once per model structure: parameters, doses and times are passed as arrays
_steady_jit = eqx.filter_jit(lambda model, p, u: model.steady_state(p, u))
_fold_change_jit = eqx.filter_jit(lambda model, p, u: model.fold_change(p, u))
_time_course_jit = eqx.filter_jit(lambda model, p, u, ts: model.time_course(p, u, ts, rtol=1e-11, atol=1e-13))


def _steady(model, p, u):
    return _steady_jit(model, p, jnp.asarray(u))


def _fold_change(model, p, u):
    return _fold_change_jit(model, p, jnp.asarray(u))


def _time_course(model, p, u, ts):
    return _time_course_jit(model, p, jnp.asarray(u), jnp.asarray(ts))


def _model(feedback):
    return m.MTF1Transcription.for_genes(GENES, feedback=feedback)


def _ref_params(model, p):
    return {
        "K": float(p.mtf1_k_nM), "n": float(p.mtf1_hill), "zr": float(p.zc_rest_nM), "Kabs": float(p.absorption_km_mgkg),
        "G": float(p.uptake_gain), "kzn": float(p.zn_turnover_per_h), "A": np.asarray(p.amplitude),
        "K2": np.asarray(p.repress_k_nM), "n2": np.asarray(p.repress_hill), "delta": np.asarray(p.mrna_decay_per_h),
    }


def test_gene_registries_agree():
    """Every gene the readers accept as a target has a regulation and prior in the model, and back."""
    assert set(m.GENE_SPECS) == set(TARGET_GENES)


@pytest.mark.parametrize("feedback", [False, True])
@pytest.mark.parametrize("name", list(PARAM_SETS))
def test_steady_state_matches_scipy(name, feedback):
    """Newton steady state vs a bracketed SciPy solve of the scalar balance (independent code)."""
    model = _model(feedback)
    p = m.default_transcription_params(model, **PARAM_SETS[name])
    ref_p = _ref_params(model, p)
    for u in DOSES:
        ss = _steady(model, p, u)
        assert bool(ss.success) and not bool(ss.used_fallback)
        z, q = mtf1_steady_reference(ref_p, model.regulation, list(model.genes), u, feedback)
        np.testing.assert_allclose(np.exp(float(ss.y[0])), z, rtol=1e-10)
        np.testing.assert_allclose(np.exp(np.asarray(ss.y[1:])), q, rtol=1e-10)


@pytest.mark.parametrize("feedback", [False, True])
def test_time_course_matches_scipy_radau_and_reaches_steady_state(feedback):
    """diffrax Kvaerno5 time course vs SciPy Radau (independent equations); its end point vs the
    steady-state solve within 1e-8 relative."""
    model = _model(feedback)
    p = m.default_transcription_params(model, **PARAM_SETS["steep_sensitive"])
    ts = np.array([0.5, 2.0, 6.0, 24.0, 72.0, 1000.0])
    for u in (30.0, 180.0):
        zc, mrna, ok = _time_course(model, p, u, ts)
        assert bool(ok)
        ref = mtf1_time_course_reference(_ref_params(model, p), model.regulation, list(model.genes), u, ts, feedback)
        np.testing.assert_allclose(np.asarray(zc) * float(p.zc_rest_nM), ref[:, 0], rtol=1e-6)
        np.testing.assert_allclose(np.asarray(mrna), ref[:, 1:], rtol=1e-6)
        fc, ok_ss = _fold_change(model, p, u)
        assert bool(ok_ss)
        np.testing.assert_allclose(np.asarray(mrna[-1]), np.asarray(fc), rtol=1e-8)
        # the model is not yet at steady state after 24 h (mRNA half-lives 3-6 h): the test is not trivial
        assert np.max(np.abs(np.asarray(mrna[2]) / np.asarray(fc) - 1)) > 1e-3


@pytest.mark.parametrize("feedback", [False, True])
def test_public_api_model_b_starts_at_the_doses_steady_state(feedback):
    """models.transcription_model (model B written with the public ODEModel API, as the built-in
    transcript fits use it): the pre-equilibrated start at a dose is the SciPy steady state, its
    fold-change observables are the model's fold changes, and a time course from there stays put."""
    model = _model(feedback)
    p = m.default_transcription_params(model, **PARAM_SETS["steep_sensitive"])
    ode = m.transcription_model(model)
    values = {**ode.reference_values(), "mtf1_k_nM": 0.8, "mtf1_hill": 3.5, "uptake_gain": 40.0,
              "absorption_km_mgkg": 150.0, "effective_dose_mgkg": 90.0}
    values.update({f"amplitude_{g}": float(a) for g, a in zip(model.genes, np.asarray(p.amplitude))})
    values.update({f"{f}_{g}": float(getattr(p, f)[i]) for f in ("repress_k_nM", "repress_hill", "mrna_decay_per_h")
                   for i, g in enumerate(model.genes)})
    values.update({f: float(getattr(p, f)) for f in ("zc_rest_nM", "zn_turnover_per_h")})
    obs = ode.check(0.0, [0.0, 24.0], values)
    _, fc_ref = mtf1_steady_reference(_ref_params(model, p), model.regulation, list(model.genes), 90.0, feedback)
    np.testing.assert_allclose([obs[f"{g}_fc"][0] for g in model.genes], fc_ref, rtol=1e-8)
    np.testing.assert_allclose([obs[f"{g}_fc"][1] for g in model.genes], fc_ref, rtol=1e-7)


def test_control_diet_is_the_reference_state():
    model = _model(True)
    p = m.default_transcription_params(model)
    fc, ok = _fold_change(model, p, 0.0)
    assert bool(ok)
    np.testing.assert_allclose(np.asarray(fc), 1.0, atol=1e-14)


@pytest.mark.parametrize("feedback", [False, True])
def test_steady_state_gradient_matches_finite_differences(feedback):
    """Implicit-function-theorem gradients of every fold change w.r.t. every parameter vs central FD."""
    model = _model(feedback)
    base = m.default_transcription_params(model, **PARAM_SETS["steep_sensitive"])
    flat, unravel = jax.flatten_util.ravel_pytree(base)
    log_flat = jnp.log(flat)

    def f(log_theta, u):
        fc, _ = model.fold_change(unravel(jnp.exp(log_theta)), u)
        return jnp.log(fc)

    f = jax.jit(f)
    jac_f = jax.jit(jax.jacrev(f))
    for u in (30.0, 180.0):
        jac = np.asarray(jac_f(log_flat, u))
        h = 1e-5
        fd = np.stack([(np.asarray(f(log_flat.at[i].add(h), u)) - np.asarray(f(log_flat.at[i].add(-h), u))) / (2 * h)
                       for i in range(log_flat.size)], axis=1)
        assert np.max(np.abs(fd)) > 0.05  # the fold changes do depend on the parameters
        np.testing.assert_allclose(jac, fd, rtol=1e-4, atol=1e-7)


def _arctan_field(t, y, a):
    # Newton on arctan diverges from |y - root| > 1.39; the flow converges from anywhere
    return -jnp.arctan(y - a)


def test_fallback_integration_rescues_a_failed_newton_solve():
    ss = jax.jit(lambda a: m.steady_state(_arctan_field, jnp.array([12.0]), a))(3.0)
    assert bool(ss.used_fallback) and bool(ss.success)
    np.testing.assert_allclose(float(ss.y[0]), 3.0, atol=1e-12)
    # derivative of the root w.r.t. the parameter, through the fallback path: d y*/d a = 1
    grad = jax.grad(lambda a: m.steady_state(_arctan_field, jnp.array([12.0]), a).y[0])(3.0)
    np.testing.assert_allclose(float(grad), 1.0, rtol=1e-10)


def test_batched_steady_states_use_the_fallback_only_where_needed():
    guesses = jnp.array([[3.5], [12.0], [-9.0]])
    ss = jax.jit(lambda g, a: m.steady_state(_arctan_field, g, a))(guesses, jnp.array([3.0, 3.0, -1.0]))
    np.testing.assert_array_equal(np.asarray(ss.used_fallback), [False, True, True])
    assert bool(jnp.all(ss.success))
    np.testing.assert_allclose(np.asarray(ss.y[:, 0]), [3.0, 3.0, -1.0], atol=1e-12)


def test_fallback_stays_a_branch_under_an_outer_vmap():
    """vmap over batches of steady states (optimiser starts, chains) keeps the integration a
    real branch, run only when some Newton solve failed, instead of a select that integrates
    every time; results match the unbatched calls."""
    integrated = []

    def field(t, y, a):  # Newton evaluates at t = 0; the fallback integration at t > 0
        jax.debug.callback(lambda t: integrated.append(float(t)) if float(np.max(t)) > 0 else None, t)
        return _arctan_field(t, y, a)

    f = jax.jit(jax.vmap(lambda g, a: m.steady_state(field, g, a)))
    args = jnp.array([[3.0, 3.0], [3.0, 3.0]])
    ss = f(jnp.array([[[2.5], [3.4]], [[2.9], [3.1]]]), args)  # every Newton solve converges
    jax.block_until_ready(ss.y)
    assert bool(jnp.all(ss.success)) and not bool(jnp.any(ss.used_fallback))
    assert integrated == []
    ss = f(jnp.array([[[3.5], [12.0]], [[2.9], [3.1]]]), args)  # one needs the fallback
    jax.block_until_ready(ss.y)
    np.testing.assert_array_equal(np.asarray(ss.used_fallback), [[False, True], [False, False]])
    np.testing.assert_allclose(np.asarray(ss.y[..., 0]), 3.0, atol=1e-12)
    assert integrated


def test_no_steady_state_is_reported_as_failure_not_an_answer():
    ss = m.steady_state(lambda t, y, a: 1.0 + y**2, jnp.array([0.0]), None,
                        m.SteadyStateConfig(t_max=50.0, max_steps=2000))
    assert not bool(ss.success)
    assert bool(ss.used_fallback)


def test_steady_state_survives_wild_parameters_inside_jit_and_vmap():
    """Extreme trial parameters (as early NUTS proposals) give finite output or a flagged failure, never an exception."""
    model = _model(True)
    p = m.default_transcription_params(model)
    scales = jnp.array([1e-30, 1e-6, 1.0, 1e6, 1e30])

    def one(s):
        q = m.default_transcription_params(model, mtf1_k_nM=p.mtf1_k_nM * s, uptake_gain=p.uptake_gain / s,
                                           amplitude=p.amplitude * s)
        fc, ok = model.fold_change(q, 90.0)
        return fc, ok

    fc, ok = jax.jit(jax.vmap(one))(scales)
    assert bool(ok[2])
    assert np.all(np.isfinite(np.asarray(fc)[np.asarray(ok)]))


def test_biphasic_gene_can_rise_then_fall_and_induced_genes_cannot():
    """The model family can express a non-monotone dose response only through the biphasic form."""
    model = m.MTF1Transcription.for_genes(["ZIP5", "MT1"], feedback=False, regulation={"ZIP5": "biphasic"})
    p = m.default_transcription_params(model, repress_k_nM=jnp.array([2.0, 2.0]), repress_hill=jnp.array([6.0, 6.0]),
                                       uptake_gain=20.0, absorption_km_mgkg=100.0)
    doses = jnp.linspace(0.0, 400.0, 41)
    fc = np.asarray(jax.jit(jax.vmap(lambda u: model.fold_change(p, u)[0]))(doses))
    zip5, mt1 = fc[:, 0], fc[:, 1]
    peak = int(np.argmax(zip5))
    assert 0 < peak < len(doses) - 1 and zip5[peak] > 1.2 and zip5[-1] < zip5[peak] - 0.2
    assert np.all(np.diff(mt1) > 0)


def test_model_rejects_inconsistent_gene_setups():
    with pytest.raises(ValueError, match="unknown gene"):
        m.MTF1Transcription.for_genes(["MT3"])
    with pytest.raises(ValueError, match="needs ZIP4 to be repressed"):
        m.MTF1Transcription.for_genes(["MT1"], feedback=True, regulation={"ZIP4": "induced"})
    with pytest.raises(ValueError, match="unknown regulation"):
        m.MTF1Transcription(genes=("MT1",), regulation=("up",), feedback=False)


def test_docs_list_every_model_b_parameter_with_its_default_prior():
    """docs/models.md stays true to the code for model B, as for model A."""
    from pathlib import Path

    lines = (Path(__file__).parent.parent / "docs" / "models.md").read_text().splitlines()
    rows = {name: spec for name, spec in m.TRANSCRIPTION_SPECS.items()}
    for name, spec in rows.items():
        row = next((x for x in lines if x.startswith(f"| `{name}` |")), None)
        assert row is not None, name
        assert f"LogNormal(log {spec.median:g}, {spec.log_sd:g})" in row, name
    for g in m.GENE_SPECS.values():
        row = next((x for x in lines if x.startswith(f"| `amplitude_{g.name}` |")), None)
        assert row is not None, g.name
        assert f"LogNormal(log {g.amplitude_median:g}, {g.amplitude_log_sd:g})" in row and f"({g.regulation})" in row, g.name

"""The hierarchical numpyro model connecting dynamics, observation and noise."""

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jaxtyping import Array, Bool, Float

from models import (
    PARAM_SPECS,
    FluorescenceParams,
    ODEModel,
    ODESolver,
    SolverConfig,
    ZincFluxParams,
    ZincFluxRapidEquilibrium,
    fluorescence,
    flux_model,
)


DEFAULT_PER_CELL = ("zc_rest_nM", "zip_vmax_nM_per_min", "release_stim_per_min")
# Held at their prior medians by default: the buffer capacities set the scale of every flux (the
# data see only flux / buffer capacity), and the store and sequestration constants are not
# separable from the release rate with imaging data alone. See docs/models.md.
DEFAULT_FIXED = ("probe_total_nM", "mt_sites_nM", "mt_kd_nM", "seq_vmax_nM_per_min", "seq_km_nM", "store_rest_nM",
                 "iono_perm_per_min")


@dataclasses.dataclass(frozen=True)
class ParameterPlan:
    r"""Which kinetic constants are sampled, fixed, or varied per cell, and with which priors.

    Attributes
    ----------
    priors : dict
        Prior (numpyro distribution with positive support) of every sampled constant, keyed
        by :class:`models.ZincFluxParams` field name. For per-cell constants this is the prior
        of the population median.
    fixed : dict
        Constants held at a given value (same units as the field name).
    per_cell : tuple of str
        Constants that vary between cells: $\log\theta_i \sim N(\log\mu, \tau^2)$,
        $\tau \sim$ HalfNormal(``population_sd_scale``); the site ``{name}`` is the population
        median $\mu$, ``{name}_sd_log`` is $\tau$, ``{name}_cell`` the per-cell values.
    centered : bool
        Centred ($\log\theta_i$ sampled directly; the default) or non-centred
        ($\log\theta_i = \log\mu + \tau z_i$, $z_i \sim N(0, 1)$, sites ``{name}_z``).
        Imaging traces pin each cell's constants far more tightly than the population spread, the
        regime where the centred form samples well and the non-centred one does not (measured:
        15 vs 255 leapfrog steps per iteration on the 16-cell recovery data; docs/inference.md).
    population_sd_scale : float
        Scale of the half-normal prior on the between-cell sd of log parameters.
    """

    priors: dict
    fixed: dict
    per_cell: tuple[str, ...] = DEFAULT_PER_CELL
    population_sd_scale: float = 0.5
    centered: bool = True

    def __post_init__(self):
        names = set(PARAM_SPECS)
        for label, keys in (("priors", self.priors), ("fixed", self.fixed), ("per_cell", self.per_cell)):
            unknown = set(keys) - names
            if unknown:
                raise ValueError(f"Unknown parameter(s) in {label}: {sorted(unknown)}; known: {sorted(names)}.")
        both = set(self.priors) & set(self.fixed)
        if both:
            raise ValueError(f"Parameter(s) {sorted(both)} are both fixed and given a prior.")
        missing = names - set(self.priors) - set(self.fixed)
        if missing:
            raise ValueError(f"Parameter(s) {sorted(missing)} have neither a prior nor a fixed value.")
        fixed_cell = set(self.per_cell) & set(self.fixed)
        if fixed_cell:
            raise ValueError(f"Per-cell parameter(s) {sorted(fixed_cell)} cannot be fixed.")
        if self.population_sd_scale <= 0:
            raise ValueError(f"population_sd_scale must be > 0, got {self.population_sd_scale}.")

    @property
    def sampled(self) -> tuple[str, ...]:
        return tuple(n for n in PARAM_SPECS if n in self.priors)


class ImagingProblem(eqx.Module):
    """Everything the likelihood needs, as arrays: one imaging experiment, many cells.

    Attributes
    ----------
    model : ZincFluxRapidEquilibrium (holds the protocol).
    time_min : observation times (minutes).
    intensity : raw fluorescence, NaN replaced by 0 where masked.
    mask : True where an observation is used.
    f_min_ref, f_max_ref, sigma_ref : robust per-cell empirical summaries of the calibration
        segments and of the frame-to-frame noise, used to centre the observation priors.
    """

    model: ZincFluxRapidEquilibrium
    time_min: Float[Array, " n_time"]
    intensity: Float[Array, "n_cells n_time"]
    mask: Bool[Array, "n_cells n_time"]
    f_min_ref: Float[Array, " n_cells"]
    f_max_ref: Float[Array, " n_cells"]
    sigma_ref: Float[Array, " n_cells"]
    solver: SolverConfig = eqx.field(static=True, default=SolverConfig())

    @property
    def num_cells(self) -> int:
        return self.intensity.shape[0]

    @property
    def flux(self) -> ODEModel:
        """The same model through the public API (:func:`models.flux_model`); every cell is
        solved with its :meth:`~models.ODEModel.solve_batch`.
        """
        return flux_model(self.model.protocol)


OBS_LOG_SD = 0.5  # prior sd (log units) of f_min and f_max around their empirical references


def kinetic_params(plan: ParameterPlan, num_cells: int) -> ZincFluxParams:
    """Sample the kinetic constants inside a numpyro model; returns per-cell arrays."""
    values = {}
    for name in PARAM_SPECS:
        if name in plan.fixed:
            values[name] = jnp.full((num_cells,), float(plan.fixed[name]))
            continue
        mu = numpyro.sample(name, plan.priors[name])
        if name in plan.per_cell:
            tau = numpyro.sample(f"{name}_sd_log", dist.HalfNormal(plan.population_sd_scale))
            if plan.centered:
                with numpyro.plate("cell", num_cells):
                    values[name] = numpyro.sample(f"{name}_cell", dist.LogNormal(jnp.log(mu), tau))
            else:
                with numpyro.plate("cell", num_cells):
                    z = numpyro.sample(f"{name}_z", dist.Normal(0.0, 1.0))
                values[name] = numpyro.deterministic(f"{name}_cell", mu * jnp.exp(tau * z))
        else:
            values[name] = jnp.broadcast_to(mu, (num_cells,))
    return ZincFluxParams(**values)


def observation_params(problem: ImagingProblem) -> FluorescenceParams:
    """Sample the per-cell observation parameters inside a numpyro model."""
    n = problem.num_cells
    log_range_ref = jnp.log(problem.f_max_ref / problem.f_min_ref)
    with numpyro.plate("cell", n):
        f_min = numpyro.sample("f_min", dist.LogNormal(jnp.log(problem.f_min_ref), OBS_LOG_SD))
        # f_max = f_min * (1 + exp(r)) keeps f_max > f_min without a hard boundary
        r = numpyro.sample("log_dynamic_range", dist.Normal(jnp.log(jnp.expm1(log_range_ref)), OBS_LOG_SD))
        f_max = numpyro.deterministic("f_max", f_min * (1.0 + jnp.exp(r)))
        bleach = numpyro.sample("bleach_rate_per_min", dist.Normal(0.0, 0.02))
        sigma = numpyro.sample("sigma", dist.LogNormal(jnp.log(problem.sigma_ref), 1.0))
    return FluorescenceParams(f_min=f_min, f_max=f_max, bleach_rate_per_min=bleach, sigma=sigma)


def predict(problem: ImagingProblem, params: ZincFluxParams, obs: FluorescenceParams):
    """Expected fluorescence of every cell, free zinc, and per-cell solver success.

    One batched solve of all cells (:meth:`models.ODEModel.solve_batch` of model A); a cell whose
    solve fails gets finite placeholders and ``success=False`` without changing the others.

    Called outside any trace (numpyro runs the model eagerly when it initialises the MAP, the
    chain starts and each chain's sampler), it runs one program compiled once per problem;
    otherwise each such call would compile the solve again, its vector field being a new closure.
    Inside a trace it is inlined into the caller's program. (A nested ``jit`` there measured
    several times slower to compile the MAP and NUTS programs, in a comparison that a warm
    compilation cache may have skewed; docs/performance.md. It was not repeated.)
    """
    if _inside_jit((problem, params, obs)):
        return _predict(problem, params, obs)
    return _predict_compiled(problem, params, obs)


def _inside_jit(tree) -> bool:
    """Whether a leaf is, or wraps (under ``grad``/``linearize``/``vmap``), a tracer of a ``jit``
    trace, or a tracer of a kind not known here (then inlining is the safe choice).
    """
    for x in jax.tree.leaves(tree):
        while isinstance(x, jax.core.Tracer):
            kind = type(x).__name__
            if kind in ("JVPTracer", "LinearizeTracer"):
                x = x.primal
            elif kind == "BatchTracer":
                x = x.val
            else:  # a jit trace's tracer, or one not known here
                return True
    return False


def _predict(problem: ImagingProblem, params: ZincFluxParams, obs: FluorescenceParams):
    n, t = problem.num_cells, problem.time_min
    t0 = problem.model.protocol.t0
    values = {name: jnp.broadcast_to(getattr(params, name), (n,)) for name in PARAM_SPECS}
    values["sigma_zc"] = jnp.ones(n)  # the flux model's own noise scale; unused by its dynamics
    s = problem.solver
    solver = ODESolver(s.solver, rtol=s.rtol, atol=s.atol, max_steps=s.max_steps, dt0=s.dt0, dtmax=s.dtmax, layout=s.layout,
                      block_rows=s.block_rows)
    ys, ok = problem.flux.solve_batch(values, jnp.full((n,), t0), jnp.broadcast_to(t, (n, t.shape[0])), solver)
    zc = jnp.exp(ys[..., 0])
    fraction = zc / (values["probe_kd_nM"][:, None] + zc)
    f = jax.vmap(lambda frac, o: fluorescence(frac, t, t0, o))(fraction, obs)
    return f, zc, ok


_predict_compiled = eqx.filter_jit(_predict)


def imaging_model(problem: ImagingProblem, plan: ParameterPlan, *, predictive: bool = False):
    r"""Hierarchical model of per-cell fluorescence traces.

    For cell $i$ and frame $j$: $y_{ij} \sim N(F_i(t_j), \sigma_i^2)$ where $F_i$ is
    :func:`models.fluorescence` applied to the rapid-equilibrium zinc flux model solved with the
    cell's kinetic constants. A failed solve for any cell sets the log density to $-\infty$
    (the proposal is rejected) and is counted in the deterministic site ``solver_failures``.
    """
    n = problem.num_cells
    params = kinetic_params(plan, n)
    obs = observation_params(problem)
    f, zc, ok = predict(problem, params, obs)
    numpyro.deterministic("zc_nM", zc)
    failures = numpyro.deterministic("solver_failures", jnp.sum(~ok))
    numpyro.factor("solver_ok", jnp.where(failures > 0, -jnp.inf, 0.0))
    with numpyro.plate("cell", n, dim=-2), numpyro.plate("time", problem.time_min.shape[0], dim=-1):
        noise = dist.Normal(f, obs.sigma[:, None])
        if predictive:
            numpyro.sample("intensity", noise)
        else:
            numpyro.sample("intensity", noise.mask(problem.mask), obs=problem.intensity)


def default_plan(*, probe_kd_nM: float | None = None, fixed: dict | None = None,
                 priors: dict | None = None, per_cell=DEFAULT_PER_CELL,
                 population_sd_scale: float = 0.5, centered: bool = True) -> ParameterPlan:
    """The default parameter plan, with config overrides applied.

    By default ``probe_total_nM`` is fixed at its prior median: all fluxes and buffer capacities
    scale together with it and the data only see their ratios (see docs/models.md).
    """
    from models import default_priors

    base = default_priors(probe_kd_nM=probe_kd_nM)
    if fixed is None:
        fixed = {name: PARAM_SPECS[name].median for name in DEFAULT_FIXED}
    fixed = dict(fixed)
    merged = {k: v for k, v in base.items() if k not in fixed}
    for k, v in (priors or {}).items():
        fixed.pop(k, None)
        merged[k] = v
    return ParameterPlan(priors=merged, fixed=fixed, per_cell=tuple(per_cell),
                         population_sd_scale=population_sd_scale, centered=centered)


def empirical_refs(time_min: np.ndarray, intensity: np.ndarray, mask: np.ndarray, segments):
    """Robust per-cell references for the observation priors.

    ``segments`` maps segment kind to ``(start, end)`` in minutes. F_min: median of the second half
    of the Fmin segment; F_max: median of the second half of the Fmax segment; sigma: MAD of
    first differences / (0.6745 sqrt 2), floored at 1e-3 of F_min.
    """
    def late_median(kind):
        a, b = segments[kind]
        sel = (time_min >= 0.5 * (a + b)) & (time_min < b)
        vals = np.where(mask[:, sel], intensity[:, sel], np.nan)
        return np.nanmedian(vals, axis=1)

    fmin = late_median("fmin")
    fmax = late_median("fmax")
    vals = np.where(mask, intensity, np.nan)
    d = np.diff(vals, axis=1)
    mad = np.nanmedian(np.abs(d - np.nanmedian(d, axis=1, keepdims=True)), axis=1)
    sigma = np.maximum(mad / (0.6745 * math.sqrt(2.0)), 1e-3 * np.abs(fmin))
    return fmin, fmax, sigma

r"""Fitting user-defined ODE models (:class:`models.ODEModel`) to time-series data sets.

Likelihood. For data set $d$ with parameters $\theta_d$ (shared parameters, the data set's own
copies of ``per_dataset`` parameters, fixed values and the data set's constants), the model is
solved from $t_{0,d}$ and each observed cell $y_{d,k,j}$ of observable $k$ at time $t_j$ gets

$$ y_{d,k,j} \sim \mathcal{D}_k\big(g_k(t_j, y(t_j; \theta_d), \theta_d), \sigma_k\big) $$

with $\mathcal{D}_k$ the observable's noise model (normal, log-normal or Student-t). Empty cells are
not part of the likelihood. A failed solve, failed pre-equilibration or a prediction outside the
noise model's support (a non-positive mean under log-normal noise) rejects the draw (log density
$-\infty$) and is counted per draw in ``sample_stats.solver_failures``.

Each (data set, observable) pair is its own likelihood site, so the DataTree's
``observed_data``, ``log_likelihood`` and ``posterior_predictive`` groups keep data sets apart and
arviz's LOO and PPC work per data set.
"""

import dataclasses
import importlib.util
import sys
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import xarray as xr
from arviz_base import from_dict
from jax.flatten_util import ravel_pytree
from numpyro.infer import MCMC, NUTS, Predictive, log_likelihood
from numpyro.infer.util import constrain_fn

from models import LogNormal, ModelError, ODEModel, ODESolver

from ._fit import EXTRA_FIELDS, SamplerConfig, chain_starts, sample_stats
from ._laplace import laplace_init


def load_model_file(path, object_name: str = "model") -> ODEModel:
    """Import a user's Python file and return its :class:`models.ODEModel` named ``object_name``.

    Raises
    ------
    ModelError
        Missing file, an exception while importing it (the message shows the user's line), no
        object of that name, or an object that is not an ``ODEModel``.
    """
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: the model file does not exist. Fix: check [model] file in the config (relative to the config).")
    module_name = f"zinckin_user_model_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ModelError as e:
        raise ModelError(f"{path}: {e}") from None
    except Exception as e:
        frames = [f for f in traceback.extract_tb(e.__traceback__) if Path(f.filename).resolve() == path.resolve()]
        where = f" (line {frames[-1].lineno}: {frames[-1].line})" if frames else ""
        raise ModelError(f"{path}: importing the model file raised {type(e).__name__}: {e}{where}. Fix: correct the file; it must "
                         "run with plain `python` and define the model object.") from None
    finally:
        sys.modules.pop(module_name, None)
    if not hasattr(module, object_name):
        found = [k for k, v in vars(module).items() if isinstance(v, ODEModel)]
        raise ModelError(f"{path}: defines no object {object_name!r} (ODEModel objects found: {found}). "
                         "Fix: set [model] object in the config to the variable that holds the model.")
    model = getattr(module, object_name)
    if not isinstance(model, ODEModel):
        raise ModelError(f"{path}: {object_name!r} is a {type(model).__name__}, not a models.ODEModel. "
                         "Fix: build it with models.ODEModel(...).")
    return model


@dataclasses.dataclass(frozen=True)
class CustomDataset:
    """One time-series data set in the model's time unit.

    Attributes
    ----------
    name : data set name (posterior dims, site names).
    path : source file.
    t0 : start of the solve.
    times : saved times (sorted), including every observed time.
    observed : ``{observable: (indices into times, values)}`` of the non-empty cells.
    constants : fixed parameter values for this data set (override the model's fixed values).
    time_factor : model time units per data time unit (``times`` = file times x factor).
    """

    name: str
    path: Path
    t0: float
    times: np.ndarray
    observed: dict
    constants: dict
    time_factor: float = 1.0


@dataclasses.dataclass(frozen=True)
class CustomProblem:
    """Everything the likelihood needs: the model, its data sets and how parameters are shared.

    ``per_dataset`` lists estimated parameters that get one value per data set (same prior each);
    all other estimated parameters are shared by every data set.
    """

    model: ODEModel
    datasets: tuple[CustomDataset, ...]
    per_dataset: tuple[str, ...] = ()
    solver: ODESolver | None = None

    def __post_init__(self):
        m = self.model
        for n in self.per_dataset:
            if n not in m.sampled_names:
                raise ModelError(f"per_dataset parameter {n!r} is not an estimated parameter of model {m.name!r} "
                                 f"(estimated: {list(m.sampled_names)}). Fix: correct the name.")
        names = [d.name for d in self.datasets]
        if len(set(names)) != len(names) or not names:
            raise ModelError(f"data set names must be unique and at least one is needed, got {names}.")
        for d in self.datasets:
            for k in d.constants:
                if k not in m.fixed:
                    raise ModelError(f"data set {d.name!r} sets constant {k!r}, which is not a fixed parameter of model "
                                     f"{m.name!r} (fixed: {list(m.fixed)}). Fix: declare Parameter({k!r}, unit, <number>) "
                                     "in the model, or remove the constant.")
        clash = {s for s, _, _ in self.sites()} & set(m.param_names)
        if clash:
            raise ModelError(f"likelihood sites {sorted(clash)} have the names of parameters. Fix: rename the observables.")

    def sites(self) -> list[tuple[str, int, str]]:
        """``(site name, data set index, observable)`` for every observed pair."""
        one = len(self.datasets) == 1
        return [(o if one else f"{d.name}__{o}", i, o)
                for i, d in enumerate(self.datasets) for o in (ob.name for ob in self.model.observables) if o in d.observed]

    def dataset_values(self, i: int, sampled: dict) -> dict:
        """All parameter values of data set ``i`` from the sampled values (per-data-set ones indexed)."""
        d = self.datasets[i]
        values = {**self.model.fixed, **d.constants}
        for n in self.model.sampled_names:
            values[n] = sampled[n][..., i] if n in self.per_dataset else sampled[n]
        return values


def custom_model(problem: CustomProblem, predictive: bool = False):
    """Numpyro model: priors, one ODE solve per data set, one likelihood site per observed series."""
    m = problem.model
    sampled = {}
    for name, prior in m.priors.items():
        if name in problem.per_dataset:
            with numpyro.plate("dataset", len(problem.datasets)):
                sampled[name] = numpyro.sample(name, prior)
        else:
            sampled[name] = numpyro.sample(name, prior)
    sites = problem.sites()
    failures = jnp.asarray(0)
    for i, d in enumerate(problem.datasets):
        p = m.params_view(problem.dataset_values(i, sampled))
        ys, ok = m.solve(p, d.t0, jnp.asarray(d.times), problem.solver)
        pred = m.observe(jnp.asarray(d.times), ys, p)
        chosen = []
        for site, j, obs_name in sites:
            if j != i:
                continue
            obs = next(o for o in m.observables if o.name == obs_name)
            idx, values = d.observed[obs_name]
            mu = pred[obs_name][idx]
            ok = ok & jnp.all(obs.noise.valid(mu))
            chosen.append((site, obs, values))
            pred[obs_name] = mu
        for site, obs, values in chosen:
            mu = jnp.where(ok, pred[obs.name], jnp.asarray(values))
            numpyro.sample(site, obs.noise.distribution(mu, p), obs=None if predictive else jnp.asarray(values))
        failures = failures + (~ok).astype(jnp.int32)
    failures = numpyro.deterministic("solver_failures", failures)
    numpyro.factor("solver_ok", jnp.where(failures > 0, -jnp.inf, 0.0))


def build_dataset(model: ODEModel, name: str, series, *, t0: float | None, time_factor: float, constants: dict) -> CustomDataset:
    """A :class:`CustomDataset` from a :class:`data.TimeSeries` (times scaled into the model's unit)."""
    times = np.asarray(series.times, dtype=float) * time_factor
    start = float(times[0]) if t0 is None else float(t0) * time_factor
    if times[0] < start:
        raise ModelError(f"{series.path}: the first time {series.times[0]:g} is before t0 = {start / time_factor:g}. "
                         "Fix: set t0 in the config at or before the first measurement.")
    if times[-1] <= start:
        raise ModelError(f"{series.path}: no measurement after t0 = {start / time_factor:g}; nothing to integrate. "
                         "Fix: check t0 and the time column.")
    observed = {k: series.observed(k) for k in series.values}
    return CustomDataset(name=name, path=Path(series.path), t0=start, times=times, observed=observed,
                         constants={k: float(v) for k, v in constants.items()}, time_factor=time_factor)


def positive_observables(model: ODEModel) -> list[str]:
    """Observables with log-normal noise (their data must be positive)."""
    return [o.name for o in model.observables if isinstance(o.noise, LogNormal)]


def check_problem(problem: CustomProblem) -> dict:
    """Run :meth:`models.ODEModel.check` for every data set at the prior medians; returns the predictions."""
    m = problem.model
    ref = m.reference_values()
    out = {}
    for i, d in enumerate(problem.datasets):
        values = {**ref, **d.constants}
        try:
            out[d.name] = m.check(d.t0, d.times, values)
        except ModelError as e:
            raise ModelError(f"{e} [data set {d.name!r}, {d.path}]") from None
    return out


# ----------------------------------------------------------------------------------------------
# Sampling and outputs


@dataclasses.dataclass
class CustomFit:
    """A finished fit: the DataTree, its problem and the MAP / Laplace start."""

    tree: xr.DataTree
    problem: CustomProblem
    laplace: object
    method: str


def run_custom(problem: CustomProblem, config: SamplerConfig, *, key, method: str = "nuts",
               progress_bar: bool = True, num_laplace_draws: int = 2000) -> CustomFit:
    """Fit with NUTS (started at the MAP with the Laplace metric) or by MAP + Laplace approximation.

    ``method="map"``: the posterior group holds ``num_laplace_draws`` draws of the Laplace
    approximation (a Gaussian in numpyro's unconstrained space, mapped through the constraints),
    one chain; ``tree.attrs["method"]`` says which it is. Diagnostics such as R-hat do not apply.
    """
    if method not in ("nuts", "map"):
        raise ValueError(f"method must be 'nuts' or 'map', got {method!r}.")
    k_init, k_jitter, k_mcmc, k_ppc = jax.random.split(key, 4)
    laplace = laplace_init(custom_model, (problem,), key=k_init, max_iter=500, tol=1e-6, host_loop=True)
    if method == "map":
        chol = jnp.linalg.cholesky(laplace.inverse_mass_matrix + 1e-12 * jnp.eye(laplace.flat_map.shape[0]))
        eps = jax.random.normal(k_mcmc, (num_laplace_draws, laplace.flat_map.shape[0]))
        _, unravel = ravel_pytree(laplace.z_map)
        flats = laplace.flat_map + eps @ chol.T
        to_constrained = jax.jit(jax.vmap(lambda f: constrain_fn(custom_model, (problem,), {}, unravel(f))))
        draws = to_constrained(flats)
        samples = {k: np.asarray(v)[None] for k, v in draws.items()}
        map_point = constrain_fn(custom_model, (problem,), {}, laplace.z_map)
        tree = custom_tree(problem, samples, None, key=k_ppc, max_tree_depth=0)
        tree.attrs["method"] = "laplace"
        tree.attrs["map"] = str({k: np.asarray(v).tolist() for k, v in map_point.items()})
        return CustomFit(tree=tree, problem=problem, laplace=laplace, method=method)
    init = chain_starts(laplace, config.num_chains, key=k_jitter, potential_model=(custom_model, problem))
    kernel = NUTS(custom_model, target_accept_prob=config.target_accept_prob, max_tree_depth=config.max_tree_depth,
                  dense_mass=True, inverse_mass_matrix=laplace.inverse_mass_matrix,
                  adapt_mass_matrix=config.adapt_mass_matrix)
    mcmc = MCMC(kernel, num_warmup=config.num_warmup, num_samples=config.num_samples, num_chains=config.num_chains,
                chain_method=config.chain_method, progress_bar=progress_bar)
    mcmc.run(k_mcmc, problem, extra_fields=EXTRA_FIELDS, init_params=init)
    samples = {k: np.asarray(v) for k, v in mcmc.get_samples(group_by_chain=True).items()}
    extra = mcmc.get_extra_fields(group_by_chain=True)
    tree = custom_tree(problem, samples, extra, key=k_ppc, max_tree_depth=config.max_tree_depth)
    tree.attrs["method"] = "nuts"
    return CustomFit(tree=tree, problem=problem, laplace=laplace, method=method)


def custom_tree(problem: CustomProblem, samples: dict, extra: dict | None, *, key, max_tree_depth: int) -> xr.DataTree:
    """The arviz DataTree of a custom-model fit (``samples`` grouped by chain).

    Without a ``solver_failures`` entry in ``samples`` (Laplace draws) the failures are counted
    in the same pass as the posterior predictive draws.
    """
    m = problem.model
    posterior = {k: v for k, v in samples.items() if k in m.sampled_names}
    num_chains, num_draws = next(iter(posterior.values())).shape[:2]
    flat = {k: jnp.asarray(v.reshape((-1,) + v.shape[2:])) for k, v in posterior.items()}
    sites = problem.sites()
    ll = log_likelihood(custom_model, flat, problem)
    ppc = Predictive(custom_model, posterior_samples=flat, return_sites=[s for s, _, _ in sites] + ["solver_failures"])(
        key, problem, predictive=True)
    failures = samples.get("solver_failures")
    if failures is None:
        failures = np.asarray(ppc["solver_failures"]).reshape(num_chains, num_draws)

    def by_chain(a):
        a = np.asarray(a)
        return a.reshape((num_chains, num_draws) + a.shape[1:])

    dims = {n: ["dataset"] for n in problem.per_dataset}
    coords = {"dataset": [d.name for d in problem.datasets]}
    observed, constant = {}, {}
    for site, i, obs in sites:
        d = problem.datasets[i]
        idx, values = d.observed[obs]
        dim = f"{site}_obs"
        observed[site] = values
        constant[f"{site}_time"] = d.times[idx]
        dims[site] = [dim]
        dims[f"{site}_time"] = [dim]
        coords[dim] = np.arange(len(idx))
    constant["t0"] = np.array([d.t0 for d in problem.datasets])
    dims["t0"] = ["dataset"]
    for name, value in m.fixed.items():
        constant[f"fixed_{name}"] = np.array([problem.datasets[i].constants.get(name, value) for i in range(len(problem.datasets))])
        dims[f"fixed_{name}"] = ["dataset"]
    if extra is not None:
        stats = sample_stats(extra, failures, max_tree_depth)
    else:
        stats = {"solver_failures": np.asarray(failures).astype(int)}
    groups = {
        "posterior": posterior,
        "posterior_predictive": {s: by_chain(ppc[s]) for s, _, _ in sites},
        "log_likelihood": {s: by_chain(ll[s]) for s, _, _ in sites},
        "sample_stats": stats,
        "observed_data": observed,
        "constant_data": constant,
    }
    tree = from_dict(groups, coords=coords, dims=dims)
    tree.attrs.update({"model": m.name, "time_unit": m.time_unit, "per_dataset": list(problem.per_dataset)})
    units = m.units()
    for group in ("posterior", "observed_data", "posterior_predictive"):
        for name in tree[group].data_vars:
            base = name.split("__")[-1]
            if units.get(base):
                tree[group][name].attrs["units"] = units[base]
    return tree


def trajectory_bands(problem: CustomProblem, tree: xr.DataTree, *, num_draws: int = 200, num_times: int = 200,
                     seed: int = 0) -> dict:
    """Posterior median and 90% band of each observable on a fine grid, per data set.

    Returns ``{dataset: {"time": (num_times,), observable: (3, num_times) quantiles 5/50/95%}}``;
    draws whose solve fails are left out.
    """
    m = problem.model
    post = tree["posterior"]
    flat = {n: np.asarray(post[n]).reshape((-1,) + post[n].shape[2:]) for n in m.sampled_names}
    total = next(iter(flat.values())).shape[0]
    pick = np.random.default_rng(seed).choice(total, size=min(num_draws, total), replace=False)
    flat = {k: jnp.asarray(v[pick]) for k, v in flat.items()}
    out = {}
    for i, d in enumerate(problem.datasets):
        grid = np.unique(np.concatenate([np.linspace(d.t0, d.times[-1], num_times), d.times]))

        def one(sampled, i=i, d=d, grid=grid):
            p = m.params_view(problem.dataset_values(i, sampled))
            ys, ok = m.solve(p, d.t0, jnp.asarray(grid), problem.solver)
            return m.observe(jnp.asarray(grid), ys, p), ok

        pred, ok = jax.jit(jax.vmap(one))(flat)
        ok = np.asarray(ok)
        entry = {"time": grid}
        for name, v in pred.items():
            entry[name] = np.quantile(np.asarray(v)[ok], [0.05, 0.5, 0.95], axis=0) if ok.any() else None
        out[d.name] = entry
    return out


def summary_names(problem: CustomProblem) -> list[str]:
    """Posterior variables of the summary table (all estimated parameters)."""
    return list(problem.model.sampled_names)


def load_custom(config, base: Path) -> CustomProblem:
    """Model file, fixed overrides, data sets and solver from a :class:`CustomFitConfig`."""
    from data import read_timeseries
    from models import time_conversion

    m = load_model_file(base / config.model.file, config.model.object)
    if config.model.fixed:
        m = m.with_fixed(config.model.fixed)
    names = [o.name for o in m.observables]
    datasets = []
    for k, ds in enumerate(config.datasets):
        path = base / ds.file
        if ds.time_unit and m.time_unit and ds.time_unit != m.time_unit:
            try:
                factor = time_conversion(ds.time_unit, m.time_unit)
            except ModelError as e:
                raise ModelError(f"[[datasets]] {ds.file}: {e}") from None
        else:
            factor = 1.0
        series = read_timeseries(path, time_column=ds.time_column, columns=names, positive=positive_observables(m),
                                 ignore_columns=ds.ignore_columns)
        name = ds.name or (Path(ds.file).stem if Path(ds.file).stem.isidentifier() else f"dataset{k + 1}")
        datasets.append(build_dataset(m, name, series, t0=ds.t0, time_factor=factor, constants=ds.constants))
    s = config.solver
    solver = m.solver
    overrides = {k: v for k, v in s.model_dump().items() if v is not None}
    if overrides:
        solver = ODESolver(**{**{f: getattr(m.solver, f) for f in ("method", "rtol", "atol", "max_steps")}, **overrides})
    return CustomProblem(model=m, datasets=tuple(datasets), per_dataset=tuple(config.model.per_dataset), solver=solver)


def simulate_custom(problem: CustomProblem, values: dict, *, key) -> dict:
    """Noisy observations of every data set at its times from parameter ``values``.

    ``values`` holds every estimated parameter (a scalar, or one value per data set for
    ``per_dataset`` ones). Returns ``{dataset: {observable: (n_time,) array}}`` for the
    observables that data set observes, drawn from each observable's noise model.
    """
    m = problem.model
    out = {}
    for i, d in enumerate(problem.datasets):
        sampled = {n: jnp.asarray(values[n]) for n in m.sampled_names}
        p = m.params_view(problem.dataset_values(i, sampled))
        ys, ok = m.solve(p, d.t0, jnp.asarray(d.times), problem.solver)
        if not bool(ok):
            raise ModelError(f"the solve for data set {d.name!r} failed at the given parameters; nothing simulated.")
        pred = m.observe(jnp.asarray(d.times), ys, p)
        out[d.name] = {}
        for obs in m.observables:
            if obs.name in d.observed:
                key, sub = jax.random.split(key)
                out[d.name][obs.name] = np.asarray(obs.noise.distribution(pred[obs.name], p).sample(sub))
    return out

r"""Fitting user-defined ODE models (:class:`models.ODEModel`) to time-series data sets.

Likelihood. Every (data set, unit) pair is a *row*: a data set of one unit (a wide table) is one
row, a data set with a unit column (cells, samples, animals) has one row per unit. Row $r$ of data
set $d$ has parameters $\theta_r$: the shared parameters, the data set's own copies of
``per_dataset`` parameters, the unit's own values of ``per_unit`` parameters, fixed values and
the data set's constants. The model is solved from $t_{0,d}$ for every row at once (one batched
solve, ``vmap``) and each observed value $y_{r,k,j}$ of observable $k$ at time $t_j$ gets

$$ y_{r,k,j} \sim \mathcal{D}_k\big(g_k(t_j, y(t_j; \theta_r), \theta_r), \sigma_{k,r}\big) $$

with $\mathcal{D}_k$ the observable's noise model (normal, log-normal or Student-t). Empty cells are
not part of the likelihood. A failed solve, failed pre-equilibration or a prediction outside the
noise model's support (a non-positive mean under log-normal noise) rejects the draw (log density
$-\infty$) and is counted per draw in ``sample_stats.solver_failures`` (the number of failed rows).

Units (per-unit parameters). For a parameter $\theta$ listed in ``per_unit``, the site ``theta``
is the population value and each unit $u$ has its own value: for a prior on the positive
half-line $\log\theta_u = \log\theta + \tau z_u$ (``theta`` is the population median), for a prior
on the real line $\theta_u = \theta + \tau z_u$ (the population mean), with $z_u \sim N(0, 1)$ and
$\tau \sim$ HalfNormal(``unit_sd_scale``) (site ``theta_sd``). Non-centred by default (sites
``theta_z``, with ``theta_unit`` recorded); centred on request (``theta_unit`` sampled directly).
Rows without units (population-level data such as pooled qPCR) use the population value.

Each (data set, observable) pair is its own likelihood site, so the DataTree's
``observed_data``, ``log_likelihood`` and ``posterior_predictive`` groups keep data sets apart and
arviz's LOO and PPC work per data set.
"""

import dataclasses
import functools
import importlib.util
import math
import sys
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import xarray as xr
from arviz_base import from_dict
from numpyro.infer import NUTS, Predictive, log_likelihood
from numpyro.infer.util import constrain_fn

from models import LogNormal, ModelError, ODEModel, ODESolver

from ._approx import APPROX_METHODS, SVISettings, approximate
from ._fit import EXTRA_FIELDS, LAPLACE_STEP_SIZE, SamplerConfig, chain_starts, sample_stats
from ._laplace import laplace_init
from ._sampling import chain_layout, sample_nuts


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
    """One data set in the model's time unit: one unit, or several (cells, samples).

    Attributes
    ----------
    name : data set name (posterior dims, site names).
    path : source file.
    t0 : start of the solve.
    times : saving times (sorted, unique), including every observed time of every unit.
    observed : ``{observable: (unit index, time index, value)}`` of the non-empty cells.
    constants : fixed parameter values for this data set (override the model's fixed values).
    time_factor : model time units per data time unit (``times`` = file times x factor).
    units : unit labels, or None for a data set of one unit (no unit column).
    """

    name: str
    path: Path
    t0: float
    times: np.ndarray
    observed: dict
    constants: dict
    time_factor: float = 1.0
    units: tuple[str, ...] | None = None

    @property
    def num_rows(self) -> int:
        return 1 if self.units is None else len(self.units)


def unit_scale(prior, name: str) -> str:
    """``"log"`` for a prior on the positive half-line, ``"linear"`` on the real line (per-unit effects)."""
    support = prior.support
    c = dist.constraints
    if isinstance(support, c._Real):
        return "linear"
    if isinstance(support, c._GreaterThan) and float(np.min(np.asarray(support.lower_bound))) >= 0.0:
        return "log"
    raise ModelError(f"per_unit parameter {name!r} has a prior with support {support}; unit effects need a prior on the "
                     "positive half-line (log-normal effects) or on the real line (normal effects). Fix: change the "
                     "prior, or estimate the parameter per data set instead.")


@dataclasses.dataclass(frozen=True)
class CustomProblem:
    """Everything the likelihood needs: the model, its data sets and how parameters are shared.

    ``per_dataset`` lists estimated parameters that get one value per data set (same prior each);
    ``per_unit`` lists estimated parameters that get one value per unit (cell, sample) of the
    data sets that have units, drawn from a population distribution (see the module docstring);
    all other estimated parameters are shared by every data set. A parameter may be both per data
    set and per unit (each data set's population value, units around it).
    """

    model: ODEModel
    datasets: tuple[CustomDataset, ...]
    per_dataset: tuple[str, ...] = ()
    solver: ODESolver | None = None
    per_unit: tuple[str, ...] = ()
    unit_sd_scale: float = 0.5
    centered: bool = False

    def __post_init__(self):
        m = self.model
        for label, names in (("per_dataset", self.per_dataset), ("per_unit", self.per_unit)):
            for n in names:
                if n not in m.sampled_names:
                    raise ModelError(f"{label} parameter {n!r} is not an estimated parameter of model {m.name!r} "
                                     f"(estimated: {list(m.sampled_names)}). Fix: correct the name.")
        for n in self.per_unit:
            unit_scale(m.priors[n], n)
        if self.per_unit and not any(d.units for d in self.datasets):
            raise ModelError(f"per_unit parameters {list(self.per_unit)} need a data set with units. Fix: set unit_column "
                             "in a [[datasets]] entry whose table has one row per unit and time, or remove per_unit.")
        if not self.unit_sd_scale > 0:
            raise ModelError(f"unit_sd_scale must be > 0, got {self.unit_sd_scale}.")
        names = [d.name for d in self.datasets]
        if len(set(names)) != len(names) or not names:
            raise ModelError(f"data set names must be unique and at least one is needed, got {names}.")
        for d in self.datasets:
            for k in d.constants:
                if k not in m.fixed:
                    raise ModelError(f"data set {d.name!r} sets constant {k!r}, which is not a fixed parameter of model "
                                     f"{m.name!r} (fixed: {list(m.fixed)}). Fix: declare Parameter({k!r}, unit, <number>) "
                                     "in the model, or remove the constant.")
        clash = {s for s, _, _ in self.sites()} & (set(m.param_names) | set(self.latent_names()))
        if clash:
            raise ModelError(f"likelihood sites {sorted(clash)} have the names of parameters. Fix: rename the observables.")

    # -- names ----------------------------------------------------------------------------------

    def sites(self) -> list[tuple[str, int, str]]:
        """``(site name, data set index, observable)`` for every observed pair."""
        one = len(self.datasets) == 1
        return [(o if one else f"{d.name}__{o}", i, o)
                for i, d in enumerate(self.datasets) for o in (ob.name for ob in self.model.observables) if o in d.observed]

    def latent_names(self) -> list[str]:
        """Sample sites of the numpyro model (unconstrained space of NUTS and the MAP)."""
        names = list(self.model.sampled_names)
        for n in self.per_unit:
            names += [f"{n}_sd", f"{n}_unit" if self.centered else f"{n}_z"]
        return names

    def posterior_names(self) -> list[str]:
        """Variables of the posterior group: the sample sites plus recorded unit values."""
        names = self.latent_names()
        if not self.centered:
            names += [f"{n}_unit" for n in self.per_unit]
        return names

    def summary_names(self) -> list[str]:
        """Population-level variables (summary table, diagnostics gate)."""
        return list(self.model.sampled_names) + [f"{n}_sd" for n in self.per_unit]

    def unit_labels(self) -> list[str]:
        """Labels of all units (``dataset/unit`` when several data sets have units)."""
        with_units = [d for d in self.datasets if d.units]
        if len(with_units) == 1:
            return list(with_units[0].units)
        return [f"{d.name}/{u}" for d in with_units for u in d.units]

    # -- layout ---------------------------------------------------------------------------------

    @functools.cached_property
    def layout(self) -> dict:
        """Row arrays of the batched solve and gather indices of every likelihood site (NumPy)."""
        row_dataset, row_unit, unit_dataset, t0, grids = [], [], [], [], []
        unit = 0
        offsets = []
        for i, d in enumerate(self.datasets):
            offsets.append(len(row_dataset))
            for _ in range(d.num_rows):
                row_dataset.append(i)
                t0.append(d.t0)
                grids.append(d.times)
                if d.units is None:
                    row_unit.append(-1)
                else:
                    row_unit.append(unit)
                    unit_dataset.append(i)
                    unit += 1
        width = max(len(g) for g in grids)
        ts = np.stack([np.concatenate([g, np.full(width - len(g), g[-1])]) for g in grids])
        sites = {}
        for site, i, obs in self.sites():
            u, j, values = self.datasets[i].observed[obs]
            sites[site] = {"row": offsets[i] + np.asarray(u), "time": np.asarray(j), "values": np.asarray(values, float),
                           "dataset": i, "observable": obs}
        m = self.model
        fixed = {n: np.array([self.datasets[i].constants.get(n, v) for i in row_dataset], float) for n, v in m.fixed.items()}
        return {"row_dataset": np.asarray(row_dataset), "row_unit": np.asarray(row_unit), "unit_dataset": np.asarray(unit_dataset, int),
                "t0": np.asarray(t0, float), "ts": ts, "sites": sites, "fixed": fixed, "num_units": unit}

    def row_values(self, sampled: dict) -> dict:
        """Every parameter's value per row, ``{name: (n_rows,)}``, from the sampled site values.

        ``sampled`` holds every estimated parameter (per data set ones of shape ``(n_datasets,)``)
        and, for ``per_unit`` parameters, ``{name}_unit`` of shape ``(n_units,)``.
        """
        lay = self.layout
        rows = lay["row_dataset"].shape[0]
        out = {n: jnp.asarray(v) for n, v in lay["fixed"].items()}
        for n in self.model.sampled_names:
            v = jnp.asarray(sampled[n])
            pop = v[lay["row_dataset"]] if (n in self.per_dataset and v.ndim) else jnp.broadcast_to(v, (rows,))
            if n in self.per_unit:
                units = jnp.asarray(sampled[f"{n}_unit"])
                pop = jnp.where(lay["row_unit"] >= 0, units[np.maximum(lay["row_unit"], 0)], pop)
            out[n] = pop
        return out

    @functools.cached_property
    def predict(self):
        """Jitted ``row_values -> ({site: prediction at its observations}, failed rows (n_rows,) bool)``.

        One batched solve of all rows, then each site's predictions gathered. Built once per
        problem: every trace of the numpyro model (MAP, NUTS, predictive checks) reuses one trace
        of the solver, and eager calls (numpyro's initialisation) reuse one compilation.
        """
        m, lay, solver = self.model, self.layout, self.solver
        t0, ts = lay["t0"], lay["ts"]
        noise = {o.name: o.noise for o in m.observables}

        def predict(values):
            tsj = jnp.asarray(ts)
            ys, ok = m.solve_batch(values, jnp.asarray(t0), tsj, solver)
            pred = m.observe_batch(tsj, ys, values)
            bad = (~ok).astype(jnp.int32)
            out = {}
            for site, s in lay["sites"].items():
                mu = pred[s["observable"]][s["row"], s["time"]]
                bad = bad.at[s["row"]].max((~noise[s["observable"]].valid(mu)).astype(jnp.int32))
                out[site] = mu
            return out, bad > 0

        return jax.jit(predict)


def custom_model(problem: CustomProblem, predictive: bool = False):
    """Numpyro model: priors, one batched ODE solve of all rows, one likelihood site per observed series."""
    m = problem.model
    lay = problem.layout
    sampled = {}
    for name, prior in m.priors.items():
        if name in problem.per_dataset:
            with numpyro.plate("dataset", len(problem.datasets)):
                sampled[name] = numpyro.sample(name, prior)
        else:
            sampled[name] = numpyro.sample(name, prior)
    for name in problem.per_unit:
        log = unit_scale(m.priors[name], name) == "log"
        pop = sampled[name]
        pop = pop[lay["unit_dataset"]] if name in problem.per_dataset else pop
        center = jnp.log(pop) if log else pop
        tau = numpyro.sample(f"{name}_sd", dist.HalfNormal(problem.unit_sd_scale))
        with numpyro.plate("unit", lay["num_units"]):
            if problem.centered:
                value = numpyro.sample(f"{name}_unit", (dist.LogNormal if log else dist.Normal)(center, tau))
            else:
                z = numpyro.sample(f"{name}_z", dist.Normal(0.0, 1.0))
                value = numpyro.deterministic(f"{name}_unit", jnp.exp(center + tau * z) if log else center + tau * z)
        sampled[f"{name}_unit"] = value
    values = problem.row_values(sampled)
    mus, bad = problem.predict(values)
    failures = numpyro.deterministic("solver_failures", jnp.sum(bad.astype(jnp.int32)))
    ok = failures == 0
    noise = {o.name: o.noise for o in m.observables}
    for site, s in lay["sites"].items():
        p = {n: v[s["row"]] for n, v in values.items()}
        mu = jnp.where(ok, mus[site], jnp.asarray(s["values"]))
        numpyro.sample(site, noise[s["observable"]].distribution(mu, p), obs=None if predictive else jnp.asarray(s["values"]))
    numpyro.factor("solver_ok", jnp.where(ok, 0.0, -jnp.inf))


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
                         constants={k: float(v) for k, v in constants.items()}, time_factor=time_factor,
                         units=getattr(series, "units", None))


def positive_observables(model: ODEModel) -> list[str]:
    """Observables with log-normal noise (their data must be positive)."""
    return [o.name for o in model.observables if isinstance(o.noise, LogNormal)]


def check_problem(problem: CustomProblem) -> dict:
    """Run :meth:`models.ODEModel.check` for every data set at the prior medians; returns the predictions.

    Data sets with units are checked with the population values (the prior medians).
    """
    m = problem.model
    ref = m.reference_values()
    out = {}
    for d in problem.datasets:
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
    """A finished fit: the DataTree, its problem, the MAP / Laplace start and (``map`` / ``svi``) the approximation."""

    tree: xr.DataTree
    problem: CustomProblem
    laplace: object
    method: str
    approximation: object = None


@chain_layout
def run_custom(problem: CustomProblem, config: SamplerConfig, *, key, method: str = "nuts",
               progress_bar: bool = True, num_laplace_draws: int = 2000, num_starts: int = 8,
               checkpoint=None, svi: SVISettings = SVISettings()) -> CustomFit:
    """Fit with NUTS (started at the MAP with the Laplace metric) or by a Gaussian approximation.

    The MAP is the best of ``num_starts`` L-BFGS runs (the prior medians and prior draws).

    ``method="map"`` / ``"svi"``: the posterior group holds ``num_laplace_draws`` draws of the
    Laplace approximation or of the SVI Gaussian (:mod:`inference._approx`), one pseudo-chain;
    ``tree.attrs["method"]`` says which it is. Diagnostics such as R-hat do not apply.
    """
    if method not in ("nuts", *APPROX_METHODS):
        raise ValueError(f"method must be 'nuts', 'map' or 'svi', got {method!r}.")
    k_init, k_jitter, k_mcmc, k_ppc = jax.random.split(key, 4)
    laplace = laplace_init(custom_model, (problem,), key=k_init, max_iter=500, tol=1e-6, host_loop=True,
                           num_starts=num_starts)
    if method != "nuts":
        approx = approximate(custom_model, (problem,), laplace, method=method, key=k_mcmc,
                             num_draws=num_laplace_draws, svi=svi, progress_bar=progress_bar)
        tree = custom_tree(problem, approx.samples, None, key=k_ppc, max_tree_depth=0)
        tree.attrs["method"] = approx.method
        map_point = constrain_fn(custom_model, (problem,), {}, laplace.z_map)
        tree.attrs["map"] = str({k: np.asarray(v).tolist() for k, v in map_point.items()})
        return CustomFit(tree=tree, problem=problem, laplace=laplace, method=method, approximation=approx)
    init = chain_starts(laplace, config.num_chains, key=k_jitter, potential_model=(custom_model, problem))
    kernel = NUTS(custom_model, target_accept_prob=config.target_accept_prob, max_tree_depth=config.max_tree_depth,
                  dense_mass=True, inverse_mass_matrix=laplace.inverse_mass_matrix,
                  adapt_mass_matrix=config.adapt_mass_matrix, step_size=LAPLACE_STEP_SIZE)
    samples, extra = sample_nuts(kernel, config, key=k_mcmc, model_args=(problem,), init_params=init,
                                 extra_fields=EXTRA_FIELDS, progress_bar=progress_bar, checkpoint=checkpoint)
    tree = custom_tree(problem, samples, extra, key=k_ppc, max_tree_depth=config.max_tree_depth)
    tree.attrs["method"] = "nuts"
    return CustomFit(tree=tree, problem=problem, laplace=laplace, method=method)


def custom_tree(problem: CustomProblem, samples: dict, extra: dict | None, *, key, max_tree_depth: int) -> xr.DataTree:
    """The arviz DataTree of a custom-model fit (``samples`` grouped by chain, with ``solver_failures``)."""
    m = problem.model
    lay = problem.layout
    posterior = {k: np.asarray(samples[k]) for k in problem.posterior_names()}
    num_chains, num_draws = next(iter(posterior.values())).shape[:2]
    latent = {k: jnp.asarray(posterior[k].reshape((-1,) + posterior[k].shape[2:])) for k in problem.latent_names()}
    sites = problem.sites()
    ll = log_likelihood(custom_model, latent, problem)
    ppc = Predictive(custom_model, posterior_samples=latent, return_sites=[s for s, _, _ in sites])(
        key, problem, predictive=True)
    failures = np.asarray(samples["solver_failures"]).reshape(num_chains, num_draws)

    def by_chain(a):
        a = np.asarray(a)
        return a.reshape((num_chains, num_draws) + a.shape[1:])

    dims = {n: ["dataset"] for n in problem.per_dataset}
    coords = {"dataset": [d.name for d in problem.datasets]}
    if problem.per_unit:
        coords["unit"] = problem.unit_labels()
        for n in problem.per_unit:
            dims[f"{n}_unit"] = ["unit"]
            dims[f"{n}_z"] = ["unit"]
    observed, constant = {}, {}
    for site, i, obs in sites:
        d = problem.datasets[i]
        s = lay["sites"][site]
        dim = f"{site}_obs"
        observed[site] = s["values"]
        constant[f"{site}_time"] = d.times[s["time"]]
        dims[site] = [dim]
        dims[f"{site}_time"] = [dim]
        if d.units is not None:
            constant[f"{site}_unit"] = np.asarray(d.units, dtype=object)[d.observed[obs][0]].astype(str)
            dims[f"{site}_unit"] = [dim]
        coords[dim] = np.arange(len(s["values"]))
    constant["t0"] = np.array([d.t0 for d in problem.datasets])
    dims["t0"] = ["dataset"]
    for name, value in m.fixed.items():
        constant[f"fixed_{name}"] = np.array([d.constants.get(name, value) for d in problem.datasets])
        dims[f"fixed_{name}"] = ["dataset"]
    stats = sample_stats(extra, failures, max_tree_depth)
    groups = {
        "posterior": posterior,
        "posterior_predictive": {s: by_chain(ppc[s]) for s, _, _ in sites},
        "log_likelihood": {s: by_chain(ll[s]) for s, _, _ in sites},
        "sample_stats": stats,
        "observed_data": observed,
        "constant_data": constant,
    }
    tree = from_dict(groups, coords=coords, dims=dims)
    tree.attrs.update({"model": m.name, "time_unit": m.time_unit, "per_dataset": list(problem.per_dataset),
                       "per_unit": list(problem.per_unit)})
    units = m.units()
    for group in ("posterior", "observed_data", "posterior_predictive"):
        for name in tree[group].data_vars:
            base = name.split("__")[-1].removesuffix("_unit")
            if units.get(base):
                tree[group][name].attrs["units"] = units[base]
    return tree


def trajectory_bands(problem: CustomProblem, tree: xr.DataTree, *, num_draws: int = 200, num_times: int = 200,
                     seed: int = 0) -> dict:
    """Posterior median and 90% band of each observable on a fine grid, per data set.

    Data sets with units get the band of the population-typical unit (population values of the
    ``per_unit`` parameters). Returns ``{dataset: {"time": (num_times,), observable: (3, num_times)
    quantiles 5/50/95%}}``; draws whose solve fails are left out.
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
        fixed = {**m.fixed, **d.constants}

        def one(sampled, i=i, d=d, grid=grid, fixed=fixed):
            values = {**fixed, **{n: (v[i] if n in problem.per_dataset else v) for n, v in sampled.items()}}
            ys, ok = m.solve(values, d.t0, jnp.asarray(grid), problem.solver)
            return m.observe(jnp.asarray(grid), ys, m.params_view(values)), ok

        pred, ok = jax.jit(jax.vmap(one))(flat)
        ok = np.asarray(ok)
        entry = {"time": grid}
        for name, v in pred.items():
            entry[name] = np.quantile(np.asarray(v)[ok], [0.05, 0.5, 0.95], axis=0) if ok.any() else None
        out[d.name] = entry
    return out


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
                                 ignore_columns=ds.ignore_columns, unit_column=ds.unit_column)
        name = ds.name or (Path(ds.file).stem if Path(ds.file).stem.isidentifier() else f"dataset{k + 1}")
        datasets.append(build_dataset(m, name, series, t0=ds.t0, time_factor=factor, constants=ds.constants))
    s = config.solver
    solver = m.solver
    overrides = {k: v for k, v in s.model_dump().items() if v is not None}
    if overrides:
        solver = ODESolver(**{**{f: getattr(m.solver, f) for f in ("method", "rtol", "atol", "max_steps", "dt0", "dtmax")}, **overrides})
    mc = config.model
    return CustomProblem(model=m, datasets=tuple(datasets), per_dataset=tuple(mc.per_dataset), solver=solver,
                         per_unit=tuple(mc.per_unit), unit_sd_scale=mc.unit_sd_scale,
                         centered=mc.unit_parameterization == "centered")


def reference_values(problem: CustomProblem) -> dict[str, float]:
    """Prior medians of the estimated parameters and of the unit sds (simulation defaults)."""
    values = {n: v for n, v in problem.model.reference_values().items() if n in problem.model.sampled_names}
    for n in problem.per_unit:
        values[f"{n}_sd"] = problem.unit_sd_scale * math.sqrt(2.0) * 0.4769362762044699  # HalfNormal median
    return values


def simulate_custom(problem: CustomProblem, values: dict, *, key) -> dict:
    """Noisy observations of every data set at its observed cells from parameter ``values``.

    ``values`` holds every estimated parameter (a scalar, or one value per data set for
    ``per_dataset`` ones) and, for each ``per_unit`` parameter, either ``{name}_unit`` (one value
    per unit) or ``{name}_sd`` (unit values are then drawn around the population value).
    Returns ``{"observed": {site: (n_obs,) array}, "units": {name: (n_units,) array}}``.
    """
    m = problem.model
    lay = problem.layout
    sampled = {n: jnp.asarray(values[n]) for n in m.sampled_names}
    units = {}
    for n in problem.per_unit:
        if f"{n}_unit" in values:
            u = jnp.asarray(values[f"{n}_unit"], dtype=float)
        else:
            key, sub = jax.random.split(key)
            pop = sampled[n][lay["unit_dataset"]] if sampled[n].ndim else sampled[n]
            z = float(values[f"{n}_sd"]) * jax.random.normal(sub, (lay["num_units"],))
            u = pop * jnp.exp(z) if unit_scale(m.priors[n], n) == "log" else pop + z
        sampled[f"{n}_unit"] = u
        units[n] = np.asarray(u)
    row_values = problem.row_values(sampled)
    mus, bad = problem.predict(row_values)
    if bool(jnp.any(bad)):
        failed = sorted({problem.datasets[i].name for i in lay["row_dataset"][np.asarray(bad)]})
        raise ModelError(f"the solve failed at the given parameters for data set(s) {failed}; nothing simulated. Fix: check "
                         "the parameter values (--param) or the solver settings.")
    out = {}
    noise = {o.name: o.noise for o in m.observables}
    for site, s in lay["sites"].items():
        key, sub = jax.random.split(key)
        p = {k: v[s["row"]] for k, v in row_values.items()}
        out[site] = np.asarray(noise[s["observable"]].distribution(mus[site], p).sample(sub))
    return {"observed": out, "units": units}

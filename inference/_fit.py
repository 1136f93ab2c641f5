"""NUTS fits of imaging data: problem assembly, sampling, DataTree output."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr
from arviz_base import from_dict
from jax.flatten_util import ravel_pytree
from numpyro.handlers import substitute, trace
from numpyro.infer import NUTS

from data import ImagingDataset
from models import PARAM_SPECS, SolverConfig, ZincFluxRapidEquilibrium

from ._approx import Approximation, SVISettings, approximate
from ._laplace import LaplaceInit, laplace_init
from ._metric import METRICS, WHITENED_SITE, Whitened
from ._model import ImagingProblem, ParameterPlan, empirical_refs, imaging_model
from ._sampling import Checkpointing, chain_layout, sample_nuts


class SamplerConfig(eqx.Module):
    """NUTS settings.

    Attributes
    ----------
    num_warmup, num_samples : warmup (adaptation) and kept iterations per chain.
    num_chains : number of chains (>= 2 for R-hat).
    target_accept_prob : NUTS target acceptance probability.
    max_tree_depth : bound on the NUTS tree depth (2**depth - 1 gradient evaluations).
    chain_method : ``"sequential"`` (one chain after another), ``"vectorized"`` (all chains in one
        ``vmap``-ed program) or ``"sharded"`` (chains split over the devices, one block per device,
        each device's chains one after another; rows of batched solves are then not split;
        :func:`inference._sampling.chain_devices`). numpyro's ``"parallel"`` fails with diffrax on
        current versions.
    adapt_mass_matrix : whether warmup re-estimates the metric (dense; diagonal in the whitened
        coordinates of the block metric); by default the Laplace metric from the MAP is kept and
        only the step size is adapted.
    metric : the Laplace metric: ``"dense"`` (the inverse Hessian as a matrix, its Hessian from
        ``2 dim`` gradients), ``"block"`` (the same inverse, never formed: the block-arrow Hessian
        over cells from 36 gradients, 2 more to check it, and NUTS in whitened coordinates; :mod:`inference._metric`)
        or ``"auto"`` (block from :data:`inference._metric.BLOCK_METRIC_MIN_CELLS` cells).
    """

    num_warmup: int = 300
    num_samples: int = 300
    num_chains: int = 2
    target_accept_prob: float = 0.8
    max_tree_depth: int = 8
    chain_method: str = "sequential"
    adapt_mass_matrix: bool = False
    metric: str = "auto"

    def __check_init__(self):
        if self.num_warmup < 1 or self.num_samples < 1:
            raise ValueError(f"num_warmup and num_samples must be >= 1, got {self.num_warmup}, {self.num_samples}.")
        if self.num_chains < 1:
            raise ValueError(f"num_chains must be >= 1, got {self.num_chains}.")
        if not (0 < self.target_accept_prob < 1):
            raise ValueError(f"target_accept_prob must be in (0, 1), got {self.target_accept_prob}.")
        if not (1 <= self.max_tree_depth <= 12):
            raise ValueError(f"max_tree_depth must be in 1..12, got {self.max_tree_depth}.")
        if self.chain_method not in ("sequential", "vectorized", "sharded"):
            raise ValueError(f"chain_method must be 'sequential', 'vectorized' or 'sharded', got {self.chain_method!r}.")
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}.")


def build_problem(dataset: ImagingDataset, solver: SolverConfig = SolverConfig()) -> ImagingProblem:
    """Turn a validated imaging data set into the arrays the likelihood needs."""
    tr = dataset.traces
    segments = {k: dataset.segment_bounds(k) for k in ("fmin", "fmax")}
    f_min_ref, f_max_ref, sigma_ref = empirical_refs(tr.time_min, tr.intensity, tr.mask, segments)
    return ImagingProblem(
        model=ZincFluxRapidEquilibrium(dataset.protocol.to_inputs(dataset.end_min)),
        time_min=jnp.asarray(tr.time_min),
        intensity=jnp.asarray(np.where(tr.mask, tr.intensity, 0.0)),
        mask=jnp.asarray(tr.mask),
        f_min_ref=jnp.asarray(f_min_ref),
        f_max_ref=jnp.asarray(f_max_ref),
        sigma_ref=jnp.asarray(sigma_ref),
        solver=solver,
    )


# First step size of warmup under the Laplace metric, in which the posterior has unit scale.
# numpyro's dual averaging centres its search on 10x the first step size; from numpyro's default
# of 1 the first warmup iterations would try 10-sd leaps, from 0.1 they try steps of about one sd.
LAPLACE_STEP_SIZE = 0.1

CELL_SITES = ("f_min", "f_max", "log_dynamic_range", "bleach_rate_per_min", "sigma")
EXTRA_FIELDS = ("diverging", "num_steps", "accept_prob", "potential_energy", "energy", "adapt_state.step_size")


def population_var_names(plan: ParameterPlan) -> list[str]:
    """Posterior variables that describe the population (the summary table rows)."""
    names = list(plan.sampled)
    names += [f"{n}_sd_log" for n in plan.per_cell]
    return names


@dataclasses.dataclass
class FitResult:
    """A finished fit: the DataTree, the plan it used, the MAP and (``map`` / ``svi``) the approximation."""

    tree: xr.DataTree
    plan: ParameterPlan
    problem: ImagingProblem
    laplace: LaplaceInit
    approximation: Approximation | None = None


def find_map(model, model_args, *, key, num_starts: int = 1, host_loop: bool = True, **kwargs) -> LaplaceInit:
    """MAP and Laplace covariance (:func:`inference._laplace.laplace_init`) from ``num_starts`` starts.

    ``host_loop`` (the default; always with several starts): the L-BFGS iterations and Hessian
    columns are driven from the host around one compiled value and gradient of the potential,
    one copy of the ODE gradient to compile instead of one per place a single jitted search
    evaluates it. Otherwise one jitted optax search. Several starts: the prior medians plus
    ``num_starts - 1`` prior draws, each explored briefly, the lowest refined.
    """
    return laplace_init(model, model_args, key=key, num_starts=num_starts, host_loop=host_loop or num_starts > 1,
                        **kwargs)


@chain_layout
def run_nuts(problem: ImagingProblem, plan: ParameterPlan, config: SamplerConfig, *, key,
             cell_id, progress_bar: bool = True, checkpoint: Checkpointing | None = None, method: str = "nuts",
             map_starts: int = 1, approx_draws: int = 2000, svi: SVISettings = SVISettings(),
             predictive_cells: str | int = "auto") -> FitResult:
    """Fit the hierarchical imaging model and collect every output group.

    ``method="nuts"``: NUTS started at the MAP with the Laplace metric. ``"map"`` or ``"svi"``:
    ``approx_draws`` draws of the Laplace or SVI Gaussian (:mod:`inference._approx`) as one
    pseudo-chain, ``tree.attrs["method"]`` ``"laplace"`` / ``"svi"``; no sampler diagnostics.

    Returns a :class:`FitResult` whose ``tree`` has groups ``posterior``,
    ``posterior_predictive``, ``log_likelihood``, ``sample_stats`` (with ``solver_failures``
    per draw), ``observed_data`` and ``constant_data``, with dims ``cell`` and ``time``.
    With ``checkpoint``, sampling saves its progress and can resume (:mod:`inference._sampling`).
    ``predictive_cells``: the cells whose per-frame outputs are kept (:func:`assemble_tree`); the
    default ``"auto"`` keeps every cell's while they fit in :data:`PREDICTIVE_BUDGET` values.
    """
    k_init, k_jitter, k_mcmc, k_ppc = jax.random.split(key, 4)
    laplace = find_map(imaging_model, (problem, plan), key=k_init, num_starts=map_starts, metric=config.metric,
                       log=_map_progress if progress_bar else None)
    if progress_bar:
        search = "Newton" if laplace.metric == "block" else "L-BFGS"
        print(f"MAP: potential {float(laplace.potential):.6g} after {int(laplace.num_iter)} {search} iterations "
              f"(gradient norm {float(laplace.grad_norm):.3g}); {laplace.metric} Laplace metric", flush=True)
    if method != "nuts":
        approx = approximate(imaging_model, (problem, plan), laplace, method=method, key=k_mcmc,
                             num_draws=approx_draws, svi=svi, progress_bar=progress_bar, deterministic=False)
        tree = assemble_tree(problem, plan, approx.samples, None, key=k_ppc, cell_id=cell_id, max_tree_depth=0,
                             predictive_cells=predictive_cells)
        tree.attrs["method"] = approx.method
        return FitResult(tree=tree, plan=plan, problem=problem, laplace=laplace, approximation=approx)
    whitened = laplace.metric == "block"
    init_params = chain_starts(laplace, config.num_chains, key=k_jitter, potential_model=(imaging_model, problem, plan),
                               whitened=whitened)
    settings = dict(target_accept_prob=config.target_accept_prob, max_tree_depth=config.max_tree_depth,
                    adapt_mass_matrix=config.adapt_mass_matrix, step_size=LAPLACE_STEP_SIZE)
    if whitened:  # NUTS on u, x = MAP + W u, with a unit metric: the Laplace metric W W^T on x
        space = Whitened(imaging_model, (problem, plan), laplace.flat_map, laplace.factor)
        kernel = NUTS(space.model, dense_mass=False, **settings)
    else:
        kernel = NUTS(imaging_model, dense_mass=True, inverse_mass_matrix=laplace.inverse_mass_matrix, **settings)
    # the deterministic sites (a forward solve of every cell) come from assemble_tree's pass over
    # the draws, not from the sampling program: one solve less to compile there
    samples, extra = sample_nuts(kernel, config, key=k_mcmc, model_args=(problem, plan), init_params=init_params,
                                 extra_fields=EXTRA_FIELDS, progress_bar=progress_bar, checkpoint=checkpoint,
                                 deterministic=False)
    if whitened:
        samples = space.draws(samples[WHITENED_SITE])
    tree = assemble_tree(problem, plan, samples, extra, key=k_ppc, cell_id=cell_id,
                         max_tree_depth=config.max_tree_depth, predictive_cells=predictive_cells)
    tree.attrs["method"] = "nuts"
    tree.attrs["metric"] = laplace.metric
    return FitResult(tree=tree, plan=plan, problem=problem, laplace=laplace)


def _map_progress(start: int, iteration: int, potential: float, grad_norm: float) -> None:
    if iteration % 25 == 0:
        print(f"MAP search (start {start}): iteration {iteration}, potential {potential:.6g}", flush=True)


def chain_starts(laplace: LaplaceInit, num_chains: int, *, key, potential_model, scale: float = 0.5,
                 whitened: bool = False):
    """Dispersed chain starts: MAP + ``scale`` * Laplace draws, MAP wherever that is not finite.

    Over-dispersed starts keep R-hat meaningful; each start is checked against the potential so
    that no chain begins where the ODE solve fails. ``potential_model`` is ``(model, *model_args)``.
    ``whitened``: the starts as ``{WHITENED_SITE: u}`` for a :class:`inference._metric.Whitened`
    model (``MAP + W u`` is the point), instead of the model's unconstrained sites.
    """
    from numpyro.infer.util import potential_energy

    model, *model_args = potential_model
    dim = laplace.flat_map.shape[0]
    eps = scale * jax.random.normal(key, (num_chains, dim))
    if whitened or laplace.inverse_mass_matrix is None:
        eps = eps.astype(laplace.flat_map.dtype)
        flats = laplace.flat_map + jax.vmap(laplace.factor.apply)(eps)
    else:
        chol = jnp.linalg.cholesky(laplace.inverse_mass_matrix + 1e-12 * jnp.eye(dim))
        flats = laplace.flat_map + eps @ chol.T
    _, unravel = ravel_pytree(laplace.z_map)

    if laplace.value_and_grad is not None:  # the MAP search's compiled potential: nothing more to compile
        finite = jnp.asarray([bool(np.isfinite(laplace.value_and_grad(flat)[0])) for flat in flats])
        flats = jnp.where(finite[:, None], flats, laplace.flat_map)
        if whitened:
            starts = {WHITENED_SITE: jnp.where(finite[:, None], eps, 0.0)}
            return jax.tree.map(lambda a: a[0], starts) if num_chains == 1 else starts
    elif whitened:
        raise ValueError("whitened chain starts need the MAP search's compiled potential (host_loop=True).")
    else:
        @jax.jit
        def check(flat):
            pe = potential_energy(model, tuple(model_args), {}, unravel(flat))
            return jnp.where(jnp.isfinite(pe), flat, laplace.flat_map)

        flats = jax.vmap(check)(flats)
    starts = jax.vmap(unravel)(flats)
    if num_chains == 1:
        starts = jax.tree.map(lambda a: a[0], starts)
    return starts


def _flatten(samples):
    return {k: v.reshape((-1,) + v.shape[2:]) for k, v in samples.items()}


def sample_stats(extra: dict, solver_failures, max_tree_depth: int) -> dict:
    """The ``sample_stats`` group from numpyro's extra fields (grouped by chain) and failure counts.

    ``solver_failures`` per draw: failed rows at the kept point (0 for NUTS, whose accepted points
    have a finite density) plus, where :func:`inference._sampling.sample_nuts` counted them, the
    failed solves inside the draw's trajectory. ``extra=None`` (draws of an approximation): only
    ``solver_failures``.
    """
    if extra is None:
        return {"solver_failures": np.asarray(solver_failures).astype(int)}
    steps = np.asarray(extra["num_steps"])
    if "solver_failures_in_trajectory" in extra:
        solver_failures = np.asarray(solver_failures) + np.asarray(extra["solver_failures_in_trajectory"])
    stats = {
        "diverging": np.asarray(extra["diverging"]),
        "n_steps": steps,
        "tree_depth": np.floor(np.log2(np.maximum(steps, 1))).astype(int) + 1,
        "acceptance_rate": np.asarray(extra["accept_prob"]),
        "lp": -np.asarray(extra["potential_energy"]),
        "energy": np.asarray(extra["energy"]),
        "step_size": np.asarray(extra["adapt_state.step_size"]),
        "solver_failures": np.asarray(solver_failures).astype(int),
    }
    stats["reached_max_tree_depth"] = stats["tree_depth"] > max_tree_depth
    return stats


#: ``predictive_cells = "auto"`` keeps the per-frame outputs of every cell while each
#: ``(draw, cell, time)`` array holds at most this many values (256 MiB in float64)
PREDICTIVE_BUDGET = 2**25


def predictive_subset(setting: str | int, num_cells: int, num_draws: int, num_frames: int) -> np.ndarray | None:
    """Indices of the cells whose per-frame outputs a fit keeps, or ``None`` for every cell.

    ``setting``: ``"all"``; a number of cells; or ``"auto"``, every cell while
    ``num_draws * num_cells * num_frames <= PREDICTIVE_BUDGET``, else as many cells as that
    budget holds (at least 1). A subset is spread evenly over the cells' order.
    """
    if setting == "all":
        return None
    if setting == "auto":
        keep = max(1, PREDICTIVE_BUDGET // max(1, num_draws * num_frames))
    elif isinstance(setting, (int, np.integer)) and not isinstance(setting, bool) and setting >= 1:
        keep = int(setting)
    else:
        raise ValueError(f'predictive_cells must be "auto", "all" or a number of cells >= 1, got {setting!r}.')
    if keep >= num_cells:
        return None
    return np.unique(np.linspace(0, num_cells - 1, keep).round().astype(int))


def pointwise_intensity(problem: ImagingProblem, plan: ParameterPlan, samples: dict, key,
                        keep: np.ndarray | None = None):
    """Log likelihood of every observation, one posterior predictive draw of every frame, and the
    deterministic sites, per draw.

    One pass of the model per draw (``lax.map``, one compiled program): the likelihood site's
    distribution gives both its log density at the data (0 where the mask drops a frame, as
    numpyro's ``log_likelihood``) and a draw of the noise model (every frame, masked or not, as
    ``Predictive`` with ``predictive=True``); the same pass gives the deterministic sites
    (``zc_nM``, ``solver_failures``, the per-cell values), so that NUTS need not compute them in
    its sampling program. Returns two ``(draw, cell, time)`` arrays and a dict of the
    deterministic sites, leading dimension ``draw``.

    ``keep`` (cell indices): the log likelihood, the predictive draws and the per-frame
    deterministic sites (``zc_nM``) are kept for the cells in ``keep`` only, ``(draw, len(keep),
    time)``, inside the compiled pass, so memory grows with ``len(keep)``, not with the cells.
    The kept values equal those of the full pass with the same ``key``.
    """
    keys = jax.random.split(key, next(iter(samples.values())).shape[0])
    idx = None if keep is None else jnp.asarray(keep)

    @jax.jit
    def run(samples, keys):
        def one(args):
            sample, k = args
            tr = trace(substitute(imaging_model, data=sample)).get_trace(problem, plan)
            site = tr["intensity"]
            det = {name: s["value"] for name, s in tr.items() if s["type"] == "deterministic"}
            ll, pp = site["fn"].log_prob(site["value"]), site["fn"].sample(k)
            if idx is None:
                return ll, pp, det
            det = {name: v[idx] if v.shape == ll.shape else v for name, v in det.items()}
            return ll[idx], pp[idx], det

        return jax.lax.map(one, (samples, keys))

    return run(samples, keys)


def assemble_tree(problem: ImagingProblem, plan: ParameterPlan, samples: dict, extra: dict | None, *,
                  key, cell_id, max_tree_depth: int, predictive_cells: str | int = "all") -> xr.DataTree:
    """Build the arviz DataTree from grouped-by-chain samples and sampler extra fields.

    ``predictive_cells`` (:func:`predictive_subset`): where it keeps a subset of the cells,
    ``log_likelihood/intensity``, ``posterior_predictive/intensity`` and ``posterior/zc_nM`` hold
    the kept cells only, on dim ``predictive_cell`` (coordinate: their ids), and every other
    variable keeps every cell. Otherwise all are on dim ``cell``. Either way the attribute
    ``predictive_cells`` of the tree says how many cells have per-frame outputs.
    """
    samples = {k: np.asarray(v) for k, v in samples.items()}
    num_chains, num_draws = next(iter(samples.values())).shape[:2]
    flat = _flatten({k: v for k, v in samples.items() if k not in ("solver_failures",)})
    flat_j = {k: jnp.asarray(v) for k, v in flat.items()}
    keep = predictive_subset(predictive_cells, problem.num_cells, num_chains * num_draws, problem.time_min.shape[0])
    ll, ppc, det = pointwise_intensity(problem, plan, flat_j, key, keep)

    def by_chain(a):
        a = np.asarray(a)
        return a.reshape((num_chains, num_draws) + a.shape[1:])

    # NUTS leaves the deterministic sites out of its draws (run_nuts): they come from this pass
    # (nor do run_nuts's draws of an approximation; a caller's draws that carry them keep theirs, but
    # the per-frame ones are replaced by the pass's, which hold the kept cells only)
    samples.update({k: by_chain(v) for k, v in det.items() if k not in samples or v.shape[1:] == ppc.shape[1:]})

    posterior = {k: v for k, v in samples.items() if k != "solver_failures"}
    stats = sample_stats(extra, samples["solver_failures"], max_tree_depth)
    mask = np.asarray(problem.mask)
    observed = np.where(mask, np.asarray(problem.intensity), np.nan)
    protocol = problem.model.protocol
    constant = {
        "time_min": np.asarray(problem.time_min),
        "mask": mask,
        "f_min_ref": np.asarray(problem.f_min_ref),
        "f_max_ref": np.asarray(problem.f_max_ref),
        "sigma_ref": np.asarray(problem.sigma_ref),
        "segment_start_min": np.asarray(protocol.start_min),
        "segment_zn_ext_uM": np.asarray(protocol.zn_ext_uM),
    }
    for name, value in plan.fixed.items():
        constant[f"fixed_{name}"] = np.asarray(float(value))
    cells = [f"{n}_z" for n in plan.per_cell] + [f"{n}_cell" for n in plan.per_cell] + list(CELL_SITES)
    cells = [c for c in cells if c in posterior]
    dims = {name: ["cell"] for name in cells}
    frames = ["cell", "time"] if keep is None else ["predictive_cell", "time"]
    dims.update({
        "zc_nM": frames, "intensity": ["cell", "time"], "mask": ["cell", "time"],
        "time_min": ["time"], "f_min_ref": ["cell"], "f_max_ref": ["cell"], "sigma_ref": ["cell"],
        "segment_start_min": ["segment"], "segment_zn_ext_uM": ["segment"],
    })
    coords = {
        "cell": list(cell_id),
        "time": np.asarray(problem.time_min),
        "segment": list(protocol.kind),
    }
    if keep is not None:
        coords["predictive_cell"] = [cell_id[i] for i in keep]
    groups = {
        "posterior": posterior,
        "sample_stats": stats,
        "observed_data": {"intensity": observed},
        "constant_data": constant,
    }
    per_frame = {"posterior_predictive": {"intensity": by_chain(ppc)}, "log_likelihood": {"intensity": by_chain(ll)}}
    if keep is None:
        groups.update(per_frame)
    tree = from_dict(groups, coords=coords, dims=dims)
    if keep is not None:  # their own dims: "intensity" is on ("cell", "time") in observed_data
        kept = from_dict(per_frame, coords=coords, dims={"intensity": frames})
        for name in per_frame:
            tree[name] = kept[name]
    tree.attrs.update({"time_unit": "min", "model": "ZincFluxRapidEquilibrium",
                       "parameterization": "centered" if plan.centered else "noncentered",
                       "predictive_cells": problem.num_cells if keep is None else len(keep)})
    units = {name: spec.unit for name, spec in PARAM_SPECS.items()}
    post = tree["posterior"]
    for name in list(post.data_vars):
        base = name.removesuffix("_cell")
        if base in units:
            post[name].attrs["units"] = units[base]
    return tree

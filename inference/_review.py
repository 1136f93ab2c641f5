r"""Posterior review: prior draws, prior predictive checks, pointwise data for LOO, profile likelihoods.

Profile likelihoods. For a population parameter $\theta_p$ the profile is

$$ \mathrm{PL}(\theta_p) = \max_{\psi} \; \ell(\theta_p, \psi), \qquad
   \ell = \log p(y \mid \theta, u) + \log p(u \mid \theta) + \log p(\tau) + \log|J_{u,\tau}| $$

where $y$ are the data, $u$ the per-cell / per-unit values and observation parameters (their
population distributions and priors stay in), $\tau$ the hierarchical spreads (``*_sd``,
``*_sd_log``; their priors stay in, since without them the joint mode runs off to zero spread),
and $\psi$ everything but $\theta_p$. The priors of the profiled population parameters are left
out, so a flat profile means the *data* do not determine the parameter. The maximisation runs in
numpyro's unconstrained coordinates (the MAP's) with optax's L-BFGS, $\theta_p$ fixed at each
grid value. The grid steps outward from the optimum on both sides, in posterior sds near it and
geometrically beyond, out to at least the 1-99% range of the prior and the 0.5-99.5% range of the
posterior (unconstrained coordinate); each grid value starts from its inner neighbour's solution
(continuation), and all parameters and sides run at once (``vmap`` over lanes). L-BFGS runs in
coordinates whitened by the posterior covariance (conditional on the fixed coordinate).

A parameter is *identified* when the profile drops by more than $\chi^2_{1,0.95}/2 = 1.92$ below
its maximum on both sides within the grid (the 95% profile-likelihood interval is then finite);
*flat* when it drops by less on both sides (Raue et al. 2009, "Structural and practical
identifiability analysis of partially observed dynamical models by exploiting the profile
likelihood", Bioinformatics 25:1923); one-sided otherwise.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import optax
import pandas as pd
import xarray as xr
from arviz_base import from_dict
from jax.flatten_util import ravel_pytree
from numpyro import handlers
from numpyro.distributions import biject_to
from numpyro.infer import Predictive
from numpyro.infer.util import constrain_fn, log_density, unconstrain_fn

from ._target import Target, flat_draws


# chi^2_1 95% quantile / 2: the drop of the log profile likelihood that bounds a 95% interval
PROFILE_THRESHOLD = 0.5 * 3.841458820694124


class _Collected(Exception):
    """Raised by :class:`_StopWhenSeen` once every wanted site has a value."""


class _StopWhenSeen(numpyro.primitives.Messenger):
    """Record the values of the named sites and stop the model as soon as all are known, before
    it reaches its ODE solves.
    """

    def __init__(self, fn, names):
        self.names = set(names)
        self.seen = {}
        super().__init__(fn)

    def postprocess_message(self, msg):
        if msg["name"] in self.names and msg["type"] in ("sample", "deterministic"):
            self.seen[msg["name"]] = msg["value"]
            if len(self.seen) == len(self.names):
                raise _Collected


def prior_draws(target: Target, num: int, *, key, names=None) -> dict:
    """``num`` prior draws of the named variables (default: the population variables).

    Only the part of the model up to the last of these variables runs, so no ODE is solved when
    they are all sampled before the solve (as in every zinckin model).
    """
    names = list(target.names if names is None else names)

    def one(k):
        stop = _StopWhenSeen(target.model, names)
        try:
            with handlers.seed(rng_seed=k):
                stop(*target.args)
        except _Collected:
            pass
        return dict(stop.seen)

    draws = jax.jit(jax.vmap(one))(jax.random.split(key, num))
    return {k: np.asarray(v) for k, v in draws.items()}


@dataclasses.dataclass
class PriorCheck:
    """A prior predictive check: the DataTree (prior draws in ``posterior``, their simulated data
    in ``posterior_predictive``), the number of draws made and of draws whose solve failed.
    """

    tree: xr.DataTree
    num_draws: int
    failed: int


def prior_predictive(target: Target, num: int, *, key) -> PriorCheck:
    """Draw parameters from the priors, solve the model and simulate data (draws whose solve
    fails are counted and left out).
    """
    k_prior, k_obs = jax.random.split(key)
    samples = Predictive(target.model, num_samples=num)(k_prior, *target.args)
    # factor sites (``numpyro.factor``) come back as empty arrays
    samples = {k: np.asarray(v) for k, v in samples.items() if k not in target.obs_sites and np.size(v) > 0}
    failures = samples.get("solver_failures", np.zeros(num, dtype=int))
    latent_finite = np.all([np.isfinite(v.reshape(num, -1)).all(1) for v in samples.values()], axis=0)
    keep = (np.asarray(failures).reshape(num) == 0) & latent_finite
    if not keep.any():
        raise RuntimeError(f"every one of the {num} prior draws failed to solve; the priors put the model where it cannot "
                           "be integrated. Fix: narrow the priors (or raise [solver] max_steps) and check again.")
    samples = {k: v[keep][None] for k, v in samples.items()}
    tree = target.build_tree(samples, k_obs)
    return PriorCheck(tree=tree, num_draws=num, failed=int((~keep).sum()))


def per_frame_cells(tree: xr.DataTree) -> list[str] | None:
    """The cells whose per-frame log likelihood an imaging fit kept (``[output]
    predictive_cells``), or ``None`` where there is no cell dimension (other fits).
    """
    ll = tree["log_likelihood"]
    for dim in ("predictive_cell", "cell"):
        if dim in ll.dims:
            return [str(c) for c in ll[dim].values]
    return None


def pointwise(tree: xr.DataTree, *, max_draws: int | None = None, max_obs: int | None = None,
              seed: int = 0, cells: list[str] | None = None) -> xr.DataTree:
    """All observations of a fit as one variable ``y`` (dim ``obs``): ``observed_data``,
    ``log_likelihood``, ``posterior_predictive`` and the posterior's scalar variables, with
    missing (masked) observations left out. Several observation sites (data sets, observables)
    are concatenated in the order of ``log_likelihood`` (coordinate ``site`` of ``obs``).
    ``max_draws`` thins every chain evenly to about ``max_draws`` draws in all (before loading);
    ``max_obs`` keeps a random subset of that many observations (in their order), attribute
    ``num_observations`` of the result holds the total.

    An imaging fit that kept per-frame draws for a subset of its cells (dim ``predictive_cell``)
    gives the observations of those cells. ``cells``: only these cells' observations (imaging
    fits; every one must have per-frame values), e.g. the cells that several runs share.
    """
    sites = list(tree["log_likelihood"].data_vars)
    chains, draws = tree["log_likelihood"].sizes["chain"], tree["log_likelihood"].sizes["draw"]
    step = 1 if max_draws is None else max(1, int(np.ceil(chains * draws / max_draws)))
    keep_draws = slice(None, None, step)

    def values(group, site):
        a = tree[group][site].isel(draw=keep_draws)
        if "predictive_cell" in a.dims:
            a = a.rename(predictive_cell="cell")
        if cells is not None and "cell" in a.dims:
            a = a.sel(cell=cells)
        return np.asarray(a).reshape(a.shape[:2] + (-1,))

    obs, ll, pp, labels = [], [], [], []
    for site in sites:
        observed = tree["observed_data"][site]
        per_frame = tree["log_likelihood"][site]
        if cells is not None and "cell" in observed.dims:
            observed = observed.sel(cell=cells)
        elif "predictive_cell" in per_frame.dims:  # the cells with per-frame values, in their order
            observed = observed.sel(cell=per_frame["predictive_cell"].values)
        o = np.asarray(observed, dtype=float).ravel()
        keep = np.isfinite(o)
        obs.append(o[keep])
        ll.append(values("log_likelihood", site)[..., keep])
        pp.append(values("posterior_predictive", site)[..., keep])
        labels += [site] * int(keep.sum())
    post = {n: np.asarray(v.isel(draw=keep_draws)) for n, v in tree["posterior"].data_vars.items()
            if v.dims == ("chain", "draw")}
    groups = {
        "posterior": post,
        "log_likelihood": {"y": np.concatenate(ll, axis=-1)},
        "posterior_predictive": {"y": np.concatenate(pp, axis=-1)},
        "observed_data": {"y": np.concatenate(obs)},
    }
    labels = np.asarray(labels)
    total = labels.size
    if max_obs is not None and total > max_obs:
        pick = np.sort(np.random.default_rng(seed).choice(total, size=max_obs, replace=False))
        groups = {"posterior": post, "log_likelihood": {"y": groups["log_likelihood"]["y"][..., pick]},
                  "posterior_predictive": {"y": groups["posterior_predictive"]["y"][..., pick]},
                  "observed_data": {"y": groups["observed_data"]["y"][pick]}}
        labels = labels[pick]
    out = from_dict(groups, dims={"y": ["obs"]}, coords={"obs": np.arange(len(labels))})
    out["observed_data"] = out["observed_data"].to_dataset().assign_coords(site=("obs", labels))
    out.attrs["num_observations"] = total
    return out


# ----------------------------------------------------------------------------- profile likelihood


def _latent_sites(target: Target) -> dict:
    """The model's latent sample sites (name -> trace site), from one traced run."""
    tr = handlers.trace(handlers.seed(target.model, 0)).get_trace(*target.args)
    return {n: s for n, s in tr.items() if s["type"] == "sample" and not s["is_observed"]}


def profile_names(target: Target, latent: dict) -> list[str]:
    """Population parameters that can be profiled: scalar latent sample sites among the
    population variables, without the hierarchical spreads.
    """
    return [n for n in target.names if n in latent and jnp.shape(latent[n]["value"]) == ()
            and not (n.endswith("_sd") or n.endswith("_sd_log"))]


def _objective(target: Target, profiled: list[str]):
    """The negative of the profile objective (module docstring) as a function of the unconstrained sites."""
    model, args = target.model, target.args

    def neg_ell(u: dict):
        params = constrain_fn(model, args, {}, u)
        lp, tr = log_density(model, args, {}, params)
        for name, site in tr.items():
            if site["type"] != "sample" or site["is_observed"]:
                continue
            if name in profiled:
                lp = lp - jnp.sum(site["fn"].log_prob(site["value"]))
            else:
                lp = lp + jnp.sum(biject_to(site["fn"].support).log_abs_det_jacobian(u[name], site["value"]))
        return -lp

    return neg_ell


# L-BFGS stops when the gradient norm is below ``tol`` or when the objective has not improved by
# more than STALL_FTOL (log-likelihood units, far below the 1.92 that decides a verdict) over
# STALL_ITER iterations: ODE-solver error puts a noise floor under the gradient (about 1e-3 on
# the imaging example at rtol 1e-6) that a pure gradient test never passes.
STALL_FTOL = 1e-3
STALL_ITER = 20


def _minimize(f, x0, *, max_iter: int, tol: float):
    """L-BFGS (optax) from ``x0``; returns ``(x, f(x), iterations, converged)`` (module notes)."""
    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(f)

    def body(carry):
        x, state, i, _, f_ref, since = carry
        value, grad = value_and_grad(x, state=state)
        updates, state = opt.update(grad, state, x, value=value, grad=grad, value_fn=f)
        better = f_ref - value > STALL_FTOL
        return (optax.apply_updates(x, updates), state, i + 1, optax.tree.norm(grad),
                jnp.where(better, value, f_ref), jnp.where(better, 0, since + 1))

    def cond(carry):
        _, _, i, gnorm, _, since = carry
        return (i < max_iter) & (gnorm > tol) & (since < STALL_ITER)

    inf = jnp.asarray(jnp.inf, x0.dtype)
    x, _, iters, gnorm, _, since = jax.lax.while_loop(cond, body, (x0, opt.init(x0), 0, inf, inf, 0))
    return x, f(x), iters, (gnorm <= tol) | (since >= STALL_ITER)


@dataclasses.dataclass
class Profiles:
    """Profile likelihoods of a fit.

    ``curves``: one row per (parameter, grid value): ``value`` (constrained units), ``delta``
    (log profile likelihood below the overall maximum; NaN where the optimisation failed),
    ``iterations``, ``converged``. ``table``: one row per parameter: the maximising value, the 95%
    profile interval (NaN where the profile does not fall below the threshold on that side within
    the grid) and ``verdict`` ("identified", "flat", "flat below", "flat above").
    """

    curves: pd.DataFrame
    table: pd.DataFrame


def profile_likelihoods(target: Target, tree: xr.DataTree, *, names=None, num_points: int = 20, key,
                        max_iter: int = 500, tol: float = 1e-4, num_prior_draws: int = 2000,
                        log=lambda line: None) -> Profiles:
    """Profile likelihoods of the population parameters of a finished fit (module docstring).

    The unrestricted optimisation starts from the posterior draw of highest log density. The
    profiles then step outward from it, ``num_points // 2`` grid values per side
    (:func:`_side_offsets`), each started from the previous value's solution (continuation); all
    parameters and both sides run at once (``vmap`` over lanes). ``names`` defaults to
    :func:`profile_names`. ``log`` gets one line per step.
    """
    import time

    latent = _latent_sites(target)
    names = profile_names(target, latent) if names is None else list(names)
    unknown = [n for n in names if n not in profile_names(target, latent)]
    if unknown:
        raise ValueError(f"cannot profile {unknown}: profiles exist for the scalar population parameters "
                         f"{profile_names(target, latent)}.")
    post = tree["posterior"]
    missing = [n for n in latent if n not in post]
    if missing:
        raise ValueError(f"the run's posterior lacks the latent sites {missing}; it cannot start the profiles.")
    if "lp" in tree.get("sample_stats", xr.Dataset()):
        best = int(np.nanargmax(np.asarray(tree["sample_stats"]["lp"]).ravel()))
    else:
        best = 0
    start = {n: jnp.asarray(np.asarray(post[n]).reshape((-1,) + post[n].shape[2:])[best]) for n in latent}
    u0 = unconstrain_fn(target.model, target.args, {}, start)
    flat0, unravel = ravel_pytree(u0)
    neg_ell = _objective(target, names)
    f = jax.jit(lambda x: neg_ell(unravel(x)))
    offsets, pos = {}, 0
    for n in sorted(u0):  # ravel_pytree lays a dict out in sorted-key order
        offsets[n] = pos
        pos += int(np.size(u0[n]))

    # Posterior covariance of the unconstrained coordinates: L-BFGS runs in coordinates whitened
    # by it (as NUTS runs under the Laplace metric); without, it crawls along the hierarchical
    # model's correlated directions for hundreds of iterations.
    draws = flat_draws(post, sorted(u0), max_draws=1000)
    cols = [np.asarray(biject_to(latent[n]["fn"].support).inv(jnp.asarray(draws[n]))).reshape(len(draws[n]), -1)
            for n in sorted(u0)]
    cov = np.cov(np.concatenate(cols, axis=1), rowvar=False).reshape(flat0.size, flat0.size)
    cov = cov + 1e-10 * np.diag(np.maximum(np.diag(cov), 1e-12)) + 1e-14 * np.eye(flat0.size)
    chol = jnp.asarray(np.linalg.cholesky(cov))

    @jax.jit
    def optimum(x):
        z, _, _, ok = _minimize(lambda z: f(x + chol @ z), jnp.zeros_like(x), max_iter=max_iter, tol=tol)
        x = x + chol @ z
        return x, f(x), ok

    x_opt, f_opt, opt_ok = optimum(flat0)
    if not np.isfinite(float(f_opt)):
        raise RuntimeError("the profile optimisation could not evaluate the likelihood at the fit's best draw "
                           "(failed solve); no profiles computed.")
    prior = prior_draws(target, num_prior_draws, key=key, names=names)
    post_flat = flat_draws(post, names)
    steps = max(num_points // 2, 3)
    grids = np.stack([_side_offsets(biject_to(latent[n]["fn"].support).inv, prior[n], post_flat[n],
                                    float(x_opt[offsets[n]]), steps) for n in names])  # (params, 2, steps)

    def conditional(i):
        """Whitening factor of the other coordinates given coordinate i (row and column i zero)
        and the regression of all coordinates on coordinate i.
        """
        rest = np.delete(np.arange(flat0.size), i)
        b = cov[:, i] / cov[i, i]
        c = cov[np.ix_(rest, rest)] - np.outer(cov[rest, i], cov[i, rest]) / cov[i, i]
        m = np.zeros_like(cov)
        m[np.ix_(rest, rest)] = np.linalg.cholesky(c + 1e-14 * np.eye(rest.size))
        return m, b

    per = [conditional(offsets[n]) for n in names]
    lanes_i = jnp.asarray(np.repeat([offsets[n] for n in names], 2))
    lanes_m = jnp.asarray(np.repeat(np.stack([m for m, _ in per]), 2, axis=0))
    lanes_b = jnp.asarray(np.repeat(np.stack([b for _, b in per]), 2, axis=0))

    @jax.jit
    def step(i, m, b, v, x_prev):
        """One grid value per lane (parameter x side), each started from the lane's previous
        solution moved along the posterior regression on the fixed coordinate.
        """
        def lane(i, m, b, v, x_prev):
            x0 = x_prev + b * (v - x_prev[i])  # b[i] = 1: x0[i] = v
            z, _, iters, converged = _minimize(lambda z: f(x0 + m @ z), jnp.zeros_like(x0), max_iter=max_iter,
                                               tol=tol)
            x = x0 + m @ z
            val = f(x)
            return jnp.where(jnp.isfinite(val), x, x_prev), val, iters, converged

        return jax.vmap(lane)(i, m, b, v, x_prev)

    rows = []
    x = jnp.tile(x_opt, (len(names) * 2, 1))
    t0 = time.perf_counter()
    for j in range(steps):  # outward from the optimum: continuation, all parameters and sides at once
        x, values, iters, converged = step(lanes_i, lanes_m, lanes_b, jnp.asarray(grids[:, :, j].reshape(-1)), x)
        for lane, (val, it, ok) in enumerate(zip(np.asarray(values), np.asarray(iters), np.asarray(converged))):
            n = names[lane // 2]
            u = float(grids[lane // 2, lane % 2, j])
            rows.append({"parameter": n, "u": u, "value": float(biject_to(latent[n]["fn"].support)(jnp.asarray(u))),
                         "neg_ell": float(val), "iterations": int(it), "converged": bool(ok)})
        log(f"  step {j + 1} of {steps} ({2 * len(names)} profiles at once): {time.perf_counter() - t0:.0f} s, "
            f"L-BFGS iterations {int(np.min(iters))}-{int(np.max(iters))}, {int(np.sum(converged))} converged")
    for n in names:
        i = offsets[n]
        rows.append({"parameter": n, "u": float(x_opt[i]),
                     "value": float(biject_to(latent[n]["fn"].support)(x_opt[i])), "neg_ell": float(f_opt),
                     "iterations": 0, "converged": bool(opt_ok)})
    curves = pd.DataFrame(rows)
    curves.loc[~np.isfinite(curves["neg_ell"]), "neg_ell"] = np.nan
    best_all = min(float(f_opt), float(curves["neg_ell"].min(skipna=True)))  # the optimum row is always finite
    curves["delta"] = curves["neg_ell"] - best_all
    curves = curves.sort_values(["parameter", "u"], kind="stable").reset_index(drop=True)
    return Profiles(curves=curves, table=_verdicts(curves, names))


def _side_offsets(to_u, prior, post, u_opt: float, steps: int) -> np.ndarray:
    """Grid values below and above the optimum ``u_opt`` (unconstrained), ``(2, steps)``, ordered
    outward: half to two posterior sds in half-sd steps, three sds, then geometric steps out to
    the farther of four posterior sds and the 1-99% prior range (0.5-99.5% posterior).
    """
    pr = np.asarray(to_u(jnp.asarray(prior)))
    po = np.asarray(to_u(jnp.asarray(post)))
    sd = max(float(np.nanstd(po)), 1e-3 * max(1.0, abs(u_opt)))
    lo = min(np.nanquantile(pr, 0.01), np.nanquantile(po, 0.005))
    hi = max(np.nanquantile(pr, 0.99), np.nanquantile(po, 0.995))
    near = sd * np.array([0.5, 1.0, 1.5, 2.0, 3.0])[:steps]
    out = []
    for sign, reach in ((-1.0, u_opt - lo), (1.0, hi - u_opt)):
        far_n = steps - near.size
        far = np.geomspace(4 * sd, max(reach, 6 * sd), far_n) if far_n > 0 else np.empty(0)
        out.append(u_opt + sign * np.concatenate([near, far]))
    return np.stack(out)


def _crossing(u, d, side: str):
    """The unconstrained value where the profile first rises above the threshold on ``side`` of
    its minimum (linear interpolation), or NaN.
    """
    k = int(np.nanargmin(d))
    rng = range(k - 1, -1, -1) if side == "lower" else range(k + 1, len(d))
    prev = k
    for j in rng:
        if np.isfinite(d[j]) and d[j] > PROFILE_THRESHOLD:
            w = (PROFILE_THRESHOLD - d[prev]) / (d[j] - d[prev])
            return u[prev] + w * (u[j] - u[prev])
        if np.isfinite(d[j]):
            prev = j
    return np.nan


def _verdicts(curves: pd.DataFrame, names) -> pd.DataFrame:
    rows = []
    for n in names:
        c = curves[curves["parameter"] == n]
        u, d, v = c["u"].to_numpy(), c["delta"].to_numpy(), c["value"].to_numpy()
        k = int(np.nanargmin(d))  # the unrestricted optimum's row is finite, so never all-NaN
        lo_u, hi_u = _crossing(u, d, "lower"), _crossing(u, d, "upper")
        lo = np.interp(lo_u, u, v) if np.isfinite(lo_u) else np.nan
        hi = np.interp(hi_u, u, v) if np.isfinite(hi_u) else np.nan
        if np.isfinite(lo) and np.isfinite(hi):
            verdict = "identified"
        elif np.isnan(lo) and np.isnan(hi):
            verdict = "flat"
        else:
            verdict = "flat below" if np.isnan(lo) else "flat above"
        rows.append({"parameter": n, "best": float(v[k]), "lower95": float(lo), "upper95": float(hi),
                     "grid_low": float(v.min()), "grid_high": float(v.max()), "max_drop": float(np.nanmax(d)),
                     "failed_points": int(np.isnan(d).sum()), "not_converged": int((~c["converged"]).sum()),
                     "verdict": verdict})
    return pd.DataFrame(rows).set_index("parameter")

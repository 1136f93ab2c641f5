"""MAP by preconditioned L-BFGS (optax in one program, or SciPy from the host) and a Laplace
approximation, used to start NUTS well.

Imaging data pin each cell's observation parameters extremely tightly (a bleaching rate to
~1e-4 /min, F_min to <1%) while population parameters stay prior-wide: the posterior's scales
span ~4 orders of magnitude. NUTS with an identity metric then needs step sizes of ~1e-4 and
saturates its tree depth for the whole warmup. Starting at the MAP with the Laplace covariance
as the (dense) inverse metric removes that cost.
"""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float
from numpyro.infer import init_to_median, init_to_sample
from numpyro.infer.util import initialize_model

from ._metric import (
    BLOCK_METRIC_MIN_CELLS,
    METRICS,
    BlockFactor,
    BlockLayout,
    DenseFactor,
    block_factor,
    block_hessian,
    block_layout,
)


# L-BFGS iterations between Hessian (preconditioner) refreshes of the host loop
REFRESH_ITER = 20
# block-arrow Newton steps: the largest step of one cell's (or the population's) coordinates, in
# standard deviations of the local Laplace approximation (a trust region per cell)
NEWTON_CAP = 100.0


class LaplaceInit(eqx.Module):
    """MAP point and Laplace covariance in numpyro's unconstrained space.

    Attributes
    ----------
    z_map : dict of unconstrained site values at the MAP.
    flat_map : the same, flattened in numpyro's order (``ravel_pytree``, sorted site names).
    inverse_mass_matrix : (dim, dim) inverse of the finite-difference Hessian of the potential at
        the MAP, eigenvalues made positive and floored (a metric, not a result); None with the
        block-arrow metric, whose inverse is never formed.
    potential : potential energy (-log joint) at the MAP.
    grad_norm : gradient norm at the MAP (small when the optimiser converged).
    num_iter : L-BFGS (dense metric) or Newton (block metric) iterations used.
    start_potentials : last potential of every start of a multi-start search (after its
        exploration iterations; the MAP's after its full search); one entry for a single start.
    value_and_grad : the compiled potential's value and gradient at a flat unconstrained point
        (``host_loop`` searches; None otherwise), for callers that evaluate the potential again
        without compiling the model once more.
    factor : the whitening ``W`` of the metric, ``W W^T`` = the inverse Hessian
        (:class:`inference._metric.DenseFactor` or, with ``metric="block"``,
        :class:`inference._metric.BlockFactor`): ``flat_map + W u`` with ``u ~ N(0, I)`` is a
        draw of the Laplace approximation.
    """

    z_map: dict
    flat_map: Float[Array, " dim"]
    inverse_mass_matrix: Float[Array, "dim dim"] | None
    potential: Float[Array, ""]
    grad_norm: Float[Array, ""]
    num_iter: Array
    start_potentials: Float[Array, " starts"]
    value_and_grad: Callable | None = eqx.field(static=True, default=None)
    factor: DenseFactor | BlockFactor | None = None

    @property
    def metric(self) -> str:
        """``"block"`` (block-arrow, :mod:`inference._metric`) or ``"dense"``."""
        return "block" if isinstance(self.factor, BlockFactor) else "dense"


def _fd_hessian(grad_fn, x, step, batched: bool = True):
    """Central differences of an exact gradient: 2 * dim gradients, batched with vmap (or lax.map)."""
    eye = jnp.eye(x.shape[0]) * step
    apply = jax.vmap(grad_fn) if batched else (lambda xs: jax.lax.map(grad_fn, xs))
    h = (apply(x + eye) - apply(x - eye)) / (2 * step)
    h = jnp.where(jnp.isfinite(h), h, 0.0)
    return 0.5 * (h + h.T)


def _sqrt_inv(h, floor):
    """Symmetric H^{-1/2} and H^{-1} with |eigenvalues| floored at floor * max|eigenvalue|."""
    w, v = jnp.linalg.eigh(h)
    w = jnp.maximum(jnp.abs(w), floor * jnp.max(jnp.abs(w)))
    return (v / jnp.sqrt(w)) @ v.T, (v / w) @ v.T


def laplace_init(model, model_args, *, key, max_iter: int = 150, tol: float = 1e-2,
                 fd_step: float = 1e-5, floor: float = 1e-8, batch_hessian: bool = True,
                 host_loop: bool = False, num_starts: int = 1, explore_iter: int = 25,
                 log=None, metric: str = "dense", plate: str = "cell", refresh: int | None = None) -> LaplaceInit:
    """Find the MAP of ``model`` in unconstrained space and the Laplace covariance there.

    1. start at the prior medians (``init_to_median``);
    2. precondition with the inverse square root of the Hessian there, so that the problem the
       optimiser sees is roughly isotropic;
    3. L-BFGS (optax, zoom line search) until the preconditioned gradient norm is below ``tol``
       or ``max_iter`` iterations;
    4. Hessian at the optimum -> inverse mass matrix.

    Everything runs in one jitted program; no host round trips. ``batch_hessian=False`` maps the
    Hessian's gradients sequentially (``lax.map``) instead of ``vmap``: models whose likelihood
    branches on solver success (steady states with an integration fallback) would otherwise run
    both branches for every column.

    ``host_loop=True`` compiles only the potential's value and gradient and drives the Hessian
    columns and the L-BFGS iterations (SciPy's L-BFGS-B, :func:`_host_lbfgs`) from Python. For
    ODE models the single program inlines the gradient several times (two Hessians, the line
    search, the final gradient) and its compile dominates; the host loop compiles it once, at
    the cost of a host round trip per evaluation (outside any sampling loop). The imaging and
    custom-model fits use it (the transcript fit, from one start, does not: ``inference/_transcripts.py``).

    ``num_starts > 1`` (host loop only): multi-start search. The prior-median start and
    ``num_starts - 1`` draws from the prior (numpyro's ``init_to_sample``, redrawn where the
    potential or its gradient is not finite) each take ``explore_iter`` L-BFGS iterations (all
    preconditioned by the Hessian at the median start); the start with the lowest potential then
    continues alone to ``tol`` or ``max_iter`` and is the MAP. ODE models with oscillations or thresholds have local
    optima: a single start from the prior medians lands in a worse one often enough to leave
    chains in different basins (measured on the lynx-hare fit: potential 172.5 instead of 132.6).

    ``log(start, iteration, potential, gradient norm)``, host loop only, is called after every
    L-BFGS iteration (progress of long searches).

    ``metric`` (host loop only for ``"block"``): ``"dense"``, the Hessian from ``2 dim``
    gradients and its dense inverse; ``"block"``, the block-arrow Hessian of a model whose
    members of the plate ``plate`` interact only through the coordinates outside it, from
    ``2 (k + p) + 2`` gradients, and its structured whitening (:mod:`inference._metric`;
    ``inverse_mass_matrix`` is then None, ``factor`` a :class:`~inference._metric.BlockFactor`,
    and the search takes Newton steps with it, see :func:`_host_lbfgs`); ``"auto"``, block from
    :data:`~inference._metric.BLOCK_METRIC_MIN_CELLS` plate members (with the host loop), dense
    otherwise.

    ``refresh`` (host loop; default :data:`REFRESH_ITER`): the L-BFGS search runs in rounds of
    this many iterations, each preconditioned by the Hessian at the round's start (0: by the
    Hessian at the first start throughout). The Hessian at the prior medians is a poor
    preconditioner near the MAP of an imaging model, whose scales span orders of magnitude:
    measured on the bundled example, the search stopped at 150 iterations 43 units of potential
    above the MAP; with rounds of 20 it converged in 41 (docs/performance.md).
    """
    if num_starts > 1 and not host_loop:
        raise ValueError("num_starts > 1 needs host_loop=True.")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}.")
    k_median, k_starts = jax.random.split(key)
    info, potential_fn, _, model_trace = initialize_model(k_median, model, model_args=model_args,
                                                          init_strategy=init_to_median(num_samples=15))
    flat0, unravel = ravel_pytree(info.z)
    layout = None
    if metric != "dense":
        layout = block_layout(model_trace, info.z, plate)
        if metric == "block" and (layout is None or not host_loop):
            raise ValueError(f"metric = 'block' needs the host loop and latent sites in a plate {plate!r} of at least 2 "
                             "members. Fix: use metric = 'dense'.")
        if layout is not None and (not host_loop or layout.num_cells < BLOCK_METRIC_MIN_CELLS) and metric == "auto":
            layout = None
    starts = flat0[None]
    if num_starts > 1:
        more, _, _, _ = initialize_model(jax.random.split(k_starts, num_starts - 1), model, model_args=model_args,
                                         init_strategy=init_to_sample)
        starts = jnp.concatenate([starts, jax.vmap(lambda z: ravel_pytree(z)[0])(more.z)])

    # jitted once here so that the many uses below (Hessians, line searches) reuse one trace of
    # the model instead of re-tracing the ODE solves in Python each time
    f = jax.jit(lambda x: potential_fn(unravel(x)))
    grad_f = jax.jit(jax.grad(f))
    opt = optax.lbfgs()

    @jax.jit
    def run(x0):
        p_half, _ = _sqrt_inv(_fd_hessian(grad_f, x0, fd_step, batch_hessian), floor)

        def g(y):  # the preconditioned objective
            return f(x0 + p_half @ y)

        value_and_grad = optax.value_and_grad_from_state(g)

        def cond(carry):
            _, _, i, gnorm = carry
            return (i < max_iter) & (gnorm > tol)

        def body(carry):
            y, state, i, _ = carry
            value, grad = value_and_grad(y, state=state)
            updates, state = opt.update(grad, state, y, value=value, grad=grad, value_fn=g)
            return optax.apply_updates(y, updates), state, i + 1, jnp.linalg.norm(grad)

        y0 = jnp.zeros_like(x0)
        y, _, i, _ = jax.lax.while_loop(cond, body, (y0, opt.init(y0), jnp.asarray(0), jnp.asarray(jnp.inf)))
        x = x0 + p_half @ y
        value, grad = jax.value_and_grad(f)(x)
        w, inv = _sqrt_inv(_fd_hessian(grad_f, x, fd_step, batch_hessian), floor)
        return x, w, inv, value, jnp.linalg.norm(grad), i

    value_and_grad = None
    if host_loop:
        value_and_grad = jax.jit(jax.value_and_grad(f))
        x, factor, inv, value, gnorm, i, values = _host_lbfgs(value_and_grad, starts, max_iter=max_iter, tol=tol,
                                                              fd_step=fd_step, floor=floor, explore_iter=explore_iter,
                                                              log=log, layout=layout,
                                                              refresh=REFRESH_ITER if refresh is None else refresh)
    else:
        x, w, inv, value, gnorm, i = run(flat0)
        factor = DenseFactor(w)
        values = value[None]
    return LaplaceInit(z_map=unravel(x), flat_map=x, inverse_mass_matrix=inv, potential=value,
                       grad_norm=gnorm, num_iter=i, start_potentials=values, value_and_grad=value_and_grad,
                       factor=factor)


_apply = eqx.filter_jit(lambda factor, u: factor.apply(u))
_apply_t = eqx.filter_jit(lambda factor, g: factor.apply_t(g))


def _host_lbfgs(value_and_grad, starts, *, max_iter, tol, fd_step, floor, explore_iter=25, log=None,
                layout: BlockLayout | None = None, refresh: int = 0):
    """:func:`laplace_init`'s steps driven from Python, with one compiled value and gradient.

    ``starts`` has shape ``(num_starts, dim)``. ``value_and_grad`` is the potential's value and
    gradient, one compiled program; every Hessian column and every L-BFGS evaluation calls it. L-BFGS is
    SciPy's L-BFGS-B (unbounded) on the problem preconditioned as in :func:`laplace_init`: a
    jitted optimiser loop (optax's, with its zoom line search) inlines the potential's gradient
    once per place that evaluates it, and each copy of an ODE model's gradient costs seconds of
    XLA compile (about 18 s for the bundled example's single program, against about 4 s for
    the one program here).

    Every start takes ``explore_iter`` L-BFGS iterations (or converges first); the start with the
    lowest potential then continues alone, from its point, to ``max_iter`` iterations in all.
    A search stops when the preconditioned gradient norm is below ``tol`` (SciPy's ``gtol``, a
    maximum norm, is set to ``tol / sqrt(dim)``), when an iteration lowers the potential by less
    than ``1e-12`` relative (the potential of an ODE model is only as smooth as its adaptive
    solves: its gradient has a noise floor that a strict ``tol`` never passes), or when the line
    search fails (a step into a region where the model fails: the value there is infinite).
    ``log(start, iteration, potential, gradient norm)`` is called after every iteration when
    given.

    With a ``layout`` (the block-arrow metric) the search is Newton's method instead: each
    iteration takes the block-arrow Hessian (36 gradients for the imaging model; 2 more check the
    structure at the MAP,
    :func:`inference._metric.block_hessian`), the step ``-W W^T g`` with each cell's whitened
    step (and the population's) capped at :data:`NEWTON_CAP` standard deviations, and a
    backtracking (Armijo) line search; it stops when ``|W^T g| <= tol``, on a relative decrease
    below ``1e-12``, or when the line search fails. L-BFGS with one step length for all cells is
    held back by the cells farthest from their optimum: on 4,096 simulated cells it was still
    far from the MAP after 150 iterations (7.7 evaluations each). Newton's step is right for
    every cell at once, and the cap keeps a cell far from its optimum (hundreds of sd at the
    prior medians) from shortening everyone's step: 32 iterations on 512 cells, to the same
    potential as the L-BFGS rounds (196271.34). Returns the best point, the whitening
    ``W`` of its metric, its dense inverse Hessian (None with a ``layout``), its potential,
    gradient norm, iteration count, and every start's last potential.
    """
    from scipy.optimize import minimize

    dtype = starts.dtype
    starts = np.asarray(starts, dtype=np.float64)
    num, dim = starts.shape

    def vg(x):
        v, g = value_and_grad(jnp.asarray(x, dtype))
        return float(v), np.asarray(g, dtype=np.float64)

    def metric(x, check=False):
        """(factor, inverse Hessian or None, W as a NumPy function, W^T as one) at x; the block-arrow
        structure is checked (``check``) at the MAP only, not in the preconditioners on the way.
        """
        if layout is not None:
            factor = block_factor(layout, *block_hessian(lambda y: vg(y)[1], x, layout, fd_step, check=check), floor,
                                  dtype)
            return (factor, None, lambda y: np.asarray(_apply(factor, jnp.asarray(y, dtype)), np.float64),
                    lambda g: np.asarray(_apply_t(factor, jnp.asarray(g, dtype)), np.float64))
        eye = np.eye(dim) * fd_step
        h = np.stack([(vg(x + e)[1] - vg(x - e)[1]) / (2 * fd_step) for e in eye])
        h = np.where(np.isfinite(h), h, 0.0)
        w, inv = _sqrt_inv(jnp.asarray(0.5 * (h + h.T), dtype), floor)
        w_np = np.asarray(w, dtype=np.float64)
        return DenseFactor(w), inv, lambda y: w_np @ y, lambda g: w_np.T @ g

    first = metric(starts[0])
    centres = [starts[k].copy() for k in range(num)]  # x = centre + W y, per start
    metrics = [first] * num
    ys = [np.zeros(dim) for _ in range(num)]
    values = np.full(num, np.inf)
    iters = np.zeros(num, dtype=int)

    def newton(k, until):
        """Block-arrow Newton steps, each block's whitened step capped at NEWTON_CAP (a trust region per cell)."""
        x = centres[k] + metrics[k][2](ys[k])
        v, g = vg(x)
        values[k] = v
        while iters[k] < until and np.isfinite(v):
            if iters[k] > 0 or k > 0:  # start 0's first Hessian is the one computed at starts[0]
                metrics[k] = metric(x)
            _, _, apply, apply_t = metrics[k]
            u = -apply_t(g)
            if np.linalg.norm(u) <= tol:
                break
            for index in (layout.cell_index, layout.pop_index[None]):
                norms = np.linalg.norm(u[index], axis=-1, keepdims=True)
                u[index] *= np.minimum(1.0, NEWTON_CAP / np.maximum(norms, 1e-300))
            d = apply(u)
            slope, t = float(g @ d), 1.0
            while t >= 1e-6:  # backtracking (Armijo); a failed solve is an infinite value
                v_new, g_new = vg(x + t * d)
                if np.isfinite(v_new) and np.all(np.isfinite(g_new)) and v_new <= v + 1e-4 * t * slope:
                    break
                t *= 0.5
            else:
                break
            x, decrease, v, g = x + t * d, v - v_new, v_new, g_new
            iters[k] += 1
            values[k] = v
            if log is not None:
                log(k, int(iters[k]), v, float(np.linalg.norm(u)))
            if decrease <= 1e-12 * abs(v):  # the solver-noise floor of the potential
                break
        centres[k], ys[k] = x, np.zeros(dim)

    def search(k, until):
        if layout is not None:
            return newton(k, until)
        while True:
            stop = min(until, iters[k] + refresh) if refresh else until
            before, value_before = iters[k], values[k]
            gnorm = _search_round(k, stop)
            # A round ends at its iteration cap, on convergence, on a relative decrease below ftol,
            # or on a failed line search. The last two also happen far from the optimum, where
            # the L-BFGS model of the round has gone bad (measured at 4,096 cells: stalled at a
            # gradient norm of 5e8). Unless the preconditioned gradient is below tol, a round
            # that lowered the potential is followed by another, with the Hessian where it ended.
            progress = values[k] < value_before and (not np.isfinite(value_before)
                                                     or value_before - values[k] > 1e-9 * abs(value_before))
            if not refresh or gnorm <= tol or iters[k] == before or not progress or iters[k] >= until:
                return
            centres[k] = centres[k] + metrics[k][2](ys[k])  # re-centre and precondition with the Hessian here
            ys[k] = np.zeros(dim)
            metrics[k] = metric(centres[k])

    def _search_round(k, until):
        last = {}  # the last evaluation (L-BFGS-B accepts the last point its line search tried)
        _, _, precondition, precondition_t = metrics[k]

        def fun(y):
            v, g = vg(centres[k] + precondition(y))
            g = precondition_t(g)
            if not (np.isfinite(v) and np.all(np.isfinite(g))):
                v, g = np.inf, np.zeros(dim)
            last.update(y=y.copy(), value=v, gnorm=float(np.linalg.norm(g)))
            return v, g

        def callback(intermediate_result):
            y = intermediate_result.x
            ys[k] = np.array(y)
            iters[k] += 1
            hit = "y" in last and np.array_equal(last["y"], y)
            values[k], gnorm = (last["value"], last["gnorm"]) if hit else (float(intermediate_result.fun), np.nan)
            if log is not None:
                log(k, int(iters[k]), values[k], gnorm)

        if iters[k] == 0:
            values[k] = fun(ys[k])[0]
        if not (until > iters[k] and np.isfinite(values[k])):
            return 0.0
        res = minimize(fun, ys[k], jac=True, method="L-BFGS-B", callback=callback,
                       options={"maxiter": int(until - iters[k]), "gtol": tol / np.sqrt(dim), "ftol": 1e-12})
        return float(np.linalg.norm(res.jac)) if np.all(np.isfinite(res.jac)) else np.inf

    # every start explores for a few iterations; only the lowest goes on to convergence
    explore = max_iter if num == 1 else min(explore_iter, max_iter)
    for k in range(num):
        search(k, explore)
    best = int(np.argmin(values))
    search(best, max_iter)
    x = centres[best] + metrics[best][2](ys[best])
    value, gr = value_and_grad(jnp.asarray(x, dtype))
    factor, inv, _, _ = metric(x, check=True)
    return (jnp.asarray(x, dtype), factor, inv, value, jnp.linalg.norm(gr), jnp.asarray(int(iters[best])),
            jnp.asarray(values, dtype))

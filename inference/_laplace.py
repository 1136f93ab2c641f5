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


class LaplaceInit(eqx.Module):
    """MAP point and Laplace covariance in numpyro's unconstrained space.

    Attributes
    ----------
    z_map : dict of unconstrained site values at the MAP.
    flat_map : the same, flattened in numpyro's order (``ravel_pytree``, sorted site names).
    inverse_mass_matrix : (dim, dim) inverse of the finite-difference Hessian of the potential at
        the MAP, eigenvalues made positive and floored (a metric, not a result).
    potential : potential energy (-log joint) at the MAP.
    grad_norm : gradient norm at the MAP (small when the optimiser converged).
    num_iter : L-BFGS iterations used.
    start_potentials : last potential of every start of a multi-start search (after its
        exploration iterations; the MAP's after its full search); one entry for a single start.
    value_and_grad : the compiled potential's value and gradient at a flat unconstrained point
        (``host_loop`` searches; None otherwise), for callers that evaluate the potential again
        without compiling the model once more.
    """

    z_map: dict
    flat_map: Float[Array, " dim"]
    inverse_mass_matrix: Float[Array, "dim dim"]
    potential: Float[Array, ""]
    grad_norm: Float[Array, ""]
    num_iter: Array
    start_potentials: Float[Array, " starts"]
    value_and_grad: Callable | None = eqx.field(static=True, default=None)


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
                 log=None) -> LaplaceInit:
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
    """
    if num_starts > 1 and not host_loop:
        raise ValueError("num_starts > 1 needs host_loop=True.")
    k_median, k_starts = jax.random.split(key)
    info, potential_fn, _, _ = initialize_model(k_median, model, model_args=model_args,
                                                init_strategy=init_to_median(num_samples=15))
    flat0, unravel = ravel_pytree(info.z)
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
        _, inv = _sqrt_inv(_fd_hessian(grad_f, x, fd_step, batch_hessian), floor)
        return x, inv, value, jnp.linalg.norm(grad), i

    value_and_grad = None
    if host_loop:
        value_and_grad = jax.jit(jax.value_and_grad(f))
        x, inv, value, gnorm, i, values = _host_lbfgs(value_and_grad, starts, max_iter=max_iter, tol=tol,
                                                      fd_step=fd_step, floor=floor, explore_iter=explore_iter, log=log)
    else:
        x, inv, value, gnorm, i = run(flat0)
        values = value[None]
    return LaplaceInit(z_map=unravel(x), flat_map=x, inverse_mass_matrix=inv, potential=value,
                       grad_norm=gnorm, num_iter=i, start_potentials=values, value_and_grad=value_and_grad)


def _host_lbfgs(value_and_grad, starts, *, max_iter, tol, fd_step, floor, explore_iter=25, log=None):
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
    given. Returns the best point, its inverse Hessian, potential, gradient norm, iteration
    count, and every start's last potential.
    """
    from scipy.optimize import minimize

    dtype = starts.dtype
    starts = np.asarray(starts, dtype=np.float64)
    num, dim = starts.shape

    def vg(x):
        v, g = value_and_grad(jnp.asarray(x, dtype))
        return float(v), np.asarray(g, dtype=np.float64)

    def hessian(x):
        eye = np.eye(dim) * fd_step
        h = np.stack([(vg(x + e)[1] - vg(x - e)[1]) / (2 * fd_step) for e in eye])
        h = np.where(np.isfinite(h), h, 0.0)
        return jnp.asarray(0.5 * (h + h.T), dtype)

    p_half = np.asarray(_sqrt_inv(hessian(starts[0]), floor)[0], dtype=np.float64)
    ys = [np.zeros(dim) for _ in range(num)]
    values = np.full(num, np.inf)
    iters = np.zeros(num, dtype=int)

    def search(k, until):
        last = {}  # the last evaluation (L-BFGS-B accepts the last point its line search tried)

        def fun(y):
            v, g = vg(starts[k] + p_half @ y)
            g = p_half.T @ g
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
        if until > iters[k] and np.isfinite(values[k]):
            minimize(fun, ys[k], jac=True, method="L-BFGS-B", callback=callback,
                     options={"maxiter": int(until - iters[k]), "gtol": tol / np.sqrt(dim), "ftol": 1e-12})

    # every start explores for a few iterations; only the lowest goes on to convergence
    explore = max_iter if num == 1 else min(explore_iter, max_iter)
    for k in range(num):
        search(k, explore)
    best = int(np.argmin(values))
    search(best, max_iter)
    x = starts[best] + p_half @ ys[best]
    value, gr = value_and_grad(jnp.asarray(x, dtype))
    _, inv = _sqrt_inv(hessian(x), floor)
    return (jnp.asarray(x, dtype), inv, value, jnp.linalg.norm(gr), jnp.asarray(int(iters[best])),
            jnp.asarray(values, dtype))

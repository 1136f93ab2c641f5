"""MAP by preconditioned L-BFGS (optax) and a Laplace approximation, used to start NUTS well.

Imaging data pin each cell's observation parameters extremely tightly (a bleaching rate to
~1e-4 /min, F_min to <1%) while population parameters stay prior-wide: the posterior's scales
span ~4 orders of magnitude. NUTS with an identity metric then needs step sizes of ~1e-4 and
saturates its tree depth for the whole warmup. Starting at the MAP with the Laplace covariance
as the (dense) inverse metric removes that cost.
"""

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
    """

    z_map: dict
    flat_map: Float[Array, " dim"]
    inverse_mass_matrix: Float[Array, "dim dim"]
    potential: Float[Array, ""]
    grad_norm: Float[Array, ""]
    num_iter: Array
    start_potentials: Float[Array, " starts"]


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
    columns and the L-BFGS iterations from Python. For models whose gradient is expensive to
    compile (implicit solvers, steady states) the single program inlines the gradient several
    times (two Hessians, the line search) and its compile dominates; the host loop compiles it
    once, at the cost of a host round trip per iteration (outside any sampling loop).

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

    if host_loop:
        x, inv, value, gnorm, i, values = _host_lbfgs(f, starts, max_iter=max_iter, tol=tol, fd_step=fd_step,
                                                      floor=floor, explore_iter=explore_iter, log=log)
    else:
        x, inv, value, gnorm, i = run(flat0)
        values = value[None]
    return LaplaceInit(z_map=unravel(x), flat_map=x, inverse_mass_matrix=inv, potential=value,
                       grad_norm=gnorm, num_iter=i, start_potentials=values)


STALL_ITER = 25


def _host_lbfgs(f, starts, *, max_iter, tol, fd_step, floor, explore_iter=25, log=None):
    """:func:`laplace_init`'s steps with one compiled value-and-gradient, driven from Python.

    ``starts`` has shape ``(num_starts, dim)``. Every start takes ``explore_iter`` L-BFGS
    iterations (or converges first); the start with the lowest potential then continues alone to
    ``tol`` or ``max_iter``, or until ``STALL_ITER`` iterations in a row leave its potential
    unchanged (to 1e-10 relative). ``log(start, iteration, potential, gradient norm)`` is called after
    every iteration when given. Returns the best point, its inverse Hessian, potential, gradient
    norm, iteration count, and every start's last potential.
    """
    value_and_grad = jax.jit(jax.value_and_grad(f))

    def grad(x):
        return value_and_grad(x)[1]

    def hessian(x):
        eye = jnp.eye(x.shape[0]) * fd_step
        cols = [(grad(x + e) - grad(x - e)) / (2 * fd_step) for e in eye]
        h = jnp.stack(cols)
        h = jnp.where(jnp.isfinite(h), h, 0.0)
        return 0.5 * (h + h.T)

    p_half, _ = _sqrt_inv(hessian(starts[0]), floor)
    opt = optax.lbfgs()

    def one_step(y, state, base, done):
        def g(y):  # the preconditioned objective; its value and gradient reuse the compiled ones
            v, gr = value_and_grad(base + p_half @ y)
            return v, p_half.T @ gr

        # the line search differentiates its value function: give it the compiled gradient
        # instead of letting it differentiate (again) through the solver
        @jax.custom_vjp
        def g_value(y):
            return g(y)[0]

        g_value.defvjp(lambda y: g(y), lambda gr, ct: (ct * gr,))
        value, gr = g(y)
        updates, new_state = opt.update(gr, state, y, value=value, grad=gr, value_fn=g_value)
        new_y = optax.apply_updates(y, updates)
        keep = done | ~jnp.isfinite(value)  # converged, or a start that went where the model fails
        new_y = jnp.where(keep, y, new_y)
        new_state = jax.tree.map(lambda old, new: jnp.where(keep, old, new), state, new_state)
        return new_y, new_state, jnp.where(jnp.isfinite(value), jnp.linalg.norm(gr), jnp.inf), value

    # One compiled L-BFGS step (the line search inlines the potential's gradient once). Run
    # eagerly, optax's line-search loop would be traced and compiled anew at every iteration,
    # which costs minutes per iteration for stiff models and exhausts LLVM's code memory. Starts
    # are stepped one at a time, not vmap-ed: under vmap every line-search evaluation waits for
    # the stiffest start's solve (an explicit solver at a stiff prior draw runs to max_steps),
    # which made one step of an 8-start search of the coupled model take about a minute.
    step = jax.jit(one_step)
    num = starts.shape[0]
    ys = [jnp.zeros_like(x) for x in starts]
    states = [opt.init(y) for y in ys]
    values = np.full(num, np.inf)
    done = np.zeros(num, dtype=bool)
    stuck = np.zeros(num, dtype=bool)
    iters = np.zeros(num, dtype=int)
    history = [[] for _ in range(num)]

    def stalled(k):
        # the potential of an ODE model is only as smooth as its adaptive solves: its gradient
        # has a noise floor (~1e-5 measured on the coupled model at rtol 1e-7) that a strict tol
        # never passes; stop when STALL_ITER iterations have not lowered the potential
        h = history[k]
        return len(h) > STALL_ITER and h[-STALL_ITER - 1] - min(h[-STALL_ITER:]) <= 1e-10 * max(1.0, abs(h[-1]))

    def advance(k, until):
        while iters[k] < until and not (done[k] or stuck[k] or stalled(k)):
            ys[k], states[k], gnorm, value = step(ys[k], states[k], starts[k], jnp.asarray(False))
            gnorm, value = float(gnorm), float(value)
            iters[k] += 1
            values[k] = value if np.isfinite(value) else np.inf
            history[k].append(values[k])
            done[k] = gnorm <= tol
            stuck[k] = not np.isfinite(gnorm)
            if log is not None:
                log(k, int(iters[k]), value, gnorm)

    # every start explores for a few iterations; only the lowest goes on to convergence
    explore = max_iter if num == 1 else min(explore_iter, max_iter)
    for k in range(num):
        advance(k, explore)
    best = int(np.argmin(values))
    advance(best, max_iter)
    i = int(iters[best])
    ys = jnp.stack(ys)
    x = starts[best] + p_half @ ys[best]
    value, gr = value_and_grad(x)
    _, inv = _sqrt_inv(hessian(x), floor)
    return x, inv, value, jnp.linalg.norm(gr), jnp.asarray(i), jnp.asarray(values)

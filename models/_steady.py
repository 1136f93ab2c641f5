"""Steady states of ODE models: Newton with an integration fallback, differentiated implicitly."""

from collections.abc import Callable
from typing import Any

import diffrax
import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import lineax as lx
import optimistix as optx
from jaxtyping import Array, Bool, Float, Int


class SteadyStateConfig(eqx.Module):
    """Settings of :func:`steady_state`.

    Attributes
    ----------
    tol : float
        Accepted error of the steady state, measured as the size of one more Newton step,
        ``max |J^{-1} f(y)|`` (in the units of the state; for log-states, a relative error).
        A root that does not meet it counts as a failure, whichever path produced it.
    newton_rtol, newton_atol : float
        Termination tolerances of the Newton iterations.
    max_newton_steps : int
        Bound on Newton iterations per attempt.
    t_max : float
        Horizon of the fallback integration (model time units). It must be long against the
        slowest relaxation time of the model; the integration stops earlier once the state is
        stationary to ``event_rtol``/``event_atol``.
    event_rtol, event_atol : float
        Stationarity test of the fallback integration (``|f(y)| <= atol + rtol |y|``); its end
        point is then polished by Newton, so these need only bring Newton into its basin.
    max_steps : int
        Step bound of the fallback integration.
    """

    tol: float = 1e-9
    newton_rtol: float = 1e-12
    newton_atol: float = 1e-12
    max_newton_steps: int = 64
    t_max: float = 1e4
    event_rtol: float = 1e-6
    event_atol: float = 1e-8
    max_steps: int = 16_384


class SteadyState(eqx.Module):
    """Result of :func:`steady_state`.

    Attributes
    ----------
    y : the steady state (finite placeholder ``y_guess`` where ``success`` is False).
    success : whether a root meeting ``config.tol`` was found.
    used_fallback : whether the first Newton solve failed and the integration path was taken.
    error : the Newton-step error estimate at ``y`` (see ``SteadyStateConfig.tol``).
    newton_steps : Newton iterations of the path that produced ``y``.
    """

    y: Float[Array, " n"]
    success: Bool[Array, ""]
    used_fallback: Bool[Array, ""]
    error: Float[Array, ""]
    newton_steps: Int[Array, ""]


def _newton_error(fn, y, args):
    """Size of the next Newton step: a first-order estimate of the distance to the root."""
    f = fn(y, args)
    jac = jax.jacfwd(fn)(y, args)
    step = jnp.linalg.solve(jac, f)
    err = jnp.max(jnp.abs(step))
    return jnp.where(jnp.isfinite(err), err, jnp.inf)



def _newton(vector_field, y0, args, config: SteadyStateConfig):
    """One Newton attempt: (root, ok, error estimate, iterations)."""
    fn = lambda y, a: vector_field(0.0, y, a)  # noqa: E731
    # SVD-based linear solves: a (near-)singular Jacobian at a wild parameter draw must give a
    # failed solve, not an exception from lineax's well-posedness check.
    robust = lx.AutoLinearSolver(well_posed=False)
    newton = optx.Newton(rtol=config.newton_rtol, atol=config.newton_atol, linear_solver=robust)
    sol = optx.root_find(fn, newton, y0, args, max_steps=config.max_newton_steps, throw=False,
                         adjoint=optx.ImplicitAdjoint(linear_solver=robust))
    y = sol.value
    err = _newton_error(fn, jax.lax.stop_gradient(y), jax.lax.stop_gradient(args))
    ok = (sol.result == optx.RESULTS.successful) & jnp.all(jnp.isfinite(y)) & (err <= config.tol)
    return y, ok, err, sol.stats["num_steps"]


def _integrate(vector_field, y0, args, config: SteadyStateConfig):
    """Integrate until stationary (or ``t_max``); the end point, or ``y0`` if it is not finite."""
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field),
        diffrax.Kvaerno5(root_finder=diffrax.VeryChord(rtol=1e-8, atol=1e-10, linear_solver=lx.AutoLinearSolver(well_posed=False))),
        t0=0.0,
        t1=config.t_max,
        dt0=None,
        y0=y0,
        args=args,
        stepsize_controller=diffrax.PIDController(rtol=1e-8, atol=1e-10),
        event=diffrax.Event(diffrax.steady_state_event(rtol=config.event_rtol, atol=config.event_atol)),
        max_steps=config.max_steps,
        throw=False,
    )
    y_end = sol.ys[-1]
    return jnp.where(jnp.all(jnp.isfinite(y_end)), y_end, y0)


def steady_state(
    vector_field: Callable[[Any, Float[Array, " n"], Any], Float[Array, " n"]],
    y_guess: Float[Array, "*batch n"],
    args: Any,
    config: SteadyStateConfig = SteadyStateConfig(),
) -> SteadyState:
    r"""Find $y^*$ with $f(y^*) = 0$ for an autonomous vector field $f(t, y, \text{args})$.

    1. Newton's method from ``y_guess``.
    2. If that fails (no convergence, non-finite values, or an error estimate above
       ``config.tol``): integrate $\dot y = f$ from ``y_guess`` with Kvaerno5 until the state is
       stationary (or ``t_max``), then Newton again from the end point.
    3. If that fails too, ``success`` is False; the caller must treat the result as a failed
       solve (inside sampling: log density $-\infty$, counted), never as an answer.

    Derivatives with respect to ``args`` come from the implicit function theorem at the root
    ($\partial y^*/\partial\theta = -J_y^{-1} J_\theta$, optimistix's ``ImplicitAdjoint``); the
    fallback integration only supplies a starting point and is not differentiated.

    A Newton root is a root, but not necessarily the one the dynamics reach from ``y_guess``
    when several exist; models whose steady state is unique (as
    :class:`models.MTF1Transcription`) do not have that ambiguity.

    ``y_guess`` may carry one leading batch axis (with ``args`` batched alike): the Newton
    solves are ``vmap``-ed and the fallback runs only if one of them failed.
    """
    single = y_guess.ndim == 1
    if single:
        y_guess = y_guess[None]
        args = jax.tree.map(lambda v: jnp.asarray(v)[None], args)
    const_args = jax.lax.stop_gradient(args)
    newton = jax.vmap(lambda y0, a: _newton(vector_field, y0, a, config))
    # 1. Newton from the guess, not differentiated: it only decides where the final solve starts.
    y1, ok1, _, _ = newton(y_guess, const_args)

    def integrate():
        y_end = jax.vmap(lambda y0, a: _integrate(vector_field, y0, a, config))(y_guess, const_args)
        return jnp.where(ok1[:, None], y1, y_end)

    # 2. Integration only if some Newton solve failed. The predicate is reduced over every
    # enclosing vmap too (optimiser starts, chains, draws), so that the branch stays a branch and
    # is not turned into a select that always integrates.
    all_ok = eqxi.unvmap_all(jnp.all(ok1))
    y_start = jax.lax.stop_gradient(jax.lax.cond(all_ok, lambda: y1, integrate))
    # 3. The differentiated solve: Newton from a converged root (one or two steps) or from the
    # integrated end point; its implicit adjoint gives the derivatives.
    y, ok, err, n = newton(y_start, args)
    y = jnp.where(ok[:, None], y, y_guess)
    result = SteadyState(y=y, success=ok, used_fallback=~ok1, error=err, newton_steps=n)
    if single:
        result = jax.tree.map(lambda v: v[0], result)
    return result


__all__ = ["SteadyStateConfig", "SteadyState", "steady_state"]

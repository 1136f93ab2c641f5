"""Solving a zinc model on an observation grid with diffrax."""

import diffrax
import equinox as eqx
import jax.numpy as jnp
import optimistix as optx
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from ._custom import check_block_rows
from ._dynamics import AbstractZincModel, ZincFluxFull
from ._params import ZincFluxParams


class SolverConfig(eqx.Module):
    """Numerical settings of an ODE solve.

    Attributes
    ----------
    solver : str
        ``"tsit5"`` (explicit, for the rapid-equilibrium model) or ``"kvaerno5"`` (implicit,
        for the stiff full model).
    rtol, atol : float
        Relative and absolute tolerances of the PID step-size controller. The rapid-equilibrium
        state is ``(ln Zc, Zs)``, so ``rtol`` on ``ln Zc`` acts as an absolute error in log units.
    max_steps : int
        Bound on accepted + rejected steps. A solve that needs more fails (it does not raise
        inside sampling; the failure is counted). 4096 is about 20x what the example needs.
    dt0 : float
        Initial step (minutes). A fixed small value: the automatic choice picks a huge first
        step at the resting steady state, where the derivative is zero.
    dtmax : float
        Largest step (minutes); keeps trial steps across quiet stretches from overshooting.
    layout : str
        ``"system"`` (the default: all cells as one system with shared steps and per-cell error
        control) or ``"rows"`` (one ``vmap``-ed solve per cell, split over devices when there
        are several); see :class:`models.ODESolver`. Used by the imaging fit's batched solve.
        On the 2-core CPU the imaging gradient is about 3x faster with ``"system"``
        (docs/performance.md).
    block_rows : int, None or "auto"
        With ``layout="system"``: the most cells in one system; more are solved in blocks of
        this size, one after another (:class:`models.ODESolver`). None: all cells one system.
        ``"auto"`` (default): blocks of :data:`models.CPU_BLOCK_ROWS` on a CPU, one system on
        a GPU.
    root_tol : float
        Tolerance of the Newton solve inside implicit steps (Kvaerno5 only). diffrax's default
        ties it to ``rtol``/``atol``; at the tight tolerances of a reference solve that cannot be
        met in floating point once free zinc reaches ~1e5 nM under the ionophore, and the solver
        stalls on rejected steps. 1e-6 converges and keeps the solution within 1e-7 of Radau.
    """

    solver: str = "tsit5"
    rtol: float = 1e-6
    atol: float = 1e-9
    max_steps: int = 4096
    dt0: float = 1e-3
    dtmax: float = 1.0
    root_tol: float = 1e-6
    layout: str = "system"
    block_rows: int | str | None = "auto"

    def __check_init__(self):
        check_block_rows(self.block_rows)
        if self.layout not in ("rows", "system"):
            raise ValueError(f"layout must be 'rows' or 'system', got {self.layout!r}.")
        if self.solver not in ("tsit5", "kvaerno5", "dopri5"):
            raise ValueError(f"solver must be 'tsit5', 'dopri5' or 'kvaerno5', got {self.solver!r}.")
        if not (0 < self.rtol < 1):
            raise ValueError(f"rtol must be in (0, 1), got {self.rtol}.")
        if not (self.atol > 0):
            raise ValueError(f"atol must be > 0, got {self.atol}.")
        if not (0 < self.dt0 <= self.dtmax):
            raise ValueError(f"Need 0 < dt0 <= dtmax, got dt0={self.dt0}, dtmax={self.dtmax}.")
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}.")

    def make_solver(self):
        if self.solver == "kvaerno5":
            return diffrax.Kvaerno5(root_finder=optx.Newton(rtol=self.root_tol, atol=self.root_tol))
        return {"tsit5": diffrax.Tsit5, "dopri5": diffrax.Dopri5}[self.solver]()


class Trajectory(eqx.Module):
    """Result of :func:`solve`: observables on the time grid and solver status.

    Attributes
    ----------
    zc_nM : free cytosolic zinc at each time (nM), shape ``(n_time,)``.
    probe_fraction : fraction of probe bound to zinc at each time, shape ``(n_time,)``.
    success : whether the solve succeeded (scalar bool).
    num_steps : number of accepted steps (scalar int).
    """

    zc_nM: Float[Array, " n_time"]
    probe_fraction: Float[Array, " n_time"]
    success: Bool[Array, ""]
    num_steps: Int[Array, ""]


def solve(
    model: AbstractZincModel,
    params: ZincFluxParams,
    ts: Float[ArrayLike, " n_time"],
    *,
    config: SolverConfig = SolverConfig(),
    throw: bool = False,
) -> Trajectory:
    """Integrate ``model`` from the protocol start and save at ``ts`` (minutes).

    The protocol's segment starts are given to the step-size controller as ``jump_ts``. With
    ``throw=False`` (the default, as inside sampling) a failed solve returns ``success=False``
    and non-finite values are replaced by finite placeholders; the caller decides what to do.
    """
    ts = jnp.asarray(ts)
    protocol = model.protocol
    jumps = protocol.jump_times
    controller = diffrax.PIDController(rtol=config.rtol, atol=config.atol, dtmax=config.dtmax)
    if jumps:
        controller = diffrax.ClipStepSizeController(controller, jump_ts=jnp.asarray(jumps))
    y0 = model.initial_state(params)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(model.vector_field),
        config.make_solver(),
        t0=protocol.t0,
        t1=ts[-1],
        dt0=config.dt0,
        y0=y0,
        args=params,
        saveat=diffrax.SaveAt(ts=ts),
        stepsize_controller=controller,
        max_steps=config.max_steps,
        throw=throw,
    )
    zc = model.free_zinc_nM(sol.ys, params)
    frac = model.probe_bound_fraction(sol.ys, params)
    ok = diffrax.is_successful(sol.result) & jnp.all(jnp.isfinite(zc)) & jnp.all(jnp.isfinite(frac))
    zc = jnp.where(ok, zc, 1.0)
    frac = jnp.where(ok, frac, 0.5)
    return Trajectory(zc_nM=zc, probe_fraction=frac, success=ok, num_steps=sol.stats["num_accepted_steps"])


def full_model_config(rtol: float = 1e-9, atol: float = 1e-12) -> SolverConfig:
    """Solver settings suited to the stiff :class:`ZincFluxFull` (Kvaerno5)."""
    return SolverConfig(solver="kvaerno5", rtol=rtol, atol=atol, max_steps=100_000)


__all__ = ["SolverConfig", "Trajectory", "solve", "full_model_config", "ZincFluxFull"]

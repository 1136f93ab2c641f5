"""Speed levers of the imaging gradient, each timed against the production settings in one process.

Used by ``scripts/benchmark.py --levers N``; also runnable alone: ``python scripts/levers.py 512``.

Two kinds of rows:

- settings of the imaging fit (``[solver]`` in a config): the log density and gradient of the
  full hierarchical potential at the true parameters of simulated data, as NUTS sees them;
- experiments on the bare ODE solve (model A's vector field, the cells' kinetic constants, a
  fixed random linear functional of ln Zc at the 121 frames), for levers that are not settings:
  what saving at the frames costs, checkpointing, and forward-mode sensitivities.

"delta" is the relative change of the objective against the first row of its kind: what the
lever costs in accuracy.
"""

import sys

import diffrax
import jax
import jax.numpy as jnp


jax.config.update("jax_enable_x64", True)


def _timed(fn, x, repeats):
    from benchmark import timed

    return 1e3 * timed(fn, x, repeats=repeats)


def _potential_rows(n, repeats):
    import dataclasses

    from benchmark import make_case
    from numpyro.infer.util import initialize_model

    from inference._model import imaging_model
    from models import CPU_BLOCK_ROWS, SolverConfig

    base = make_case(n, rtol=1e-6, atol=1e-9)
    blocks = f"blocks of {CPU_BLOCK_ROWS} cells on a CPU" if jax.default_backend() == "cpu" else "one system"
    variants = [
        (f"production: system layout ({blocks}), Tsit5, rtol 1e-6", SolverConfig(rtol=1e-6, atol=1e-9)),
        ("system layout, all cells one system", SolverConfig(rtol=1e-6, atol=1e-9, block_rows=None)),
        *[(f"system layout, blocks of {b} cells", SolverConfig(rtol=1e-6, atol=1e-9, block_rows=b))
          for b in (64, 128, 512, 1024) if b < n and b != CPU_BLOCK_ROWS],
        ("rows layout (one vmapped solve per cell)", SolverConfig(rtol=1e-6, atol=1e-9, layout="rows")),
        ("rtol 1e-5, atol 1e-8", SolverConfig(rtol=1e-5, atol=1e-8)),
        ("rtol 1e-4, atol 1e-7", SolverConfig(rtol=1e-4, atol=1e-7)),
        ("Dopri5 instead of Tsit5", SolverConfig(solver="dopri5", rtol=1e-6, atol=1e-9)),
    ]
    rows, ref = [], None
    for label, solver in variants:
        problem = dataclasses.replace(base.problem, solver=solver)
        _, potential, _, _ = initialize_model(jax.random.key(0), imaging_model, model_args=(problem, base.plan))
        f = jax.jit(lambda x, potential=potential: -potential(base.unravel(x)))
        g = jax.jit(jax.grad(f))
        value = float(f(base.flat_truth))
        ref = value if ref is None else ref
        rows.append({"kind": "fit setting", "lever": label, "f_ms": _timed(f, base.flat_truth, repeats),
                     "grad_ms": _timed(g, base.flat_truth, repeats), "delta": abs(value - ref) / abs(ref)})
    return rows


def _bare_rows(n, repeats):
    from benchmark import PROTOCOL

    from data import read_protocol
    from models import PARAM_SPECS, ZincFluxParams, ZincFluxRapidEquilibrium, default_params

    inputs = read_protocol(PROTOCOL).to_inputs(30.0)
    model = ZincFluxRapidEquilibrium(inputs)
    free = ("zc_rest_nM", "zip_vmax_nM_per_min", "zip_km_uM", "znt_km_nM", "release_stim_per_min", "stim_decay_min",
            "probe_kd_nM", "tpen_rate_per_min")
    pop = default_params()
    key = jax.random.key(0)
    theta = jnp.stack([float(getattr(pop, k)) * jnp.exp(0.3 * jax.random.normal(jax.random.fold_in(key, i), (n,)))
                       for i, k in enumerate(free)], axis=1)
    fixed = {k: float(getattr(pop, k)) for k in PARAM_SPECS if k not in free}
    ts = jnp.linspace(0.0, 30.0, 121)
    weights = jax.random.normal(key, (n, ts.size))
    controller = diffrax.ClipStepSizeController(diffrax.PIDController(rtol=1e-6, atol=1e-9, dtmax=1.0),
                                                jump_ts=jnp.asarray(inputs.jump_times))

    def trajectory(th, adjoint, saveat):
        p = ZincFluxParams(**fixed, **{k: th[i] for i, k in enumerate(free)})
        sol = diffrax.diffeqsolve(diffrax.ODETerm(model.vector_field), diffrax.Tsit5(), t0=0.0, t1=30.0, dt0=1e-3,
                                  y0=model.initial_state(p), args=p, saveat=saveat, stepsize_controller=controller,
                                  max_steps=4096, throw=False, adjoint=adjoint)
        return sol.ys.log_zc

    def reverse(adjoint=diffrax.RecursiveCheckpointAdjoint(), saveat=diffrax.SaveAt(ts=ts)):
        def objective(th):
            out = jax.vmap(lambda x: trajectory(x, adjoint, saveat))(th)
            return jnp.sum(weights * out) if out.ndim == 2 else jnp.sum(weights[:, -1] * out[:, -1])
        return objective

    @jax.custom_vjp
    def forward_solve(th):
        return jax.vmap(lambda x: trajectory(x, diffrax.ForwardMode(), diffrax.SaveAt(ts=ts)))(th)

    def forward_fwd(th):
        # one solve per cell carrying all 8 tangents: ln Zc and its sensitivities at every frame
        def one(x):
            basis = jnp.eye(len(free))
            y, s = jax.vmap(lambda v: jax.jvp(lambda z: trajectory(z, diffrax.ForwardMode(), diffrax.SaveAt(ts=ts)), (x,), (v,)),
                            out_axes=(None, 1))(basis)
            return y, s
        y, s = jax.vmap(one)(th)
        return y, s

    def forward_bwd(s, ct):
        return (jnp.einsum("nt,ntk->nk", ct, s),)

    forward_solve.defvjp(forward_fwd, forward_bwd)
    variants = [
        ("bare solve: reverse mode, recursive checkpointing (diffrax default)", reverse()),
        ("bare solve: saving only the end point (what saving 121 frames costs)", reverse(saveat=diffrax.SaveAt(t1=True))),
        ("bare solve: 64 checkpoints instead of diffrax's default", reverse(diffrax.RecursiveCheckpointAdjoint(checkpoints=64))),
        ("bare solve: forward-mode sensitivities (8 tangents per cell)", lambda th: jnp.sum(weights * forward_solve(th))),
    ]
    rows, ref = [], None
    for label, objective in variants:
        f, g = jax.jit(objective), jax.jit(jax.grad(objective))
        value = float(f(theta))
        ref = value if ref is None else ref
        rows.append({"kind": "bare solve", "lever": label, "f_ms": _timed(f, theta, repeats),
                     "grad_ms": _timed(g, theta, repeats), "delta": abs(value - ref) / abs(ref)})
    return rows


def measure_levers(n: int, repeats: int = 7) -> dict:
    rows = []
    for group in (_potential_rows(n, repeats), _bare_rows(n, repeats)):
        for r in group:
            r["ratio"] = group[0]["grad_ms"] / r["grad_ms"]
            print(f"{r['lever']}: log density {r['f_ms']:.1f} ms, gradient {r['grad_ms']:.1f} ms "
                  f"(x{r['ratio']:.2f} faster than the first row), delta {r['delta']:.1e}", flush=True)
            rows.append(r)
    return {"cells": n, "rows": rows}


if __name__ == "__main__":
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
    measure_levers(int(sys.argv[1]) if len(sys.argv) > 1 else 512)

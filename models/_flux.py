r"""Model A through the public model API: :func:`flux_model` returns the rapid-equilibrium zinc
flux model of one cell as a :class:`models.ODEModel`.

The equations, units and priors are those of :class:`models.ZincFluxRapidEquilibrium` (its
``vector_field`` is the one solved here) and of :data:`models.PARAM_SPECS`; the protocol (medium
zinc, stimulus, ionophore and TPEN segments) is fixed when the model is built and its segment
starts are the model's ``jump_times``. The built-in imaging fit solves every cell with this
model's :meth:`~models.ODEModel.solve_batch`, and a user can fit calibrated free-zinc traces
(``zc_nM``, log-normal noise ``sigma_zc``) with it from a config like any other model.
"""

import math

import jax.numpy as jnp
import numpyro.distributions as dist

from ._custom import LogNormal, Observable, ODEModel, ODESolver, Parameter, State
from ._dynamics import FluxState, ZincFluxRapidEquilibrium
from ._params import PARAM_SPECS, ZincFluxParams
from ._protocol import ProtocolInputs


FLUX_SOLVER = ODESolver("tsit5", rtol=1e-6, atol=1e-9, max_steps=4096, dt0=1e-3, dtmax=1.0)
"""Default numerics of model A (as :class:`models.SolverConfig`): Tsit5 on the non-stiff reduced
equations, a small fixed first step (the solve starts at a steady state) and steps of at most
1 min so that no trial step overshoots a quiet stretch."""

FLUX_DEFAULT_FIXED = ("probe_total_nM", "mt_sites_nM", "mt_kd_nM", "seq_vmax_nM_per_min", "seq_km_nM", "store_rest_nM",
                      "iono_perm_per_min")
"""Held at their prior medians by default: not identifiable from imaging alone (docs/models.md)."""


def flux_model(protocol: ProtocolInputs, *, fixed=FLUX_DEFAULT_FIXED, priors: dict | None = None,
               solver: ODESolver = FLUX_SOLVER) -> ODEModel:
    r"""Model A (rapid equilibrium, time in minutes) under ``protocol`` as an :class:`ODEModel`.

    Parameters
    ----------
    protocol : the experiment's segments (:meth:`data.Protocol.to_inputs`).
    fixed : names fixed at their prior medians, or a mapping name -> value.
    priors : numpyro priors replacing the defaults (:data:`models.PARAM_SPECS`) by name.
    solver : numerical settings (default :data:`FLUX_SOLVER`).

    States ``log_zc`` (ln nM) and ``zs_nM``; the start is the resting steady state
    $(\ln Z_c^*, Z_s^*)$, which the derived rates make exact. Observable ``zc_nM``.
    """
    rates = ZincFluxRapidEquilibrium(protocol)
    fixed = dict(fixed) if isinstance(fixed, dict) else {n: PARAM_SPECS[n].median for n in fixed}
    priors = priors or {}

    def vector_field(t, y, p):
        dy = rates.vector_field(t, FluxState(log_zc=y["log_zc"], zs_nM=y["zs_nM"]),
                                ZincFluxParams(**{n: p[n] for n in PARAM_SPECS}))
        return {"log_zc": dy.log_zc, "zs_nM": dy.zs_nM}

    params = []
    for name, spec in PARAM_SPECS.items():
        prior = fixed[name] if name in fixed else priors.get(name, dist.LogNormal(math.log(spec.median), spec.log_sd))
        params.append(Parameter(name, spec.unit, prior, spec.meaning))
    params.append(Parameter("sigma_zc", "1 (log scale)", dist.LogNormal(math.log(0.1), 1.0),
                            "noise of calibrated free-zinc measurements"))
    return ODEModel(
        name="zinc_flux", time_unit="min", vector_field=vector_field,
        states=[State("log_zc", "ln nM", description="ln free cytosolic zinc"), State("zs_nM", "nM", description="store zinc")],
        parameters=params,
        observables=[Observable("zc_nM", lambda t, y, p: jnp.exp(y["log_zc"]), LogNormal("sigma_zc"), "nM")],
        initial=lambda p: {"log_zc": jnp.log(p["zc_rest_nM"]), "zs_nM": p["store_rest_nM"]},
        jump_times=protocol.jump_times, solver=solver,
        description="Model A: zinc fluxes with MT and probe buffering in rapid equilibrium (ZincFluxRapidEquilibrium).",
    )

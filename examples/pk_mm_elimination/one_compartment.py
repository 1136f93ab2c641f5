"""One-compartment pharmacokinetics: first-order absorption, Michaelis-Menten elimination.

    dC/dt = (D k_a / V) exp(-k_a t) [t > 0]  -  (V_m / V) C / (K_m + C),    C(0) = 0

C: plasma concentration (mg/L); t in days; D: oral dose (mg, known); V: volume of distribution
(L, known); k_a: absorption rate (1/day); K_m: Michaelis constant (mg/L); V_m: maximal
elimination rate (mg/day). The measured concentration is log-normal around C. Priors follow the
posteriordb model ``one_comp_mm_elim_abs``: half-Cauchy(0, 1) on k_a, K_m, V_m and the noise
scale.
"""

import jax.numpy as jnp
import numpyro.distributions as dist

from models import LogNormal, Observable, ODEModel, ODESolver, Parameter, State


def vector_field(t, y, p):
    absorption = jnp.where(t > 0, p["D"] * p["k_a"] / p["V"] * jnp.exp(-p["k_a"] * t), 0.0)
    elimination = p["V_m"] / p["V"] * y["C"] / (p["K_m"] + y["C"])
    return {"C": absorption - elimination}


model = ODEModel(
    name="one_comp_mm_elim_abs",
    time_unit="day",
    states=[State("C", "mg/L", initial=0.0, description="plasma concentration")],
    parameters=[
        Parameter("k_a", "1/day", dist.HalfCauchy(1.0), "first-order absorption rate"),
        Parameter("K_m", "mg/L", dist.HalfCauchy(1.0), "Michaelis constant of elimination"),
        Parameter("V_m", "mg/day", dist.HalfCauchy(1.0), "maximal elimination rate"),
        Parameter("sigma", "1 (log scale)", dist.HalfCauchy(1.0), "measurement noise"),
        Parameter("D", "mg", 30.0, "oral dose (known)"),
        Parameter("V", "L", 2.0, "volume of distribution (known)"),
    ],
    vector_field=vector_field,
    observables=[Observable("C_hat", "C", LogNormal("sigma"), "mg/L")],
    solver=ODESolver("tsit5", rtol=1e-8, atol=1e-10),
)

"""Lotka-Volterra predator-prey model for the Hudson's Bay Company lynx and hare pelts (1900-1920).

    d(hare)/dt = (alpha - beta * lynx) * hare
    d(lynx)/dt = (-gamma + delta * hare) * lynx

t in years after 1900; populations in thousands of pelts. The initial populations are estimated
(hare_0, lynx_0) and the 1900 counts are observed like every other year. Each species has its own
log-normal noise scale. Priors follow the posteriordb model ``lotka_volterra`` (Carpenter 2018,
"Predator-Prey Population Dynamics: the Lotka-Volterra model in Stan"): rates truncated normal at
0, log-normal initial populations and noise scales.
"""

import numpy as np
import numpyro.distributions as dist

from models import LogNormal, Observable, ODEModel, ODESolver, Parameter, State


def vector_field(t, y, p):
    hare, lynx = y["hare"], y["lynx"]
    return {
        "hare": (p["alpha"] - p["beta"] * lynx) * hare,
        "lynx": (-p["gamma"] + p["delta"] * hare) * lynx,
    }


model = ODEModel(
    name="lotka_volterra",
    time_unit="year",
    states=[
        State("hare", "thousand pelts", initial="hare_0", description="prey (snowshoe hare)"),
        State("lynx", "thousand pelts", initial="lynx_0", description="predator (Canada lynx)"),
    ],
    parameters=[
        Parameter("alpha", "1/year", dist.TruncatedNormal(1.0, 0.5, low=0.0), "hare birth rate"),
        Parameter("beta", "1/(year thousand pelts)", dist.TruncatedNormal(0.05, 0.05, low=0.0), "predation rate"),
        Parameter("gamma", "1/year", dist.TruncatedNormal(1.0, 0.5, low=0.0), "lynx death rate"),
        Parameter("delta", "1/(year thousand pelts)", dist.TruncatedNormal(0.05, 0.05, low=0.0), "lynx growth per hare"),
        Parameter("hare_0", "thousand pelts", dist.LogNormal(np.log(10.0), 1.0), "hares in 1900"),
        Parameter("lynx_0", "thousand pelts", dist.LogNormal(np.log(10.0), 1.0), "lynx in 1900"),
        Parameter("sigma_hare", "1 (log scale)", dist.LogNormal(-1.0, 1.0), "noise of the hare counts"),
        Parameter("sigma_lynx", "1 (log scale)", dist.LogNormal(-1.0, 1.0), "noise of the lynx counts"),
    ],
    vector_field=vector_field,
    observables=[
        Observable("hare", "hare", LogNormal("sigma_hare"), "thousand pelts"),
        Observable("lynx", "lynx", LogNormal("sigma_lynx"), "thousand pelts"),
    ],
    solver=ODESolver("tsit5", rtol=1e-8, atol=1e-8),
)

"""Observation map for intensity zinc probes: probe occupancy -> raw fluorescence."""

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import ArrayLike


class FluorescenceParams(eqx.Module):
    r"""Per-cell parameters of the intensity-probe observation model.

    Attributes
    ----------
    f_min : fluorescence of the zinc-free probe at $t_0$ (camera units).
    f_max : fluorescence of the zinc-saturated probe at $t_0$ (camera units), $> f_{min}$.
    bleach_rate_per_min : first-order loss of signal $k_b$ (1/min); negative values describe
        a slow gain drift.
    sigma : standard deviation of the measurement noise (camera units).
    """

    f_min: ArrayLike
    f_max: ArrayLike
    bleach_rate_per_min: ArrayLike
    sigma: ArrayLike


def fluorescence(probe_fraction, t_min, t0_min, obs: FluorescenceParams):
    r"""Expected fluorescence of one cell.

    $$F(t) = e^{-k_b (t - t_0)} \left(F_{min} + (F_{max} - F_{min})\,\theta_P(t)\right),$$

    where $\theta_P$ is the zinc-bound fraction of the probe; at binding equilibrium
    $\theta_P = Z_c / (K_P + Z_c)$, which inverts to the standard calibration formula
    $Z_c = K_P (F - F_{min}) / (F_{max} - F)$ (Grynkiewicz et al. 1985, J. Biol. Chem.
    260:3440) when there is no bleaching.
    """
    decay = jnp.exp(-obs.bleach_rate_per_min * (t_min - t0_min))
    return decay * (obs.f_min + (obs.f_max - obs.f_min) * probe_fraction)

"""Synthetic imaging data sets drawn from the zinc flux model."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from models import (
    PARAM_SPECS,
    FluorescenceParams,
    ProtocolInputs,
    SolverConfig,
    ZincFluxParams,
    ZincFluxRapidEquilibrium,
    default_params,
    fluorescence,
    solve,
)

from ._model import DEFAULT_PER_CELL


@dataclasses.dataclass(frozen=True)
class SimulationSettings:
    """How a synthetic data set varies between cells and how it is observed.

    Attributes
    ----------
    num_cells : number of cells.
    frame_interval_min : time between frames (minutes).
    population : population medians of the kinetic constants (defaults: prior medians).
    per_cell : constants that vary between cells, log-normally with sd ``cell_sd_log``.
    cell_sd_log : between-cell sd of the log of each per-cell constant.
    f_min_median : median zinc-free fluorescence (camera units); per-cell probe loading is
        log-normal with sd ``loading_sd_log`` and scales F_min and F_max together.
    dynamic_range_median : median F_max / F_min; log sd ``dynamic_range_sd_log``.
    bleach_mean_per_min, bleach_sd_per_min : normal distribution of per-cell bleaching rates.
    noise_fraction : noise sd as a fraction of each cell's F_min.
    """

    num_cells: int = 16
    frame_interval_min: float = 0.25
    population: dict = dataclasses.field(default_factory=dict)
    per_cell: tuple[str, ...] = DEFAULT_PER_CELL
    cell_sd_log: float = 0.3
    f_min_median: float = 200.0
    loading_sd_log: float = 0.4
    dynamic_range_median: float = 8.0
    dynamic_range_sd_log: float = 0.15
    bleach_mean_per_min: float = 0.004
    bleach_sd_per_min: float = 0.002
    noise_fraction: float = 0.03

    def __post_init__(self):
        if self.num_cells < 1:
            raise ValueError(f"num_cells must be >= 1, got {self.num_cells}.")
        if self.frame_interval_min <= 0:
            raise ValueError(f"frame_interval_min must be > 0, got {self.frame_interval_min}.")
        unknown = (set(self.population) | set(self.per_cell)) - set(PARAM_SPECS)
        if unknown:
            raise ValueError(f"Unknown parameter(s) {sorted(unknown)}.")


def simulate_imaging(protocol: ProtocolInputs, settings: SimulationSettings, *, key):
    """Draw per-cell parameters and noisy fluorescence traces.

    Returns
    -------
    dict with ``time_min`` (n_time,), ``intensity`` (n_cells, n_time), ``zc_nM`` (true free
    zinc), ``population`` (dict), ``cells`` (dict of per-cell arrays: kinetic and observation
    parameters).
    """
    s = settings
    n = s.num_cells
    time_min = np.arange(protocol.t0, protocol.end_min + 1e-9, s.frame_interval_min)
    pop = default_params(**s.population)
    k_kin, k_load, k_range, k_bleach, k_noise = jax.random.split(key, 5)
    z = jax.random.normal(k_kin, (len(s.per_cell), n))
    values = {}
    for name in PARAM_SPECS:
        base = jnp.asarray(getattr(pop, name), dtype=float)
        if name in s.per_cell:
            values[name] = base * jnp.exp(s.cell_sd_log * z[s.per_cell.index(name)])
        else:
            values[name] = jnp.full((n,), base)
    params = ZincFluxParams(**values)
    loading = jnp.exp(s.loading_sd_log * jax.random.normal(k_load, (n,)))
    f_min = s.f_min_median * loading
    dyn = s.dynamic_range_median * jnp.exp(s.dynamic_range_sd_log * jax.random.normal(k_range, (n,)))
    bleach = s.bleach_mean_per_min + s.bleach_sd_per_min * jax.random.normal(k_bleach, (n,))
    sigma = s.noise_fraction * f_min
    obs = FluorescenceParams(f_min=f_min, f_max=f_min * dyn, bleach_rate_per_min=bleach, sigma=sigma)
    model = ZincFluxRapidEquilibrium(protocol)
    config = SolverConfig(rtol=1e-8, atol=1e-10)
    ts = jnp.asarray(time_min)

    def one(p, o):
        traj = solve(model, p, ts, config=config, throw=True)
        return fluorescence(traj.probe_fraction, ts, protocol.t0, o), traj.zc_nM

    f, zc = jax.jit(jax.vmap(one))(params, obs)
    noisy = f + sigma[:, None] * jax.random.normal(k_noise, f.shape)
    cells = {name: np.asarray(values[name]) for name in s.per_cell}
    cells.update(
        f_min=np.asarray(f_min), f_max=np.asarray(f_min * dyn),
        bleach_rate_per_min=np.asarray(bleach), sigma=np.asarray(sigma),
    )
    population = {name: float(getattr(pop, name)) for name in PARAM_SPECS}
    return {
        "time_min": time_min,
        "intensity": np.asarray(noisy),
        "zc_nM": np.asarray(zc),
        "population": population,
        "cells": cells,
    }

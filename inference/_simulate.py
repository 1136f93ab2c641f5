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


def simulate_ct(design, *, reference_genes=("GAPDH",), samples_per_group: int = 6, replicates: int = 3,
                baseline_ct: dict | None = None, sigma_tech_ct: float = 0.15, sigma_bio: float = 0.2,
                load_sd: float = 0.3, efficiency: dict | None = None, ct_cutoff: float = 40.0,
                dose_unit: str = "mg/kg", seed: int = 0):
    r"""A synthetic raw-Ct table with known fold changes (the generative model of the Ct likelihood).

    Parameters
    ----------
    design : DataFrame with columns ``gene, tissue, species, form, dose, fold_change``: the true
        fold change of each target gene in each group; dose-0 rows (fold change 1) are the
        controls and must be present for every tissue.
    reference_genes : normaliser genes (true fold change 1 everywhere).
    samples_per_group, replicates : biological samples per group, technical wells per gene and sample.
    baseline_ct : control-level Ct of each gene (default 25 for targets, 20 for references).
    sigma_tech_ct : technical (well) noise sd, in cycles.
    sigma_bio : sample-to-sample biological sd of each gene's log expression (natural log).
    load_sd : sd of each sample's RNA input (natural log), shared by all its genes.
    efficiency : amplification factor per cycle by gene (default 2).
    ct_cutoff : wells whose Ct exceeds it are written as ``Undetermined``.

    Returns
    -------
    DataFrame with columns ``gene, sample, tissue, species, form, dose, dose_unit, replicate, ct``
    (``ct`` as text, as instruments export it), ready for :func:`data.read_ct`.

    Notes
    -----
    $C_t = \alpha_g - (\ln FC + b_s + e_{gs}) / \ln E_g + \varepsilon$, with
    $b_s \sim N(0, \mathrm{load\_sd}^2)$, $e_{gs} \sim N(0, \sigma_{bio}^2)$,
    $\varepsilon \sim N(0, \sigma_{tech}^2)$.
    """
    import pandas as pd

    rng = np.random.default_rng(seed)
    design = pd.DataFrame(design)
    targets = list(dict.fromkeys(design["gene"]))
    genes = targets + list(reference_genes)
    base = {g: 20.0 if g in reference_genes else 25.0 for g in genes}
    base.update(baseline_ct or {})
    eff = {g: 2.0 for g in genes}
    eff.update(efficiency or {})
    groups = design[["tissue", "species", "form", "dose"]].drop_duplicates().itertuples(index=False)
    fc = {(r.gene, r.tissue, r.species, r.form, r.dose): r.fold_change for r in design.itertuples(index=False)}
    rows = []
    for k, (tissue, species, form, dose) in enumerate(groups):
        for j in range(samples_per_group):
            sample = f"S{k + 1:02d}_{j + 1}"
            load = rng.normal(0.0, load_sd)
            for g in genes:
                log_fc = 0.0 if g in reference_genes else np.log(fc.get((g, tissue, species, form, dose), np.nan))
                if not np.isfinite(log_fc):
                    continue
                e = rng.normal(0.0, sigma_bio)
                for r in range(replicates):
                    ct = base[g] - (log_fc + load + e) / np.log(eff[g]) + rng.normal(0.0, sigma_tech_ct)
                    rows.append({"gene": g, "sample": sample, "tissue": tissue, "species": species, "form": form,
                                 "dose": dose, "dose_unit": dose_unit, "replicate": r + 1,
                                 "ct": "Undetermined" if ct > ct_cutoff else f"{ct:.3f}"})
    return pd.DataFrame(rows)

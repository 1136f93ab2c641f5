"""``zinckin compare``: PSIS-LOO comparison of runs fitted to the same data (arviz-stats ``compare``).

Each run's observations (every data set and observable, masked values left out) form one
pointwise log-likelihood vector (:func:`inference._review.pointwise`); the runs must have the same
observations, in the same order, with the same values, or the comparison means nothing and is
refused. The table is arviz's: ``rank``, ``elpd`` (higher is better), ``p`` (effective number of
parameters), ``elpd_diff`` and its standard error ``dse`` against the best run, stacking
``weight`` and ``warning`` (Pareto k above its threshold somewhere).

Where an imaging run kept per-frame values for a subset of its cells (``[output]
predictive_cells``), every run is compared on the observations of the cells they all kept.
"""

import warnings
from pathlib import Path

import arviz_plots as azp
import arviz_stats as azs
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import xarray as xr

from ._output import atomic_write
from ._review import per_frame_cells, pointwise


def _all_cells(tree: xr.DataTree) -> list:
    obs = tree["observed_data"]
    return list(obs["cell"].values) if "cell" in obs.dims else []


def _labels(run_dirs: list[Path]) -> list[str]:
    names = [Path(d).resolve().name for d in run_dirs]
    if len(set(names)) == len(names):
        return names
    return [str(Path(d)) for d in run_dirs]


def compare_runs(run_dirs: list[Path], out: Path) -> pd.DataFrame:
    """Compare the runs by PSIS-LOO; writes ``compare.csv`` and ``compare.png`` into ``out``.

    Raises
    ------
    ValueError
        Two runs do not share their observations (named, with the first difference), or a run
        has no ``log_likelihood`` group.
    """
    data = {}
    first_label, first_obs = None, None
    trees = []
    for d in run_dirs:
        tree = xr.open_datatree(Path(d) / "posterior.nc", engine="h5netcdf")
        if "log_likelihood" not in tree.children:
            raise ValueError(f"{d}: its posterior.nc has no log_likelihood group, so LOO cannot be computed. "
                             "Fix: refit it with this zinckin.")
        trees.append(tree)
    # imaging fits of many cells keep per-frame values for a subset of them: compare on the
    # cells every run kept
    kept = [per_frame_cells(t) for t in trees]
    cells = None
    if any(k is not None and len(k) < len(_all_cells(t)) for k, t in zip(kept, trees)):
        if any(k is None for k in kept) or any(_all_cells(t) != _all_cells(trees[0]) for t in trees):
            raise ValueError("the runs were fitted to different cells. Fix: compare only runs of the same data set.")
        cells = [c for c in kept[0] if all(c in set(k) for k in kept[1:])]
        if not cells:
            raise ValueError("the runs kept per-frame values for disjoint sets of cells, so they share no observation "
                             "to compare. Fix: refit them with the same [output] predictive_cells (or \"all\").")
        print(f"comparing on the observations of the {len(cells)} cells every run kept per frame "
              "([output] predictive_cells)", flush=True)
    for label, d, tree in zip(_labels(run_dirs), run_dirs, trees):
        pw = pointwise(tree, cells=cells)
        obs = np.asarray(pw["observed_data"]["y"])
        if first_obs is None:
            first_label, first_obs = label, obs
        elif obs.shape != first_obs.shape:
            raise ValueError(f"runs {first_label} and {label} were fitted to different data ({first_obs.size} and "
                             f"{obs.size} observations). Fix: compare only runs of the same data set.")
        elif not np.allclose(obs, first_obs, rtol=1e-12, atol=0.0):
            i = int(np.flatnonzero(~np.isclose(obs, first_obs, rtol=1e-12, atol=0.0))[0])
            raise ValueError(f"runs {first_label} and {label} were fitted to different data (observation {i}: "
                             f"{first_obs[i]:g} against {obs[i]:g}). Fix: compare only runs of the same data set.")
        data[label] = pw
    with warnings.catch_warnings():  # Pareto k above its threshold: the table's ``warning`` column says so
        warnings.filterwarnings("ignore", message=".*Pareto.*", category=UserWarning)
        table = azs.compare(data, var_name="y", round_to="none")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "compare.csv", lambda tmp: table.to_csv(tmp))
    pc = azp.plot_compare(table, backend="matplotlib")
    atomic_write(out / "compare.png", lambda tmp: pc.savefig(tmp, dpi=90, bbox_inches="tight"))
    plt.close("all")
    return table

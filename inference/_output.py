"""Run-directory outputs: netCDF, summary table, diagnostics and plots, written atomically."""

import json
import os
import tempfile
from pathlib import Path

import matplotlib


matplotlib.use("Agg")
import arviz_plots as azp  # noqa: E402
import arviz_stats as azs  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import xarray as xr  # noqa: E402


def atomic_write(path: Path, write_fn) -> None:
    """Call ``write_fn(tmp_path)``, fsync, then rename onto ``path``.

    A crash leaves at worst a stray temp file, never a half-written file under ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write_fn(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_tree(tree: xr.DataTree, path: Path) -> None:
    """Write the DataTree to netCDF (h5netcdf engine) atomically."""
    atomic_write(path, lambda tmp: tree.to_netcdf(tmp, engine="h5netcdf"))


def population_summary(tree: xr.DataTree, var_names) -> pd.DataFrame:
    """mean, sd, 90% HDI, bulk and tail ESS, R-hat for the population parameters."""
    return azs.summary(tree, var_names=list(var_names), ci_prob=0.9, ci_kind="hdi", round_to="none")


def diagnostics(tree: xr.DataTree, var_names) -> dict:
    """Convergence numbers for the run summary."""
    post = tree["posterior"].to_dataset()[list(var_names)]
    rhat = azs.rhat(post)
    ess_bulk = azs.ess(post, method="bulk")
    ess_tail = azs.ess(post, method="tail")
    stats = tree["sample_stats"]
    return {
        "max_r_hat": float(max(float(rhat[v].max()) for v in rhat.data_vars)),
        "min_ess_bulk": float(min(float(ess_bulk[v].min()) for v in ess_bulk.data_vars)),
        "min_ess_tail": float(min(float(ess_tail[v].min()) for v in ess_tail.data_vars)),
        "divergences": int(stats["diverging"].sum()),
        "draws_with_solver_failures": int((stats["solver_failures"] > 0).sum()),
        "max_tree_depth_hits": int(stats["reached_max_tree_depth"].sum()),
        "num_chains": int(tree["posterior"].sizes["chain"]),
        "num_draws": int(tree["posterior"].sizes["draw"]),
    }


def _save_fig(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)


def plot_rank(tree: xr.DataTree, var_names, path: Path) -> None:
    """Rank plots of the population parameters (arviz-plots)."""
    pc = azp.plot_rank(tree, var_names=list(var_names), backend="matplotlib")
    atomic_write(path, pc.savefig)
    plt.close("all")


def plot_trace(tree: xr.DataTree, var_names, path: Path) -> None:
    """Trace and marginal density plots of the population parameters (arviz-plots)."""
    pc = azp.plot_trace_dist(tree, var_names=list(var_names), backend="matplotlib")
    atomic_write(path, pc.savefig)
    plt.close("all")


def plot_ppc_traces(tree: xr.DataTree, path: Path, *, num_cells: int = 8) -> None:
    """Observed traces of a sample of cells over the 90% posterior predictive band and median."""
    obs = tree["observed_data"]["intensity"]
    ppc = tree["posterior_predictive"]["intensity"]
    t = tree["constant_data"]["time_min"].values
    starts = tree["constant_data"]["segment_start_min"].values
    kinds = list(tree["constant_data"]["segment"].values)
    cells = list(obs["cell"].values)
    pick = [cells[i] for i in np.unique(np.linspace(0, len(cells) - 1, min(num_cells, len(cells))).astype(int))]
    ncol = min(4, len(pick))
    nrow = int(np.ceil(len(pick) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.6 * ncol, 2.7 * nrow), squeeze=False, sharex=True)
    for ax, cell in zip(axes.flat, pick):
        draws = ppc.sel(cell=cell).stack(sample=("chain", "draw")).transpose("sample", "time").values
        lo, med, hi = np.percentile(draws, [5, 50, 95], axis=0)
        ax.fill_between(t, lo, hi, color="C0", alpha=0.3, lw=0, label="90% predictive")
        ax.plot(t, med, color="C0", lw=1, label="predictive median")
        ax.plot(t, obs.sel(cell=cell).values, ".", color="k", ms=2.5, label="observed")
        for s, k in zip(starts[1:], kinds[1:]):
            ax.axvline(s, color="0.6", lw=0.6, ls="--")
            ax.text(s, 1.0, k, transform=ax.get_xaxis_transform(), fontsize=6, va="bottom", ha="left", color="0.4")
        ax.set_title(str(cell), fontsize=9, pad=10)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(pick):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("time (min)", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("fluorescence", fontsize=8)
    axes.flat[0].legend(fontsize=6, loc="upper left")
    fig.suptitle("Posterior predictive check: observed traces and 90% predictive intervals", fontsize=10)
    fig.tight_layout()
    _save_fig(fig, path)


def write_json(obj, path: Path) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n"))

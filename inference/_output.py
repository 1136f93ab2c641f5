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
import matplotlib.ticker  # noqa: E402
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
    ds = tree["posterior"].to_dataset()[list(var_names)]
    if "group" in ds.dims and "group_gene" in ds.coords:  # transcript groups: readable row labels
        c = ds.coords
        ds = ds.assign_coords(group=[f"{g} {t} {f} {d:g}" for g, t, f, d in zip(
            c["group_gene"].values, c["group_tissue"].values, c["group_form"].values, c["group_dose"].values)])
    ds = ds.drop_vars([name for name in ds.coords if name not in ds.dims])
    return azs.summary(ds, ci_prob=0.9, ci_kind="hdi", round_to="none")


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


def map_vs_posterior(model, model_args, laplace, tree: xr.DataTree, var_names) -> pd.DataFrame:
    """The MAP (the NUTS starting point) beside the posterior mean and sd of each parameter.

    ``z_score`` is (MAP - mean) / sd: a MAP several sds from the mean marks a skewed or
    multi-modal posterior, where the MAP alone (``method = "map"``) would mislead.
    """
    from numpyro.infer.util import constrain_fn

    point = constrain_fn(model, model_args, {}, laplace.z_map, return_deterministic=True)
    post = tree["posterior"]
    rows = []
    for name in var_names:
        if name not in point or name not in post:
            continue
        m = np.asarray(point[name], dtype=float)
        mean = post[name].mean(("chain", "draw")).values
        sd = post[name].std(("chain", "draw")).values
        if m.shape != mean.shape:
            continue
        for idx in np.ndindex(m.shape):
            label = name + (f"[{','.join(map(str, idx))}]" if idx else "")
            rows.append({"parameter": label, "map": m[idx], "mean": float(mean[idx]), "sd": float(sd[idx]),
                         "z_score": float((m[idx] - mean[idx]) / sd[idx]) if sd[idx] > 0 else float("nan")})
    return pd.DataFrame(rows, columns=["parameter", "map", "mean", "sd", "z_score"]).set_index("parameter")


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
    """Observed traces of a sample of cells over the 90% posterior predictive band and median
    (from the cells with predictive draws, ``predictive_cell``, where the fit kept a subset).
    """
    obs = tree["observed_data"]["intensity"]
    ppc = tree["posterior_predictive"]["intensity"]
    if "predictive_cell" in ppc.dims:
        ppc = ppc.rename(predictive_cell="cell")
    t = tree["constant_data"]["time_min"].values
    starts = tree["constant_data"]["segment_start_min"].values
    kinds = list(tree["constant_data"]["segment"].values)
    cells = list(ppc["cell"].values)
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


def plot_dose_response(tree: xr.DataTree, path: Path, *, livak: pd.DataFrame | None = None,
                       title: str = "Dose response: observed fold changes and the posterior") -> None:
    """One panel per (gene, tissue): observed fold changes against dose with the posterior.

    Fold-change fits: observed points, the 90% posterior predictive interval of each observation
    (bars) and, for model B, the 90% band and median of the noise-free steady-state fold change
    on the dose grid (lines between the grid doses). Raw-Ct fits: the posterior median and 90%
    interval of each group's fold change, with the classic 2^-ddCt estimates as points.
    """
    post = tree["posterior"]
    dose_unit = tree.attrs.get("dose_unit", "")
    forms = list(post["form"].values) if "form" in post.coords else []
    colors = {f: f"C{i}" for i, f in enumerate(forms)}
    if "fold_change_obs" in tree["observed_data"]:
        obs = tree["observed_data"]["fold_change_obs"]
        pp = tree["posterior_predictive"]["fold_change_obs"].stack(s=("chain", "draw")).transpose("obs", "s").values
        lo, med, hi = np.quantile(pp, [0.05, 0.5, 0.95], axis=1)
        rows = pd.DataFrame({"gene": obs["obs_gene"].values, "tissue": obs["obs_tissue"].values,
                             "form": obs["obs_form"].values, "dose": obs["obs_dose"].values,
                             "point": obs.values, "lo": lo, "med": med, "hi": hi})
        point_label, bar_label = "observed", "90% predictive"
    else:
        g = post["group_fold_change"] if "group_fold_change" in post else None
        if g is None:  # model B on Ct data: pick the grid values of each group
            fc = post["fold_change"]
            gsel = [fc.sel(tissue=t, form=f, dose=d, gene=gn) for gn, t, f, d in zip(
                post["group_gene"].values, post["group_tissue"].values, post["group_form"].values, post["group_dose"].values)]
            draws = np.stack([v.values.ravel() for v in gsel])
        else:
            draws = g.stack(s=("chain", "draw")).transpose("group", "s").values
        lo, med, hi = np.quantile(draws, [0.05, 0.5, 0.95], axis=1)
        rows = pd.DataFrame({"gene": post["group_gene"].values, "tissue": post["group_tissue"].values,
                             "form": post["group_form"].values, "dose": post["group_dose"].values,
                             "lo": lo, "med": med, "hi": hi, "point": np.nan})
        if livak is not None:
            key = livak.set_index(["gene", "tissue", "form", "dose"])["fold_change"]
            rows["point"] = [key.get((r.gene, r.tissue, r.form, r.dose), np.nan) for r in rows.itertuples()]
        point_label, bar_label = "2^-ddCt estimate", "90% posterior"
    panels = list(dict.fromkeys(zip(rows["gene"], rows["tissue"])))
    ncol = min(3, len(panels))
    nrow = int(np.ceil(len(panels) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.8 * ncol, 3.0 * nrow), squeeze=False)
    for ax, (gene, tissue) in zip(axes.flat, panels):
        sel = rows[(rows["gene"] == gene) & (rows["tissue"] == tissue)]
        if "fold_change" in post and gene in list(post["gene"].values):
            fc = post["fold_change"].sel(gene=gene, tissue=tissue)
            for form in sorted(set(sel["form"])):
                band = fc.sel(form=form).stack(s=("chain", "draw")).transpose("dose", "s").values
                q = np.quantile(band, [0.05, 0.5, 0.95], axis=1)
                d = fc["dose"].values
                ax.fill_between(d, q[0], q[2], color=colors.get(form, "C0"), alpha=0.15, lw=0)
                ax.plot(d, q[1], color=colors.get(form, "C0"), lw=1, label=f"model B, {form}")
        span = float(rows["dose"].max()) or 1.0
        for k, form in enumerate(sorted(set(sel["form"]))):
            s = sel[sel["form"] == form]
            c = colors.get(form, "C0")
            x = s["dose"] + 0.015 * span * (k - 0.5 * (len(set(sel["form"])) - 1))  # side by side when forms share a dose
            ax.errorbar(x, s["med"], yerr=[s["med"] - s["lo"], s["hi"] - s["med"]], fmt="_", color=c,
                        capsize=3, lw=1, label=f"{bar_label}, {form}")
            ax.plot(x, s["point"], "o", color="k", ms=4, mfc=c, label=f"{point_label}, {form}")
        ax.plot([0], [1], "o", color="k", ms=4, mfc="w", label="control (1 by definition)")
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(f"{gene}, {tissue}", fontsize=9)
        ax.set_xlabel(f"dose ({dose_unit})", fontsize=8)
        ax.set_ylabel("fold change vs control", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    legend = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(lab, h)
    fig.legend(list(legend.values()), list(legend),  fontsize=6, loc="lower center", ncol=3, bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    _save_fig(fig, path)


def plot_timeseries_fit(problem, bands: dict, path: Path) -> None:
    """Data and posterior 90% band / median of every observable, one row per data set."""
    m = problem.model
    names = [o.name for o in m.observables]
    n_rows, n_cols = len(problem.datasets), len(names)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(4.2 * n_cols, 3.0 * n_rows), squeeze=False)
    for r, d in enumerate(problem.datasets):
        b = bands[d.name]
        for c, name in enumerate(names):
            ax = axes[r, c]
            q = b.get(name)
            if q is not None:
                ax.fill_between(b["time"], q[0], q[2], color="C0", alpha=0.25, lw=0, label="90% posterior band")
                ax.plot(b["time"], q[1], color="C0", lw=1.5, label="posterior median")
            if name in d.observed:
                unit, idx, values = d.observed[name]
                if d.units is None:
                    ax.plot(d.times[idx], values, "o", color="k", ms=3.5, label="data")
                else:  # units: faint lines, the band is the population-typical unit's
                    for u in np.unique(unit):
                        sel = unit == u
                        ax.plot(d.times[idx[sel]], values[sel], "-o", color="k", lw=0.5, ms=1.5, alpha=0.35,
                                label=f"data ({len(d.units)} units)" if u == unit[0] else None)
            unit = next(o.unit for o in m.observables if o.name == name)
            ax.set_title(f"{d.name}: {name}" if n_rows > 1 else name, fontsize=10)
            ax.set_xlabel(f"time ({m.time_unit})" if m.time_unit else "time")
            ax.set_ylabel(f"{name} ({unit})" if unit else name)
    axes[0, 0].legend(fontsize=8, frameon=False)
    fig.suptitle(f"model {m.name}", fontsize=11)
    _save_fig(fig, path)

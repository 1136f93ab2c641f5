"""``zinckin report``: one self-contained HTML page per run, with its figures beside it.

The page answers, in order: can the fit be trusted (the gate's verdict and checks, solver
failures, trace and rank plots), what was learned (the population summary, prior against
posterior, the pair plot and its strongest correlations, per-cell or per-unit values), what was
not (the profile-likelihood identifiability table, when ``zinckin profile`` has run), and how the
predictions sit on the data (every cell's or unit's trace ordered by a fit-quality score with the
worst first, every gene's dose response, LOO-PIT calibration and the LOO summary).

Plots come from arviz-plots where it has them (trace, rank, prior/posterior, pair, forest,
LOO-PIT); the predictive overlays, the caterpillar plot of large runs and the profile curves are
matplotlib. Images are embedded in the HTML (base64), so the page needs no network and no other
file; the PNGs are also written beside it.
"""

import base64
import dataclasses
import html
import json
import time
import warnings
from pathlib import Path

import matplotlib


matplotlib.use("Agg")
import arviz_plots as azp  # noqa: E402
import arviz_stats as azs  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import xarray as xr  # noqa: E402

from ._output import atomic_write, plot_dose_response  # noqa: E402


PANELS_PER_PAGE = 20  # 5 columns x 4 rows
MAX_FOREST_ROWS = 40  # above this many units per variable, a caterpillar plot instead of a forest plot
BAND_DRAWS = 400  # predictive draws used for the bands and the fit-quality score
LOO_DRAWS = 1000  # draws used for LOO and LOO-PIT
# observations used for LOO and LOO-PIT in the report (a random subset above this; arviz's PSIS
# takes about 0.4 ms per observation, 45 s for the 121,000 of 1,000 cells)
LOO_OBS = 20_000
UNIT_DIMS = ("cell", "unit", "tissue", "dataset")


@dataclasses.dataclass
class Panel:
    """One trace (cell, unit or data set x observable) with its predictive band."""

    title: str
    x: np.ndarray
    observed: np.ndarray
    band: np.ndarray  # (3, n): 5%, 50%, 95% predictive quantiles
    score: float  # root mean square of (observed - predictive mean) / predictive sd
    coverage: float  # fraction of observations inside the 90% band
    xlabel: str
    ylabel: str
    marks: tuple = ()  # (x, label) vertical lines (protocol segments)


def _score(observed, draws):
    """Fit-quality score and 90% coverage of observations (last axis) against draws (first axis)."""
    mean, sd = draws.mean(0), draws.std(0)
    z = (observed - mean) / np.where(sd > 0, sd, np.nan)
    lo, hi = np.quantile(draws, [0.05, 0.95], axis=0)
    inside = np.where(np.isfinite(observed), (observed >= lo) & (observed <= hi), np.nan)
    with np.errstate(invalid="ignore"):
        return np.sqrt(np.nanmean(z**2, axis=-1)), np.nanmean(inside, axis=-1)


def _thin(da: xr.DataArray, max_draws: int) -> np.ndarray:
    """(samples, ...) array of at most about ``max_draws`` draws, evenly over every chain."""
    step = max(1, int(np.ceil(da.sizes["chain"] * da.sizes["draw"] / max_draws)))
    a = np.asarray(da.isel(draw=slice(None, None, step)), dtype=float)
    return a.reshape((-1,) + a.shape[2:])


def predictive_panels(tree: xr.DataTree) -> list[Panel]:
    """Panels of an imaging fit (one per cell) or a user-model fit (one per data set x observable,
    or per unit where the data set has units); empty for transcript fits.
    """
    obs_group, pp = tree["observed_data"], tree["posterior_predictive"]
    const = tree["constant_data"] if "constant_data" in tree.children else xr.Dataset()
    if "intensity" in obs_group and "cell" in obs_group["intensity"].dims:
        predicted = pp["intensity"]
        if "predictive_cell" in predicted.dims:  # draws kept for a subset of the cells: those panels
            predicted = predicted.rename(predictive_cell="cell")
            obs_group = obs_group.to_dataset().sel(cell=predicted["cell"].values)
        observed = np.asarray(obs_group["intensity"], dtype=float)
        draws = _thin(predicted, BAND_DRAWS)
        scores, cover = _score(observed, draws)
        q = np.quantile(draws, [0.05, 0.5, 0.95], axis=0)
        t = np.asarray(const["time_min"])
        starts = np.asarray(const["segment_start_min"])
        marks = tuple(zip(starts[1:], list(const["segment"].values)[1:]))
        return [Panel(str(c), t, observed[i], q[:, i], float(scores[i]), float(cover[i]), "time (min)",
                      "fluorescence", marks) for i, c in enumerate(obs_group["cell"].values)]
    panels = []
    time_unit = tree.attrs.get("time_unit") or ""
    for site in obs_group.data_vars:
        tname = f"{site}_time"
        if tname not in const:
            return []  # not a time course (transcript tables): no trace panels
        observed = np.asarray(obs_group[site], dtype=float)
        draws = _thin(pp[site], BAND_DRAWS)
        t = np.asarray(const[tname], dtype=float)
        units = np.asarray(const[f"{site}_unit"]).astype(str) if f"{site}_unit" in const else None
        groups = [(None, np.arange(observed.size))] if units is None else [
            (u, np.flatnonzero(units == u)) for u in dict.fromkeys(units)]
        unit_attr = obs_group[site].attrs.get("units", "")
        label = site.replace("__", ": ")
        for u, idx in groups:
            idx = idx[np.argsort(t[idx], kind="stable")]
            scores, cover = _score(observed[idx], draws[:, idx])
            q = np.quantile(draws[:, idx], [0.05, 0.5, 0.95], axis=0)
            panels.append(Panel(label if u is None else f"{label} [{u}]", t[idx], observed[idx], q, float(scores),
                                float(cover), f"time ({time_unit})" if time_unit else "time",
                                f"{site.split('__')[-1]} ({unit_attr})" if unit_attr else site.split("__")[-1]))
    return panels


def plot_panel_page(panels: list[Panel], path: Path, *, title: str) -> None:
    """A grid of predictive overlays (up to :data:`PANELS_PER_PAGE`)."""
    ncol = min(5, len(panels))
    nrow = int(np.ceil(len(panels) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.3 * ncol, 2.5 * nrow), squeeze=False)
    for ax, p in zip(axes.flat, panels):
        ax.fill_between(p.x, p.band[0], p.band[2], color="C0", alpha=0.3, lw=0, label="90% predictive")
        ax.plot(p.x, p.band[1], color="C0", lw=1, label="predictive median")
        ax.plot(p.x, p.observed, ".", color="k", ms=2.5, label="observed")
        for x, lab in p.marks:
            ax.axvline(x, color="0.6", lw=0.6, ls="--")
            ax.text(x, 1.0, lab, transform=ax.get_xaxis_transform(), fontsize=6, va="bottom", ha="left", color="0.4")
        ax.set_title(f"{p.title}\nscore {p.score:.2f}, in band {100 * p.coverage:.0f}%", fontsize=8, pad=9)
        ax.set_xlabel(p.xlabel, fontsize=7)
        ax.set_ylabel(p.ylabel, fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=6, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90, bbox_inches="tight"))
    plt.close(fig)


def _many_subplots():
    """arviz-plots refuses more than 40 subplots by default; the pair plot of 11 parameters has 121."""
    import arviz_base

    return arviz_base.rc_context({"plot.max_subplots": 400})


def _grid_size(n: int, *, cols: int = 4, height: float = 2.8) -> dict:
    """arviz-plots keywords for a roomy grid of ``n`` panels (titles clear of the axes above)."""
    rows = int(np.ceil(n / cols))
    return {"col_wrap": cols, "figure_kwargs": {"figsize": (3.6 * cols, height * rows), "layout": "constrained"}}


def _save_pc(pc, path: Path) -> None:
    atomic_write(path, lambda tmp: pc.savefig(tmp, dpi=80, bbox_inches="tight"))
    plt.close("all")


def _pair(tree: xr.DataTree, names: list[str], path: Path) -> None:
    with _many_subplots():
        pc = azp.plot_pair(tree, var_names=names, backend="matplotlib", marginal_kind="kde",
                           visuals={"scatter": {"alpha": 0.2}})
    _save_pc(pc, path)


def unit_variables(post: xr.DataTree) -> list[str]:
    """Posterior variables with one value per cell, unit, tissue or data set (raw ``*_z`` left out)."""
    out = []
    for name, v in post.data_vars.items():
        extra = [d for d in v.dims if d not in ("chain", "draw")]
        if len(extra) == 1 and extra[0] in UNIT_DIMS and not name.endswith("_z"):
            if extra[0] in ("cell", "unit") and not (name.endswith("_cell") or name.endswith("_unit")):
                continue  # per-cell observation parameters (F_min, F_max, noise): nuisance here
            out.append(name)
    return out


def plot_caterpillar(post: xr.DataTree, names: list[str], path: Path) -> None:
    """Per-unit posterior medians and 90% intervals, units sorted by median (one panel per variable)."""
    fig, axes = plt.subplots(1, len(names), figsize=(4.0 * len(names), 4.0), squeeze=False)
    for ax, n in zip(axes.flat, names):
        v = post[n]
        dim = [d for d in v.dims if d not in ("chain", "draw")][0]
        q = np.asarray(v.quantile([0.05, 0.5, 0.95], dim=("chain", "draw")).transpose("quantile", dim))
        order = np.argsort(q[1])
        x = np.arange(q.shape[1])
        ax.vlines(x, q[0, order], q[2, order], color="C0", lw=0.6, alpha=0.6)
        ax.plot(x, q[1, order], ".", color="k", ms=2)
        ax.set_yscale("log" if (q > 0).all() else "linear")
        ax.set_title(n, fontsize=9)
        ax.set_xlabel(f"{dim}s, sorted by median ({q.shape[1]})", fontsize=8)
    fig.suptitle("Per-unit posteriors: median and 90% interval", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def plot_profiles(curves: pd.DataFrame, table: pd.DataFrame, path: Path) -> None:
    """Profile curves (log-likelihood drop against the parameter) with the 95% threshold."""
    from ._review import PROFILE_THRESHOLD

    names = list(table.index)
    ncol = min(4, len(names))
    nrow = int(np.ceil(len(names) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.4 * ncol, 2.6 * nrow), squeeze=False)
    for ax, n in zip(axes.flat, names):
        c = curves[curves["parameter"] == n]
        ax.plot(c["value"], -c["delta"], "-o", ms=3, color="C0")
        ax.axhline(-PROFILE_THRESHOLD, color="C3", lw=0.8, ls="--")
        ax.set_ylim(max(-float(c["delta"].max()), -12 * PROFILE_THRESHOLD) - 0.5, 0.5)  # the threshold region
        if (c["value"] > 0).all() and c["value"].max() / c["value"].min() > 20:
            ax.set_xscale("log")
        ax.set_title(f"{n}: {table.loc[n, 'verdict']}", fontsize=8)
        ax.set_ylabel("log PL - max", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.suptitle("Profile likelihoods (dashed: 95% threshold, chi2(1)/2 = 1.92 below the maximum; "
                 "axes cut at 23 below)", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def strongest_correlations(post: xr.DataTree, names: list[str], *, threshold: float = 0.8) -> pd.DataFrame:
    """Pairs of population variables whose posterior rank correlation exceeds ``threshold`` in size."""
    frame = pd.DataFrame({n: np.asarray(post[n]).ravel() for n in names})
    rho = frame.rank().corr().to_numpy()
    rows = [{"first": a, "second": b, "rank_correlation": rho[i, j]}
            for i, a in enumerate(names) for j, b in enumerate(names) if j > i and abs(rho[i, j]) >= threshold]
    return pd.DataFrame(rows, columns=["first", "second", "rank_correlation"]).sort_values(
        "rank_correlation", key=np.abs, ascending=False)


# --------------------------------------------------------------------------------------- the page


def _img(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}" data-file="{path.name}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _table(frame: pd.DataFrame, *, index: bool = True) -> str:
    return frame.to_html(index=index, float_format=lambda v: f"{v:.4g}", border=0, classes="tab", na_rep="-")


_CSS = """
body{font-family:system-ui,sans-serif;max-width:1250px;margin:1.5em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.8em}
.verdict{padding:.6em 1em;border-radius:4px;font-weight:600}.ok{background:#dff0d8}.warn{background:#fcf8e3}
.bad{background:#f2dede}.note{color:#555;font-size:.92em}
table.tab{border-collapse:collapse;font-size:.85em;margin:.5em 0}table.tab td,table.tab th{padding:2px 8px;
border-bottom:1px solid #eee;text-align:right}figure{margin:1em 0}img{max-width:100%}
figcaption{font-size:.85em;color:#555}
"""

# Counts the images that decoded (read by the headless-browser test and shown at the foot of the page).
_IMAGE_CHECK = """<script>
window.addEventListener("load", function () {
  var imgs = document.querySelectorAll("img"), ok = 0;
  for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++; }
  var p = document.getElementById("image-check");
  p.textContent = "images loaded: " + ok + " of " + imgs.length;
  p.setAttribute("data-loaded", ok); p.setAttribute("data-total", imgs.length);
});
</script>"""


@dataclasses.dataclass
class Report:
    """What :func:`build_report` wrote: the page, the figures and how long it took."""

    html: Path
    figures: list[Path]
    seconds: float
    notes: list[str]


def build_report(run_dir: Path, *, out: Path | None = None, max_pages: int = 3, prior_draws: int = 2000,
                 seed: int = 0, log=print) -> Report:
    """Write ``report.html`` and its PNG figures for the run in ``run_dir`` (default folder:
    ``run_dir/report``).

    ``max_pages`` pages of :data:`PANELS_PER_PAGE` predictive overlays are drawn, worst fits first;
    every panel's score is in ``fit_scores.csv``. Prior draws need the run's config and inputs
    (``run.json`` provenance); if they changed or moved, that section says so and the rest of the
    report is built from ``posterior.nc`` alone.
    """
    import jax

    from ._config import ConfigError
    from ._review import pointwise, prior_draws as draw_prior
    from ._target import target_from_run

    start = time.perf_counter()
    run_dir = Path(run_dir)
    if not (run_dir / "posterior.nc").exists() or not (run_dir / "run.json").exists():
        raise FileNotFoundError(f"{run_dir}: no posterior.nc and run.json there. Fix: point zinckin report at the "
                                "run directory a finished `zinckin fit` wrote.")
    out = Path(out) if out is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    tree = xr.open_datatree(run_dir / "posterior.nc", engine="h5netcdf")
    record = json.loads((run_dir / "run.json").read_text())
    method = tree.attrs.get("method", record.get("method", "nuts"))
    post = tree["posterior"]
    notes, figures, sections = [], [], []

    def figure(name, caption, draw):
        t0 = time.perf_counter()
        path = out / name
        draw(path)
        figures.append(path)
        log(f"  {name}: {time.perf_counter() - t0:.1f} s")
        return _img(path, caption)

    target = None
    try:
        target = target_from_run(run_dir)
        names = [n for n in target.names if n in post]
    except (ConfigError, OSError, ValueError) as err:
        notes.append(f"The run's model could not be rebuilt, so prior draws are left out: {err}")
        names = [n for n, v in post.data_vars.items() if v.dims == ("chain", "draw")]
    scalar = [n for n in names if post[n].dims == ("chain", "draw")]

    # --- can the fit be trusted
    gate = record.get("gate")
    if gate is not None:
        cls = {"converged": "ok"}.get(gate["verdict"], "bad")
        if gate["verdict"] == "converged" and gate.get("warnings"):
            cls = "warn"
        head = f'<p class="verdict {cls}">Gate verdict: {html.escape(gate["verdict"])}'
        if gate.get("failed"):
            head += f" (failed: {html.escape(', '.join(gate['failed']))})"
        head += "</p>" + _table(pd.DataFrame(gate["checks"]), index=False)
        for w in gate.get("warnings", []):
            head += f'<p class="note">{html.escape(str(w))}</p>'
    else:
        head = (f'<p class="verdict warn">Method {html.escape(method)}: draws of an approximation, not MCMC; no '
                "convergence gate applies. Check it against a NUTS run before trusting its intervals.</p>")
    stats = tree["sample_stats"]
    fails = np.asarray(stats["solver_failures"])
    fail_table = pd.DataFrame({"chain": np.arange(fails.shape[0]),
                               "draws with failed solves": (fails > 0).sum(axis=1),
                               "failed solves (total)": fails.sum(axis=1)})
    if "diverging" in stats:
        fail_table["divergent draws"] = np.asarray(stats["diverging"]).sum(axis=1)
    head += "<h3>Solver failures and divergences per chain</h3>" + _table(fail_table, index=False)
    for w in record.get("warnings", []):
        head += f'<p class="note">Warning recorded by the fit: {html.escape(str(w))}</p>'
    sections.append(("Diagnostics", head))

    summary = pd.read_csv(run_dir / "summary.csv", index_col=0) if (run_dir / "summary.csv").exists() else None
    if summary is not None:
        sections.append(("Population parameters", _table(summary)))

    if method == "nuts" and scalar:
        body = figure("trace.png", "Trace and marginal posterior of each population parameter, by chain",
                      lambda p: _save_pc(azp.plot_trace_dist(tree, var_names=scalar, backend="matplotlib"), p))
        body += figure("rank.png", "Rank plots: each chain's ECDF of fractional ranks minus the uniform; chains that sample the same "
                       "distribution stay inside the envelope (p: uniformity test)",
                       lambda p: _save_pc(azp.plot_rank(tree, var_names=scalar, backend="matplotlib",
                                                                       **_grid_size(len(scalar))), p))
        sections.append(("Chains", body))

    # --- what was learned
    if target is not None and scalar:
        prior = draw_prior(target, prior_draws, key=jax.random.key(seed), names=scalar)
        missing = [n for n in scalar if n not in prior]
        both = [n for n in scalar if n in prior]
        # positive parameters on a log10 axis: their priors span decades, their posteriors a few percent
        shown = {}
        for n in both:
            a, b = np.asarray(post[n]), prior[n][None]
            if (a > 0).all() and (b > 0).all():
                shown[f"log10 {n}"] = (np.log10(a), np.log10(b))
            else:
                shown[n] = (a, b)
        pdt = xr.DataTree.from_dict({
            "posterior": xr.Dataset({k: (("chain", "draw"), v[0]) for k, v in shown.items()}),
            "prior": xr.Dataset({k: (("chain", "draw"), v[1]) for k, v in shown.items()}),
        })
        body = figure("prior_posterior.png", "Prior (from the config's priors) against posterior of each population "
                      "parameter, positive ones as log10: a posterior that repeats its prior was not informed by the data",
                      lambda p: _save_pc(azp.plot_prior_posterior(pdt, var_names=list(shown), backend="matplotlib",
                                                                  **_grid_size(len(shown))), p))
        if missing:
            body += f'<p class="note">No prior draws for {html.escape(", ".join(missing))} (not sampled by the model).</p>'
        sections.append(("Prior and posterior", body))
    if len(scalar) >= 2:
        body = figure("pair.png", "Pair plot of the population parameters: ridges and strong correlations expose "
                      "combinations the data pin down while the single parameters stay loose",
                      lambda p: _pair(tree, scalar, p))
        corr = strongest_correlations(post, scalar)
        body += ("<p>Pairs with posterior rank correlation of size 0.8 or more:</p>" + _table(corr, index=False)
                 if len(corr) else "<p>No pair of population parameters has a rank correlation of size 0.8 or more.</p>")
        sections.append(("Correlations", body))
    per_unit = unit_variables(post)
    if per_unit:
        n_units = max(post[n].size // (post.sizes["chain"] * post.sizes["draw"]) for n in per_unit)
        if n_units <= MAX_FOREST_ROWS:
            body = figure("forest.png", "Per-unit parameters: 94% interval, median",
                          lambda p: _save_pc(azp.plot_forest(tree, var_names=per_unit, combined=True,
                                                             backend="matplotlib"), p))
        else:
            body = figure("forest.png", f"Per-unit parameters of {n_units} units: medians and 90% intervals, sorted",
                          lambda p: plot_caterpillar(post, per_unit, p))
        sections.append(("Per-unit parameters", body))

    # --- how the predictions sit on the data
    body = ""
    panels = predictive_panels(tree)
    if panels:
        panels.sort(key=lambda p: -p.score if np.isfinite(p.score) else -np.inf)
        scores = pd.DataFrame({"panel": [p.title for p in panels], "score": [p.score for p in panels],
                               "coverage_90": [p.coverage for p in panels]})
        atomic_write(out / "fit_scores.csv", lambda tmp: scores.to_csv(tmp, index=False))
        body += ("<p>Score: root mean square of (observed - predictive mean) / predictive sd over the panel's "
                 "observations; about 1 for a good fit, worst first. All scores: <code>fit_scores.csv</code>.</p>")
        if "predictive_cell" in tree["posterior_predictive"].dims:
            body += (f'<p class="note">Panels of the {len(panels)} of {tree["observed_data"].sizes["cell"]} cells whose '
                     "predictive draws the fit kept (<code>[output] predictive_cells</code>).</p>")
        pages = int(np.ceil(len(panels) / PANELS_PER_PAGE))
        shown = min(pages, max_pages)
        for k in range(shown):
            chunk = panels[k * PANELS_PER_PAGE:(k + 1) * PANELS_PER_PAGE]
            body += figure(f"ppc_page{k + 1}.png",
                           f"Posterior predictive overlays, page {k + 1} of {pages} (scores {chunk[0].score:.2f} to "
                           f"{chunk[-1].score:.2f})",
                           lambda p, c=chunk, k=k: plot_panel_page(c, p, title=f"Observed data and 90% posterior "
                                                                    f"predictive bands, worst fits first (page {k + 1})"))
        if shown < pages:
            body += (f'<p class="note">{len(panels) - shown * PANELS_PER_PAGE} better-fitting panels are not drawn; '
                     "raise --pages to draw more.</p>")

            def hist(p):
                fig, ax = plt.subplots(figsize=(5, 3))
                ax.hist(scores["score"], bins=40, color="C0")
                ax.set_xlabel("fit-quality score")
                ax.set_ylabel("panels")
                _save(fig, p)

            body += figure("fit_scores.png", f"Fit-quality scores of all {len(panels)} panels", hist)
    if "fold_change_obs" in tree["observed_data"] or "group" in post.dims:
        livak = pd.read_csv(run_dir / "livak.csv") if (run_dir / "livak.csv").exists() else None
        body += figure("dose_response.png", "Dose response of every gene and tissue: data and posterior",
                       lambda p: plot_dose_response(tree, p, livak=livak))
    if body:
        sections.append(("Predictions against the data", body))

    pw = pointwise(tree, max_draws=LOO_DRAWS, max_obs=LOO_OBS, seed=seed)
    n_all = int(pw.attrs["num_observations"])
    with warnings.catch_warnings(record=True) as caught:  # Pareto k warnings: counted in the table below
        warnings.simplefilter("always")
        loo = azs.loo(pw, var_name="y")
    k = np.asarray(loo.pareto_k)
    loo_table = pd.DataFrame([{"elpd_loo": float(loo.elpd), "se": float(loo.se), "p_loo": float(loo.p),
                               "observations": int(loo.n_data_points), "draws": int(loo.n_samples),
                               f"Pareto k > {float(loo.good_k):.2f}": int((k > loo.good_k).sum())}])
    body = figure("loo_pit.png", "LOO-PIT: the difference between the ECDF of leave-one-out PIT values and the "
                  "uniform, with its simultaneous 95% envelope; a calibrated model stays inside",
                  lambda p: _save_pc(azp.plot_loo_pit(pw, var_names=["y"], backend="matplotlib"), p))
    ll_dims = tree["log_likelihood"].dims
    if "predictive_cell" in ll_dims:
        body += (f"<p>The fit kept per-frame values for {ll_dims['predictive_cell']} of its "
                 f"{tree['observed_data'].sizes['cell']} cells (<code>[output] predictive_cells</code>): PSIS-LOO and "
                 "LOO-PIT are over their observations only.</p>")
    if n_all > int(loo.n_data_points):
        body += (f"<p>PSIS-LOO on a random {int(loo.n_data_points)} of the {n_all} observations (the LOO-PIT plot too); "
                 f"elpd per observation {float(loo.elpd) / int(loo.n_data_points):.4g}. For a comparison over all "
                 "observations use <code>zinckin compare</code>.</p>")
    else:
        body += "<p>PSIS-LOO over all observations:</p>"
    body += _table(loo_table, index=False)
    if (k > loo.good_k).any():
        body += ('<p class="note">Some observations have Pareto k above the threshold: their LOO estimates (and LOO-PIT '
                 "values) are unreliable; such points are influential (look for them among the worst-fitting panels).</p>")
    for w in caught:
        if not issubclass(w.category, UserWarning) or "Pareto" not in str(w.message):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    sections.append(("Calibration", body))

    prof_csv, table_csv = run_dir / "profiles.csv", run_dir / "identifiability.csv"
    if prof_csv.exists() and table_csv.exists():
        curves = pd.read_csv(prof_csv)
        table = pd.read_csv(table_csv, index_col=0)
        body = figure("profiles.png", "Profile likelihoods of the population parameters",
                      lambda p: plot_profiles(curves, table, p))
        flat = [n for n in table.index if table.loc[n, "verdict"] != "identified"]
        body += (f"<p><b>Not identified by the data (profile flat within the 95% threshold on at least one side):</b> "
                 f"{html.escape(', '.join(flat))}</p>" if flat else "<p>Every profiled parameter is identified.</p>")
        body += _table(table)
    else:
        body = ('<p class="note">Not computed. Run <code>zinckin profile RUN_DIR</code> (one optimisation per grid '
                "point) and rebuild the report.</p>")
    sections.append(("Identifiability", body))

    title = f"zinckin run {run_dir.resolve().name}"
    meta = (f"model {html.escape(str(tree.attrs.get('model', '')))}, method {html.escape(method)}, "
            f"{post.sizes['chain']} chain(s) x {post.sizes['draw']} draws; config "
            f"{html.escape(str(record.get('config_file', '')))}; report written {time.strftime('%Y-%m-%d %H:%M')}")
    page = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1><p class='note'>{meta}</p>"]
    for note in notes:
        page.append(f'<p class="verdict warn">{html.escape(note)}</p>')
    page.append("<nav>" + " | ".join(f'<a href="#s{i}">{html.escape(h)}</a>' for i, (h, _) in enumerate(sections))
                + "</nav>")
    for i, (heading, content) in enumerate(sections):
        page.append(f'<h2 id="s{i}">{html.escape(heading)}</h2>{content}')
    page.append(f'<p class="note" id="image-check">images: {len(figures)}</p>{_IMAGE_CHECK}</body></html>')
    text = "\n".join(page)
    atomic_write(out / "report.html", lambda tmp: tmp.write_text(text))
    return Report(html=out / "report.html", figures=figures, seconds=time.perf_counter() - start, notes=notes)


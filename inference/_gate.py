r"""The diagnostics gate: one verdict per MCMC run, printed, stored in ``run.json`` and in the exit status.

Each check compares one number from the run with a threshold from the ``[gate]`` config section:

========================  ==========================================================  =========
check                     value                                                       default
========================  ==========================================================  =========
``r_hat``                 largest rank-normalised split R-hat over the summarised      < 1.01
                          parameters (Vehtari et al. 2021)
``ess_bulk``              smallest bulk effective sample size                          > 400
``ess_tail``              smallest tail effective sample size (5% and 95% quantiles)   > 400
``divergences``           divergent transitions after warmup                           <= 0
``bfmi``                  smallest E-BFMI over chains (Betancourt 2016)                > 0.2,
                                                                                       warn < 0.3
``tree_depth``            fraction of draws that hit ``max_tree_depth``                warn > 0.05
``solver_failures``       fraction of draws whose proposal had a failed ODE solve      <= 0.01,
                                                                                       warn > 0
========================  ==========================================================  =========

A failed check makes the run "not converged" (exit status 3 from ``zinckin fit``); a warning is
printed and stored but leaves the verdict alone. Tree-depth saturation costs efficiency, not
validity, so it only warns. Solver failures during sampling are rejected proposals: a few are
harmless, many mean the sampler spent its time in a region where the model cannot be solved.

E-BFMI of one chain with energies :math:`E_n`:
:math:`\mathrm{E\text{-}BFMI} = \sum_n (E_n - E_{n-1})^2 / \sum_n (E_n - \bar E)^2`.

References
----------
Vehtari, Gelman, Simpson, Carpenter, Buerkner (2021), Rank-normalization, folding, and
localization: an improved R-hat for assessing convergence of MCMC. Bayesian Analysis 16, 667-718.
Betancourt (2016), Diagnosing suboptimal cotangent disintegrations in Hamiltonian Monte Carlo.
arXiv:1604.00695.
"""

import dataclasses

import arviz_stats as azs
import numpy as np
import xarray as xr


EXIT_NOT_CONVERGED = 3


@dataclasses.dataclass(frozen=True)
class GateThresholds:
    """Thresholds of the diagnostics gate (config section ``[gate]``)."""

    max_r_hat: float = 1.01
    min_ess_bulk: float = 400.0
    min_ess_tail: float = 400.0
    max_divergences: int = 0
    min_bfmi: float = 0.2
    warn_bfmi: float = 0.3
    warn_tree_depth_fraction: float = 0.05
    max_solver_failure_fraction: float = 0.01


def _check(name, value, status, rule):
    return {"check": name, "value": value, "rule": rule, "status": status}


def gate(tree: xr.DataTree, var_names, thresholds: GateThresholds = GateThresholds()) -> dict:
    """Run every check of the gate on an MCMC DataTree.

    Parameters
    ----------
    tree : DataTree with ``posterior`` and ``sample_stats`` (``diverging``, ``energy``,
        ``reached_max_tree_depth``, ``solver_failures``), dims ``(chain, draw, ...)``.
    var_names : the posterior variables the R-hat and ESS checks cover.
    thresholds : the gate's thresholds.

    Returns
    -------
    dict with ``verdict`` ("converged" or "not converged"), ``checks`` (one dict per check:
    ``check``, ``value``, ``rule``, ``status`` in pass/warn/fail), ``warnings`` and ``failed``
    (names of the checks concerned).
    """
    g = thresholds
    post = tree["posterior"].to_dataset()[list(var_names)]
    stats = tree["sample_stats"].to_dataset()
    n_chain, n_draw = post.sizes["chain"], post.sizes["draw"]

    def extreme(ds, fn):
        vals = [float(fn(ds[v].values)) for v in ds.data_vars]
        vals = [v for v in vals if np.isfinite(v)]
        return fn(np.asarray(vals)) if vals else float("nan")

    checks = []
    if n_chain < 2:
        checks.append(_check("r_hat", None, "warn", "needs >= 2 chains"))
    else:
        r = extreme(azs.rhat(post), np.max)
        checks.append(_check("r_hat", r, "pass" if r < g.max_r_hat else "fail", f"< {g.max_r_hat}"))
    for method, limit in (("bulk", g.min_ess_bulk), ("tail", g.min_ess_tail)):
        e = extreme(azs.ess(post, method=method), np.min)
        checks.append(_check(f"ess_{method}", e, "pass" if e > limit else "fail", f"> {limit:g}"))
    div = int(stats["diverging"].sum())
    checks.append(_check("divergences", div, "pass" if div <= g.max_divergences else "fail", f"<= {g.max_divergences}"))
    energy = stats["energy"].values.reshape(n_chain, -1)
    bfmi = float(np.min(azs.bfmi(energy))) if energy.shape[1] > 2 else float("nan")
    status = "fail" if not bfmi > g.min_bfmi else ("warn" if bfmi < g.warn_bfmi else "pass")
    checks.append(_check("bfmi", bfmi, status, f"> {g.min_bfmi} (warn < {g.warn_bfmi})"))
    depth = float(stats["reached_max_tree_depth"].mean())
    checks.append(_check("tree_depth", depth, "warn" if depth > g.warn_tree_depth_fraction else "pass",
                         f"fraction at max depth (warn > {g.warn_tree_depth_fraction})"))
    fail_frac = float((stats["solver_failures"] > 0).mean())
    status = "fail" if fail_frac > g.max_solver_failure_fraction else ("warn" if fail_frac > 0 else "pass")
    checks.append(_check("solver_failures", fail_frac, status,
                         f"fraction of draws <= {g.max_solver_failure_fraction} (warn > 0)"))
    failed = [c["check"] for c in checks if c["status"] == "fail"]
    return {"verdict": "not converged" if failed else "converged", "checks": checks, "failed": failed,
            "warnings": [c["check"] for c in checks if c["status"] == "warn"],
            "num_chains": int(n_chain), "num_draws": int(n_draw)}


def format_gate(result: dict) -> str:
    """The gate as a short table for the terminal."""
    lines = []
    for c in result["checks"]:
        v = c["value"]
        shown = "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append(f"  {c['status'].upper():5s} {c['check']:16s} {shown:>10s}   {c['rule']}")
    head = ("converged: every check of the gate passed" if result["verdict"] == "converged" else
            "NOT CONVERGED: " + ", ".join(result["failed"]) + " failed; do not trust this posterior before "
            "running longer or fixing the model (exit status 3)")
    return "diagnostics gate\n" + "\n".join(lines) + "\n" + head

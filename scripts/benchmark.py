"""Benchmark zinckin against Stan on the same hierarchical imaging model and data, in one run.

    python scripts/benchmark.py --out bench/               # zinckin only
    pip install ".[bench]" && python scripts/benchmark.py --stan --out bench/

What it measures (docs/performance.md explains every column):

1. For each number of cells N (``--cells``, default 8 64 512 4096): simulated data from the
   built-in imaging model (the bundled example's protocol and frame grid, known parameters);
   zinckin's potential (numpyro's negative log joint in unconstrained space, the function NUTS
   differentiates): compile time of its value-and-gradient program, median time per call of the
   log density and of its gradient (after a warm-up call), XLA's memory estimate of the gradient
   program, and on a GPU the device's peak memory.
2. With ``--stan``: the same model written in Stan (scripts/zinc_flux_imaging.stan, run through
   pystan), its build time, and a check that both log densities agree (Jacobians included) at
   the true parameters and at perturbed points before anything is timed. Stan's time per
   gradient is measured inside its own sampler: NUTS with adaptation off, a small fixed step and
   a fixed tree depth, so every iteration costs exactly 2**depth - 1 gradients; the difference of
   two run lengths removes the fixed cost of a pystan call. zinckin's gradient is timed the same
   way too (numpyro NUTS, same settings), next to the direct timing.
3. For N in ``--nuts-cells`` (default 8 64): full NUTS fits by both tools, each its own way
   (zinckin: ``zinckin fit``'s path, MAP + Laplace metric; Stan: its default diagonal-metric
   adaptation), the same number of chains, warmup and kept draws. Reports wall time, minimum bulk
   ESS over the population parameters, ESS per second, mean tree depth, step size, gradients per
   draw and ESS per gradient.
4. With ``--levers``: the speed levers of docs/performance.md, each timed against the
   production configuration in the same process (ratios).
5. With ``--output N``: the fit's output pass at N cells (``--output-draws`` draws near the
   true parameters): its wall time, the bytes of the DataTree and of ``posterior.nc`` as
   ``zinckin fit`` keeps them by default (``[output] predictive_cells = "auto"``), against the
   bytes the per-frame groups of every cell would take (computed from their shapes).
6. With ``--example-fit``: the README's example fit (``zinckin fit data/example/fit.toml``) run
   in this process with the persistent compilation cache off; the time spent compiling (tracing,
   lowering and XLA, from jax's monitoring events) and the fit's wall time.

Results go to ``OUT/benchmark.json``, ``OUT/benchmark.csv`` and ``OUT/benchmark.md`` (written to
a temporary name and moved, so a crash never leaves half a file). Nothing here asserts a timing.
"""

import argparse
import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import jax


jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402
from numpyro.infer import NUTS  # noqa: E402
from numpyro.infer.util import constrain_fn, initialize_model, unconstrain_fn  # noqa: E402

from data import read_protocol  # noqa: E402
from inference._fit import SamplerConfig, population_var_names, run_nuts  # noqa: E402
from inference._model import OBS_LOG_SD, ImagingProblem, default_plan, empirical_refs, imaging_model  # noqa: E402
from inference._simulate import SimulationSettings, simulate_imaging  # noqa: E402
from models import SolverConfig, ZincFluxRapidEquilibrium, using_row_devices  # noqa: E402


ROOT = Path(__file__).resolve().parent.parent
PROTOCOL = ROOT / "data" / "example" / "protocol.toml"
STAN_FILE = Path(__file__).resolve().parent / "zinc_flux_imaging.stan"
# Stan's parameter blocks, in declaration order: the unconstrained vector is these, in this order,
# each log-transformed where declared <lower=0> (numpyro's unconstrained value of a positive site
# is its log too, so the two unconstrained spaces coincide)
STAN_SAMPLED = ("zc_rest_nM", "zip_vmax_nM_per_min", "zip_km_uM", "znt_km_nM", "release_stim_per_min",
                "stim_decay_min", "probe_kd_nM", "tpen_rate_per_min")
PER_CELL = ("zc_rest_nM", "zip_vmax_nM_per_min", "release_stim_per_min")
CELL_SITES = ("f_min", "log_dynamic_range", "bleach_rate_per_min", "sigma")
TIGHT = (1e-10, 1e-13)  # rtol, atol of the agreement check


def stan_order():
    order = []
    for name in STAN_SAMPLED:
        order.append(name)
        if name in PER_CELL:
            order += [f"{name}_sd_log", f"{name}_cell"]
    return order + list(CELL_SITES)


# ----------------------------------------------------------------------------------------------
# Data and the zinckin side


@dataclasses.dataclass
class Case:
    """One benchmark size: data, the numpyro model's potential and the true point."""

    num_cells: int
    problem: ImagingProblem
    plan: object
    truth: dict            # numpyro site -> constrained true value
    z_truth: dict          # unconstrained
    potential: object      # potential_fn(z dict)
    unravel: object
    flat_truth: jax.Array
    stan_data: dict


def make_case(num_cells: int, *, rtol: float, atol: float, max_steps: int = 4096, seed: int = 0) -> Case:
    protocol = read_protocol(PROTOCOL)
    end_min = 30.0
    inputs = protocol.to_inputs(end_min)
    sim = simulate_imaging(inputs, SimulationSettings(num_cells=num_cells), key=jax.random.key(seed))
    t, y = sim["time_min"], sim["intensity"]
    mask = np.ones_like(y, dtype=bool)
    segments = {k: protocol.bounds(k, end_min) for k in ("fmin", "fmax")}
    f_min_ref, f_max_ref, sigma_ref = empirical_refs(t, y, mask, segments)
    solver = SolverConfig(rtol=rtol, atol=atol, max_steps=max_steps)
    problem = ImagingProblem(model=ZincFluxRapidEquilibrium(inputs), time_min=jnp.asarray(t), intensity=jnp.asarray(y),
                             mask=jnp.asarray(mask), f_min_ref=jnp.asarray(f_min_ref), f_max_ref=jnp.asarray(f_max_ref),
                             sigma_ref=jnp.asarray(sigma_ref), solver=solver)
    plan = default_plan(probe_kd_nM=protocol.probe_kd_nM)
    cells = sim["cells"]
    truth = {name: jnp.asarray(sim["population"][name]) for name in plan.sampled}
    for name in plan.per_cell:
        truth[f"{name}_sd_log"] = jnp.asarray(SimulationSettings().cell_sd_log)
        truth[f"{name}_cell"] = jnp.asarray(cells[name])
    truth.update(f_min=jnp.asarray(cells["f_min"]), log_dynamic_range=jnp.log(cells["f_max"] / cells["f_min"] - 1.0),
                 bleach_rate_per_min=jnp.asarray(cells["bleach_rate_per_min"]), sigma=jnp.asarray(cells["sigma"]))
    info, potential, _, _ = initialize_model(jax.random.key(0), imaging_model, model_args=(problem, plan))
    z_truth = unconstrain_fn(imaging_model, (problem, plan), {}, truth)
    z_truth = {k: z_truth[k] for k in info.z}
    flat_truth, unravel = ravel_pytree(z_truth)
    return Case(num_cells, problem, plan, truth, z_truth, potential, unravel, flat_truth,
                stan_data(protocol, inputs, t, y, mask, f_min_ref, f_max_ref, sigma_ref, plan, rtol, atol, max_steps))


def timed(fn, *args, repeats: int):
    """Median wall time (s) of ``repeats`` calls, after one warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def memory_of(compiled) -> dict:
    out = {}
    try:
        m = compiled.memory_analysis()
        out["xla_estimate_mb"] = (m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes) / 2**20
    except Exception:  # not every backend reports it
        out["xla_estimate_mb"] = None
    stats = jax.devices()[0].memory_stats() or {}
    out["device_peak_mb"] = stats["peak_bytes_in_use"] / 2**20 if "peak_bytes_in_use" in stats else None
    return out


def zinckin_gradient(case: Case, repeats: int, devices: list | None = None) -> dict:
    """Compile time, time per log density and per gradient, memory, at the true point; the rows
    (cells) split over ``devices`` (default: the first device only)."""
    with using_row_devices(devices or jax.devices()[:1]):
        f = jax.jit(lambda x: -case.potential(case.unravel(x)))
        vg = jax.jit(jax.value_and_grad(lambda x: -case.potential(case.unravel(x))))
        start = time.perf_counter()
        compiled = vg.lower(case.flat_truth).compile()
        compile_s = time.perf_counter() - start
        f = f.lower(case.flat_truth).compile()
    logp, grad = compiled(case.flat_truth)
    if not (np.isfinite(float(logp)) and np.all(np.isfinite(np.asarray(grad)))):
        raise RuntimeError(f"zinckin's log density or gradient is not finite at the true point ({case.num_cells} cells).")
    t_grad = timed(compiled, case.flat_truth, repeats=repeats)
    t_logp = timed(f, case.flat_truth, repeats=repeats)
    return {"cells": case.num_cells, "dim": int(case.flat_truth.size), "compile_s": compile_s, "logp_ms": 1e3 * t_logp,
            "grad_ms": 1e3 * t_grad, "grad_us_per_cell": 1e6 * t_grad / case.num_cells, "logp_at_truth": float(logp),
            "devices": len(devices or [None]), "grad_at_truth": np.asarray(grad),
            **memory_of(compiled)}


def zinckin_fixed_nuts(case: Case, *, depth: int, draws: int, step_size: float) -> float:
    """Seconds per gradient inside numpyro's NUTS with adaptation off (see module docstring).

    The iterations run in one compiled ``lax.scan`` (as inside ``zinckin fit``); timed after a
    warm-up run of the same program.
    """
    kernel = NUTS(potential_fn=lambda z: case.potential(z), step_size=step_size, adapt_step_size=False,
                  adapt_mass_matrix=False, max_tree_depth=depth)
    state = kernel.init(jax.random.key(0), 0, case.z_truth, (), {})

    @jax.jit
    def run(state):
        def step(st, _):
            st = kernel.sample(st, (), {})
            return st, st.num_steps
        return jax.lax.scan(step, state, None, length=draws)

    jax.block_until_ready(run(state))
    start = time.perf_counter()
    _, steps = jax.block_until_ready(run(state))
    return (time.perf_counter() - start) / int(np.sum(steps))


# ----------------------------------------------------------------------------------------------
# The Stan side


def stan_data(protocol, inputs, t, y, mask, f_min_ref, f_max_ref, sigma_ref, plan, rtol, atol, max_steps) -> dict:
    starts = np.asarray(inputs.start_min)
    grid = np.unique(np.concatenate([t, starts]))
    if grid[0] != starts[0] or t[-1] < starts[-1]:
        raise ValueError("The frames must start at the protocol start and reach its last segment.")
    index = {v: i + 1 for i, v in enumerate(grid)}  # 1-based
    seg_first = [int(np.searchsorted(grid, s, side="right")) + 1 for s in starts]
    seg_last = [index[s] for s in starts[1:]] + [len(grid)]
    iono, tpen = inputs._flags("ionophore"), inputs._flags("tpen")
    t_stim = inputs.stimulus_start_min
    stim_on = [0.0 if t_stim is None or s < t_stim else 1.0 for s in starts]
    medians = [float(np.exp(plan.priors[n].loc)) for n in STAN_SAMPLED]
    log_sds = [float(plan.priors[n].scale) for n in STAN_SAMPLED]
    return {
        "N": int(y.shape[0]), "T": int(y.shape[1]), "time_min": t.tolist(), "intensity": np.where(mask, y, 0.0).tolist(),
        "observed": mask.astype(int).tolist(), "f_min_ref": np.asarray(f_min_ref).tolist(),
        "f_max_ref": np.asarray(f_max_ref).tolist(), "sigma_ref": np.asarray(sigma_ref).tolist(),
        "K": len(starts), "seg_start": starts.tolist(),
        "seg_zo_free_uM": (np.asarray(inputs.zn_ext_uM) * (1.0 - tpen)).tolist(),
        "seg_iono": iono.tolist(), "seg_tpen": tpen.tolist(), "seg_stim_on": stim_on,
        "zo_baseline_uM": float(inputs.zn_ext_uM[0]), "t_stim": float(t_stim if t_stim is not None else starts[0]),
        "G": len(grid), "grid": grid.tolist(), "seg_first": seg_first, "seg_last": seg_last,
        "frame_at": [index[v] for v in t],
        **{k: float(plan.fixed[n]) for k, n in (("probe_total", "probe_total_nM"), ("mt_sites", "mt_sites_nM"),
                                                 ("mt_kd", "mt_kd_nM"), ("seq_vmax", "seq_vmax_nM_per_min"),
                                                 ("seq_km", "seq_km_nM"), ("store_rest", "store_rest_nM"),
                                                 ("iono_perm", "iono_perm_per_min"))},
        "prior_median": medians, "prior_log_sd": log_sds, "population_sd_scale": float(plan.population_sd_scale),
        "obs_log_sd": OBS_LOG_SD, "rtol": rtol, "atol": atol, "max_num_steps": max_steps,
    }


def stan_unconstrained(z: dict) -> list[float]:
    """numpyro's unconstrained point as Stan's unconstrained vector (same values, Stan's order)."""
    return np.concatenate([np.atleast_1d(np.asarray(z[n], dtype=float)) for n in stan_order()]).tolist()


def stan_init(z: dict) -> dict:
    """Constrained values of an unconstrained numpyro point, keyed by Stan's parameter names."""
    out = {}
    for n in stan_order():
        v = np.asarray(z[n], dtype=float)
        out[n] = (v if n in ("log_dynamic_range", "bleach_rate_per_min") else np.exp(v)).tolist()
    return out


@contextlib.contextmanager
def quiet():
    """pystan prints build and sampling progress on stderr; keep the benchmark's output readable."""
    err = sys.stderr
    sys.stderr = io.StringIO()
    try:
        yield
    finally:
        sys.stderr = err


def _stan():
    """pystan, imported without the deprecation warnings its dependencies raise on import."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import httpstan
        import stan
    return stan, httpstan


def stan_build(case: Case):
    stan, _ = _stan()
    start = time.perf_counter()
    with quiet():
        posterior = stan.build(STAN_FILE.read_text(), data=case.stan_data, random_seed=1)
    return posterior, time.perf_counter() - start


def agreement(case: Case, posterior, *, points: int = 4, scale: float = 0.2) -> dict:
    """Log densities of both tools (Jacobian included) at the truth and at perturbed points."""
    rng = np.random.default_rng(1)
    rows = []
    for k in range(points):
        # kinetic constants and spreads moved by ``scale`` (log units); observation parameters kept,
        # so that the points stay where the likelihood is not astronomically small
        z = {n: v if n in CELL_SITES or k == 0 else v + scale * rng.standard_normal(np.shape(v))
             for n, v in case.z_truth.items()}
        lp_z = -float(case.potential(z))
        lp_s = float(posterior.log_prob(stan_unconstrained(z), adjust_transform=True))
        rows.append({"point": "truth" if k == 0 else f"perturbed {k}", "zinckin": lp_z, "stan": lp_s,
                     "rel_diff": abs(lp_z - lp_s) / abs(lp_s)})
    return {"points": rows, "max_rel_diff": max(r["rel_diff"] for r in rows)}


def stan_fixed_nuts(case: Case, posterior, *, depth: int, draws: int, step_size: float) -> float:
    """Seconds per gradient inside Stan's NUTS with adaptation off (see module docstring)."""
    init = [stan_init(case.z_truth)]

    def run(n):
        start = time.perf_counter()
        with quiet():
            fit = posterior.sample(num_chains=1, num_warmup=0, num_samples=n, stepsize=step_size,
                                   max_depth=depth, init=init)
        return time.perf_counter() - start, int(np.sum(fit["n_leapfrog__"]))

    t_small, g_small = run(2)
    t_big, g_big = run(draws)
    return (t_big - t_small) / (g_big - g_small)


# ----------------------------------------------------------------------------------------------
# Full NUTS fits


def ess_min(draws: dict) -> tuple[float, str]:
    """Minimum bulk ESS over the given variables (each ``(chain, draw)``), and which one."""
    import arviz_stats as azs
    from arviz_base import from_dict

    tree = from_dict({"posterior": {k: np.asarray(v) for k, v in draws.items()}})
    result = azs.ess(tree, method="bulk")
    result = result["posterior"] if "posterior" in getattr(result, "children", {}) else result
    ess = {k: float(result[k]) for k in draws}
    name = min(ess, key=ess.get)
    return ess[name], name


def nuts_zinckin(case: Case, *, chains: int, warmup: int, samples: int) -> dict:
    config = SamplerConfig(num_warmup=warmup, num_samples=samples, num_chains=chains, max_tree_depth=10)
    start = time.perf_counter()
    result = run_nuts(case.problem, case.plan, config, key=jax.random.key(3),
                      cell_id=[f"cell{i:04d}" for i in range(case.num_cells)], progress_bar=False)
    wall = time.perf_counter() - start
    post, stats = result.tree["posterior"], result.tree["sample_stats"]
    names = population_var_names(case.plan)
    ess, worst = ess_min({n: np.log(post[n].values) for n in names})
    steps = np.asarray(stats["n_steps"].values)
    return {"tool": f"zinckin ({result.tree.attrs['metric']} metric)", "cells": case.num_cells, "wall_s": wall,
            "min_ess_bulk": ess, "worst": worst,
            "ess_per_s": ess / wall, "mean_tree_depth": float(np.mean(stats["tree_depth"].values)),
            "step_size": float(np.mean(stats["step_size"].values)), "grads_per_draw": float(np.mean(steps)),
            "ess_per_grad": ess / float(np.sum(steps)), "divergences": int(np.sum(stats["diverging"].values)),
            "note": "wall includes compile, MAP and Laplace metric; gradients counted over kept draws"}


def output_scaling(case: Case, *, draws: int, chains: int = 2) -> dict:
    """Time and bytes of the fit's output pass (``assemble_tree``, default ``predictive_cells``)
    and of ``posterior.nc``, for ``draws`` draws (over ``chains``) near the true parameters."""
    from inference._fit import assemble_tree
    from inference._output import write_tree

    per_chain = draws // chains
    eps = 0.01 * jax.random.normal(jax.random.key(11), (chains * per_chain, case.flat_truth.size))
    flats = case.flat_truth + eps.astype(case.flat_truth.dtype)
    constrain = jax.jit(jax.vmap(lambda f: constrain_fn(imaging_model, (case.problem, case.plan), {},
                                                        case.unravel(f))))
    samples = {k: np.asarray(v).reshape((chains, per_chain) + v.shape[1:]) for k, v in constrain(flats).items()}
    samples["solver_failures"] = np.zeros((chains, per_chain), dtype=int)
    start = time.perf_counter()
    tree = assemble_tree(case.problem, case.plan, samples, None, key=jax.random.key(12),
                         cell_id=[f"cell{i:05d}" for i in range(case.num_cells)], max_tree_depth=0,
                         predictive_cells="auto")
    wall = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "posterior.nc"
        start = time.perf_counter()
        write_tree(tree, path)
        write_s = time.perf_counter() - start
        file_mb = path.stat().st_size / 2**20
    tree_mb = sum(v.nbytes for node in tree.subtree for v in node.to_dataset().data_vars.values()) / 2**20
    frames = case.problem.time_min.shape[0]
    per_frame_mb = 3 * chains * per_chain * case.num_cells * frames * 8 / 2**20  # ll, predictive, zc_nM
    return {"cells": case.num_cells, "draws": chains * per_chain, "frames": frames,
            "predictive_cells": int(tree.attrs["predictive_cells"]), "pass_s": wall, "write_s": write_s,
            "tree_mb": tree_mb, "file_mb": file_mb, "all_cells_per_frame_mb": per_frame_mb}


def nuts_stan(case: Case, posterior, *, chains: int, warmup: int, samples: int) -> dict:
    start = time.perf_counter()
    # pystan's progress bar stays on stderr: this fit can take an hour
    fit = posterior.sample(num_chains=chains, num_warmup=warmup, num_samples=samples,
                           init=[stan_init(case.z_truth)] * chains, max_depth=10)
    wall = time.perf_counter() - start
    names = [n for n in population_var_names(case.plan)]
    draws = {n: np.log(np.asarray(fit[n]).reshape(samples, chains).T) for n in names}
    ess, worst = ess_min(draws)
    steps = np.asarray(fit["n_leapfrog__"])
    return {"tool": "stan", "cells": case.num_cells, "wall_s": wall, "min_ess_bulk": ess, "worst": worst,
            "ess_per_s": ess / wall, "mean_tree_depth": float(np.mean(fit["treedepth__"])),
            "step_size": float(np.mean(fit["stepsize__"])), "grads_per_draw": float(np.mean(steps)),
            "ess_per_grad": ess / float(np.sum(steps)), "divergences": int(np.sum(fit["divergent__"])),
            "note": "wall of sample() (model already built); chains in parallel processes; gradients counted over kept draws"}


# ----------------------------------------------------------------------------------------------
# Compile time of the README's example fit

EXAMPLE_CONFIG = ROOT / "data" / "example" / "fit.toml"
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


def union_seconds(spans: list[tuple[float, float]]) -> float:
    """Length of the union of time intervals (tracing of a nested jit lies inside its caller's)."""
    total, end = 0.0, -math.inf
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def example_fit(config: Path = EXAMPLE_CONFIG) -> dict:
    """Run ``zinckin fit`` on the bundled example in this process, with jax's persistent
    compilation cache off, and time every compile in it (tracing, lowering, XLA) from jax's own
    monitoring events."""
    from inference._cli import main as cli_main

    spans, backend = [], []

    def listener(event, start, end, **_):
        if event in COMPILE_EVENTS:
            spans.append((start, end))
        if event == COMPILE_EVENTS[-1]:
            backend.append(end - start)

    saved = os.environ.get("ZINCKIN_COMPILATION_CACHE")
    os.environ["ZINCKIN_COMPILATION_CACHE"] = ""  # cold: every program compiled here
    jax.monitoring.register_event_time_span_listener(listener)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            code = cli_main(["fit", str(config), "--out", str(Path(tmp) / "run"), "--no-progress"])
            wall = time.perf_counter() - start
    finally:
        jax.monitoring.unregister_event_time_span_listener(listener)
        if saved is None:
            os.environ.pop("ZINCKIN_COMPILATION_CACHE")
        else:
            os.environ["ZINCKIN_COMPILATION_CACHE"] = saved
    if code != 0:
        raise RuntimeError(f"zinckin fit {config} exited with {code}")
    return {"config": str(config.relative_to(ROOT)), "wall_s": wall, "compile_s": union_seconds(spans),
            "xla_compile_s": sum(backend), "programs": len(backend)}


# ----------------------------------------------------------------------------------------------
# Output


def environment() -> dict:
    import diffrax

    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {"python": platform.python_version(), "jax": jax.__version__, "numpyro": numpyro.__version__,
                "diffrax": diffrax.__version__, "numpy": np.__version__}
    with contextlib.suppress(ImportError):
        stan, httpstan = _stan()
        versions["pystan"] = stan.__version__
        versions["httpstan"] = httpstan.__version__
    return {"machine": platform.machine(), "cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "devices": [str(d) for d in jax.devices()], "backend": jax.default_backend(), "versions": versions,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "xla_flags": os.environ.get("XLA_FLAGS", "")}


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [f"# zinckin benchmark ({env['date']})", "",
             f"{env['cpu']} ({env['cpu_count']} logical CPUs), backend {env['backend']}, devices {', '.join(env['devices'])}; "
             + ", ".join(f"{k} {v}" for k, v in env["versions"].items()), "",
             f"Solver tolerances rtol {results['rtol']:g}, atol {results['atol']:g}; float64."]
    if results["gradient"]:
        lines += ["", "## Log density and gradient", "",
                  "| cells | dim | compile (s) | log density (ms) | gradient (ms) | gradient per cell (us) "
                  "| memory estimate (MB) | Stan gradient (ms, in NUTS) | zinckin gradient (ms, in NUTS) | Stan / zinckin |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["gradient"]:
        stan_ms = r.get("stan_grad_in_nuts_ms")
        z_nuts = r.get("zinckin_grad_in_nuts_ms")
        ratio = f"{stan_ms / z_nuts:.1f}" if stan_ms and z_nuts else "-"
        mem = r["xla_estimate_mb"]
        lines.append(f"| {r['cells']} | {r['dim']} | {r['compile_s']:.1f} | {r['logp_ms']:.2f} | {r['grad_ms']:.2f} | "
                     f"{r['grad_us_per_cell']:.0f} | {'-' if mem is None else f'{mem:.0f}'} | "
                     f"{'-' if stan_ms is None else f'{stan_ms:.1f}'} | {'-' if z_nuts is None else f'{z_nuts:.2f}'} | {ratio} |")
    if results.get("gradient_devices"):
        lines += ["", "## Cells split over several devices (same run; against the one-device rows above)", "",
                  "| cells | devices | compile (s) | gradient (ms) | gradient per cell (us) | speed-up over one device "
                  "| max relative difference of log density and gradient |", "|---|---|---|---|---|---|---|"]
        for r in results["gradient_devices"]:
            lines.append(f"| {r['cells']} | {r['devices']} | {r['compile_s']:.1f} | {r['grad_ms']:.2f} | "
                         f"{r['grad_us_per_cell']:.0f} | {r['speedup']:.2f} | {r['max_rel_diff']:.1e} |")
    if results.get("agreement"):
        lines += ["", f"## Log-density agreement (before timing; both solved at rtol {TIGHT[0]:g}, atol {TIGHT[1]:g})", "",
                  "| cells | point | zinckin | Stan | relative difference | relative difference at the benchmark's tolerance |",
                  "|---|---|---|---|---|---|"]
        for n, a in results["agreement"].items():
            for p, q in zip(a["points"], a["at_benchmark_tolerance"]["points"]):
                lines.append(f"| {n} | {p['point']} | {p['zinckin']:.6f} | {p['stan']:.6f} | {p['rel_diff']:.1e} | {q['rel_diff']:.1e} |")
    if results.get("stan_build_s") is not None:
        lines += ["", f"Stan model build in this run: {results['stan_build_s']:.1f} s (pystan caches compiled models; "
                  "the first build on a machine compiles C++ for minutes)."]
    if results.get("nuts"):
        lines += ["", "## NUTS", "", "| tool | cells | wall (s) | min bulk ESS | ESS/s | mean tree depth | step size | gradients per draw "
                  "| ESS per gradient | divergences |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in results["nuts"]:
            lines.append(f"| {r['tool']} | {r['cells']} | {r['wall_s']:.0f} | {r['min_ess_bulk']:.0f} ({r['worst']}) | "
                         f"{r['ess_per_s']:.3g} | {r['mean_tree_depth']:.1f} | {r['step_size']:.3g} | {r['grads_per_draw']:.0f} | "
                         f"{r['ess_per_grad']:.2e} | {r['divergences']} |")
    if results.get("output"):
        lines += ["", "## Output of a fit (`assemble_tree`, default `[output] predictive_cells`)", "",
                  "| cells | draws | cells with per-frame draws | output pass (s) | write (s) "
                  "| DataTree (MB) | posterior.nc (MB) | per-frame groups of every cell would be (MB) |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in results["output"]:
            lines.append(f"| {r['cells']} | {r['draws']} | {r['predictive_cells']} | "
                         f"{r['pass_s']:.1f} | {r['write_s']:.1f} | {r['tree_mb']:.0f} | {r['file_mb']:.0f} | "
                         f"{r['all_cells_per_frame_mb']:.0f} |")
    for line in results.get("ratios", []):
        lines.append(f"- {line}")
    if results.get("example_fit"):
        e = results["example_fit"]
        lines += ["", f"## Compile time of the example fit (`zinckin fit {e['config']}`, no compilation cache)", "",
                  f"{e['compile_s']:.1f} s compiling (tracing, lowering and XLA; XLA alone {e['xla_compile_s']:.1f} s over "
                  f"{e['programs']} programs) in a fit of {e['wall_s']:.0f} s."]
    if results.get("levers"):
        lines += ["", f"## Levers ({results['levers']['cells']} cells; time relative to the first row, same process)", "",
                  "| lever | log density (ms) | gradient (ms) | gradient ratio | max |change| of the objective |", "|---|---|---|---|---|"]
        for r in results["levers"]["rows"]:
            lines.append(f"| {r['lever']} | {r['f_ms']:.1f} | {r['grad_ms']:.1f} | {r['ratio']:.2f} | {r['delta']:.1e} |")
    return "\n".join(lines) + "\n"


def write_results(out: Path, results: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "benchmark.json", json.dumps(results, indent=2, default=float))
    buf = io.StringIO()
    keys = sorted({k for r in results["gradient"] for k in r})
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(results["gradient"])
    write_atomic(out / "benchmark.csv", buf.getvalue())
    write_atomic(out / "benchmark.md", markdown(results))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", type=int, nargs="*", default=[8, 64, 512, 4096])
    ap.add_argument("--nuts-cells", type=int, nargs="*", default=[8, 64])
    ap.add_argument("--stan", action="store_true", help="also run Stan (pip install '.[bench]')")
    ap.add_argument("--stan-max-cells", type=int, default=512, help="largest N whose Stan gradient is timed")
    ap.add_argument("--stan-nuts-max-cells", type=int, default=64, help="largest N of a Stan NUTS fit")
    ap.add_argument("--levers", type=int, default=0, metavar="N", help="time the speed levers at N cells")
    ap.add_argument("--output", type=int, nargs="*", default=[], metavar="N",
                    help="measure the fit's output pass and posterior.nc at N cells")
    ap.add_argument("--output-draws", type=int, default=2000, help="draws of the --output measurement")
    ap.add_argument("--example-fit", action="store_true",
                    help="run the bundled example fit and time its compiles (about 2 minutes on 2 cores)")
    ap.add_argument("--rtol", type=float, default=1e-6)
    ap.add_argument("--atol", type=float, default=1e-9)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--depth", type=int, default=4, help="tree depth of the fixed-step NUTS gradient timing")
    ap.add_argument("--chains", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--tolerance", type=float, default=1e-6, help="largest relative log-density difference accepted")
    ap.add_argument("--cpu-devices", type=int, default=0, metavar="K",
                    help="make K CPU devices (one per core) and time the gradient with the cells split over all of "
                         "them too, against one device in the same run (K > 1; before anything else uses jax)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)

    results = {"environment": environment(), "rtol": args.rtol, "atol": args.atol, "gradient": [], "agreement": {},
               "nuts": [], "ratios": [], "stan_build_s": None}
    print(json.dumps(results["environment"], indent=1), flush=True)
    if args.example_fit:
        # first, before anything else is compiled in this process
        results["example_fit"] = e = example_fit()
        print(f"example fit: {e['compile_s']:.1f} s compiling ({e['programs']} XLA programs) in {e['wall_s']:.0f} s", flush=True)
        write_results(args.out, results)
    cases = {}
    for n in sorted(set(args.cells) | set(args.nuts_cells)):
        cases[n] = make_case(n, rtol=args.rtol, atol=args.atol)
    for n in args.cells:
        row = zinckin_gradient(cases[n], args.repeats)
        base_grad = row.pop("grad_at_truth")
        results["gradient"].append(row)
        print(f"zinckin N={n}: compile {row['compile_s']:.1f} s, log density {row['logp_ms']:.2f} ms, gradient "
              f"{row['grad_ms']:.2f} ms ({row['grad_us_per_cell']:.0f} us per cell)", flush=True)
        if len(jax.devices()) > 1:
            many = zinckin_gradient(cases[n], args.repeats, devices=jax.devices())
            grad = many.pop("grad_at_truth")
            many["speedup"] = row["grad_ms"] / many["grad_ms"]
            many["max_rel_diff"] = max(abs(many["logp_at_truth"] - row["logp_at_truth"]) / abs(row["logp_at_truth"]),
                                       float(np.max(np.abs(grad - base_grad)) / np.max(np.abs(base_grad))))
            results.setdefault("gradient_devices", []).append(many)
            print(f"zinckin N={n} over {many['devices']} devices: gradient {many['grad_ms']:.2f} ms "
                  f"({many['grad_us_per_cell']:.0f} us per cell), {many['speedup']:.2f}x one device; "
                  f"log density and gradient differ by {many['max_rel_diff']:.1e} relative", flush=True)
        write_results(args.out, results)

    posteriors = {}
    if args.stan:
        for row in results["gradient"]:
            n = row["cells"]
            if n > args.stan_max_cells:
                continue
            # identity of the two models: both solved at tight tolerance, so that what is left is
            # the models' difference, not the two ODE solvers' own errors
            tight = make_case(n, rtol=TIGHT[0], atol=TIGHT[1], max_steps=100_000)
            tight_posterior, build_s = stan_build(tight)
            check = agreement(tight, tight_posterior)
            posterior, _ = stan_build(cases[n])
            posteriors[n] = posterior
            check["at_benchmark_tolerance"] = agreement(cases[n], posterior)
            results["stan_build_s"] = build_s if results["stan_build_s"] is None else results["stan_build_s"]
            results["agreement"][str(n)] = check
            print(f"Stan N={n}: log densities agree to {check['max_rel_diff']:.1e} (relative, solved at rtol {TIGHT[0]:g}); "
                  f"{check['at_benchmark_tolerance']['max_rel_diff']:.1e} at the benchmark's tolerance", flush=True)
            if check["max_rel_diff"] > args.tolerance:
                write_results(args.out, results)
                print(f"Log densities differ by {check['max_rel_diff']:.1e} > {args.tolerance:g}: the two models are not the "
                      "same, no timing is reported. See the agreement table in benchmark.md.", file=sys.stderr)
                return 1
            step = 1e-3 / math.sqrt(max(n, 1))
            draws = max(4, int(60 / max(n, 1) ** 0.5))
            row["stan_grad_in_nuts_ms"] = 1e3 * stan_fixed_nuts(cases[n], posterior, depth=args.depth, draws=draws, step_size=step)
            row["zinckin_grad_in_nuts_ms"] = 1e3 * zinckin_fixed_nuts(cases[n], depth=args.depth, draws=4 * draws, step_size=step)
            ratio = row["stan_grad_in_nuts_ms"] / row["zinckin_grad_in_nuts_ms"]
            results["ratios"].append(f"gradient time Stan / zinckin at {n} cells: {ratio:.1f} "
                                     f"({row['stan_grad_in_nuts_ms']:.1f} ms / {row['zinckin_grad_in_nuts_ms']:.2f} ms, inside NUTS)")
            print(results["ratios"][-1], flush=True)
            write_results(args.out, results)

    for n in args.nuts_cells:
        r = nuts_zinckin(cases[n], chains=args.chains, warmup=args.warmup, samples=args.samples)
        results["nuts"].append(r)
        print(f"NUTS zinckin N={n}: {r}", flush=True)
        write_results(args.out, results)
        if args.stan and n <= args.stan_nuts_max_cells:
            if n not in posteriors:
                posteriors[n] = stan_build(cases[n])[0]
            s = nuts_stan(cases[n], posteriors[n], chains=args.chains, warmup=args.warmup, samples=args.samples)
            results["nuts"].append(s)
            results["ratios"].append(f"NUTS min-ESS/s zinckin / Stan at {n} cells: {r['ess_per_s'] / s['ess_per_s']:.1f} "
                                     f"({r['ess_per_s']:.2f} / {s['ess_per_s']:.3f})")
            print(f"NUTS Stan N={n}: {s}", flush=True)
            print(results["ratios"][-1], flush=True)
            write_results(args.out, results)

    for n in args.output:
        r = output_scaling(cases[n] if n in cases else make_case(n, rtol=args.rtol, atol=args.atol),
                           draws=args.output_draws, chains=args.chains)
        results.setdefault("output", []).append(r)
        print(f"output N={n}: {r}", flush=True)
        write_results(args.out, results)

    if args.levers:
        from levers import measure_levers

        results["levers"] = measure_levers(args.levers, repeats=args.repeats)
        write_results(args.out, results)
    print(f"Written {args.out / 'benchmark.md'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

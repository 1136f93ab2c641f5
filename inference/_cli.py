"""The ``zinckin`` command line: simulate, check, fit. No science here."""

import argparse
import dataclasses
import hashlib
import json
import shlex
import sys
import traceback
from pathlib import Path


EXIT_BAD_INPUT = 2  # bad input or usage; 3 (inference._gate.EXIT_NOT_CONVERGED): ran, did not converge


class UsageError(ValueError):
    """Bad command-line usage or an output folder that would be overwritten."""


def _example_dir() -> Path:
    from data import EXAMPLE_DIR

    return EXAMPLE_DIR


def _enable_x64():
    import jax

    jax.config.update("jax_enable_x64", True)


# float32 resolves relative differences down to 1.2e-7; a tolerance within 10x of that leaves
# the error control working on rounding noise
FLOAT32_MIN_RTOL = 1e-6


#: imaging fits with ``method = "map"`` from this many cells get a warning: the joint MAP's offset
#: from the posterior mean of the shared constants was 0.5 posterior sd at 512 simulated cells
LAPLACE_OFFCENTRE_CELLS = 512


def precision_warnings(precision: str, *, method: str, rtol: float | None, implicit: bool = False,
                       newton_tol: float | None = None) -> list[str]:
    """Why a float32 fit may be unsafe, one sentence each (empty for float64)."""
    if precision == "float64":
        return []
    out = []
    if method == "nuts":
        out.append("float32 with NUTS: the log density carries rounding errors of order 1 (measured on the bundled "
                   "example: 1-3 of 1.5e5, docs/inference.md) that NUTS's accept/reject and divergence checks see; "
                   "confirm the posterior with a float64 run")
    if rtol is not None and rtol < FLOAT32_MIN_RTOL:
        out.append(f"float32 with solver rtol {rtol:g}: within 10x of float32's resolution (1.2e-7) the error control "
                   f"works on rounding noise, so steps multiply and may reach max_steps; set [solver] rtol >= "
                   f"{FLOAT32_MIN_RTOL:g}")
    if implicit:
        out.append("float32 with an implicit solver: its Newton iterations and linear solves lose accuracy in single "
                   "precision; prefer an explicit solver (tsit5) or float64")
    if newton_tol is not None and newton_tol < 1e-6:
        out.append(f"float32 with steady-state tol {newton_tol:g}: Newton cannot reach it in single precision and falls "
                   "back to integrating; set [steady_state] tol >= 1e-6")
    return out


def _set_precision(run) -> None:
    """float64 unless ``[runtime] precision = "float32"``; set before any array is made."""
    import jax

    jax.config.update("jax_enable_x64", run.config.runtime.precision == "float64")


# [runtime.distributed] field -> environment variables read when the field is left out (first set wins)
DISTRIBUTED_ENV = {"coordinator_address": ("ZINCKIN_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS"),
                   "num_processes": ("ZINCKIN_NUM_PROCESSES", "JAX_NUM_PROCESSES"),
                   "process_id": ("ZINCKIN_PROCESS_ID", "JAX_PROCESS_ID")}


def _wants_distributed(runtime) -> bool:
    import os

    return runtime.distributed is not None or any(os.environ.get(v) for v in DISTRIBUTED_ENV["coordinator_address"])


def _cpu_device_per_core(runtime) -> bool:
    """Before jax starts: one CPU device per core (``jax_num_cpu_devices``), so that a fit of
    many cells can solve them on every core (:func:`_cells_over_cores`); returns whether it did.

    Not when the CPU device count is already set (``--xla_force_host_platform_device_count`` in
    ``$XLA_FLAGS``: the user's choice), in a multi-process job, on one core, or when jax has
    already started in this process (zinckin called from Python). Until
    :func:`_cells_over_cores` widens it, batched solves stay on the first device.
    """
    import os

    import jax

    from models import set_row_devices

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cores < 2 or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "") \
            or _wants_distributed(runtime):
        return False
    try:
        jax.config.update("jax_num_cpu_devices", cores)
    except RuntimeError:  # jax has started in this process: its devices stay as they are
        return False
    if jax.default_backend() != "cpu":
        return False
    set_row_devices(jax.devices()[:1])
    return True


def _cells_over_cores(num_cells: int) -> None:
    """After :func:`_cpu_device_per_core`: split the cells over every CPU device when each gets
    at least :data:`models.CPU_MIN_ROWS_PER_DEVICE` (below that the split is slower).
    """
    import jax

    from models import CPU_MIN_ROWS_PER_DEVICE, set_row_devices

    devices = jax.devices()
    if num_cells >= CPU_MIN_ROWS_PER_DEVICE * len(devices):
        set_row_devices(devices)
        print(f"cells over {len(devices)} CPU devices (one per core)", flush=True)


def _distributed(runtime) -> bool:
    """Join a multi-process job (``jax.distributed.initialize``) when ``[runtime.distributed]`` or
    ``$ZINCKIN_COORDINATOR_ADDRESS`` (or ``$JAX_COORDINATOR_ADDRESS``) asks for one; returns
    whether this is such a job.

    Must run before any computation. Then every process runs the same fit: with
    ``chain_method = "sharded"`` the chains are spread over all processes' devices; process 0
    alone writes the run directory.
    """
    import os

    import jax

    from ._config import DistributedSection

    if not _wants_distributed(runtime):
        return False
    section = runtime.distributed or DistributedSection()
    kwargs = {}
    for field, names in DISTRIBUTED_ENV.items():
        value = getattr(section, field)
        var = next((v for v in names if os.environ.get(v)), None)
        if value is None and var is not None:
            try:
                value = os.environ[var] if field == "coordinator_address" else int(os.environ[var])
            except ValueError:
                raise UsageError(f"${var} = {os.environ[var]!r} is not a whole number.") from None
        kwargs[field] = value
    kwargs["local_device_ids"] = section.local_device_ids
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"could not join the multi-process job ({', '.join(f'{k}={v}' for k, v in kwargs.items())}): "
                         f"{e}. Fix: check [runtime.distributed] or $ZINCKIN_COORDINATOR_ADDRESS, "
                         "$ZINCKIN_NUM_PROCESSES and $ZINCKIN_PROCESS_ID.") from None
    print(f"process {jax.process_index()} of {jax.process_count()}: {len(jax.local_devices())} local device(s), "
          f"{jax.device_count()} in all", flush=True)
    return True


def _warn(warnings: list[str]) -> None:
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr, flush=True)


def cmd_simulate(args) -> int:
    _enable_x64()
    if args.config:
        return _simulate_custom(args)
    import jax
    import numpy as np

    from data import read_protocol, write_long_csv
    from data._protocol import TIME_UNITS_TO_MIN

    from ._output import atomic_write, write_json
    from ._simulate import SimulationSettings, simulate_imaging

    protocol_path = Path(args.protocol) if args.protocol else _example_dir() / "protocol.toml"
    protocol = read_protocol(protocol_path)
    to_min = TIME_UNITS_TO_MIN[protocol.time_unit]
    starts = [s.start_min for s in protocol.segments]
    if args.duration is not None:
        end_min = args.duration * to_min
    else:
        end_min = starts[-1] + (starts[-1] - starts[-2] if len(starts) > 1 else 5.0)
    if end_min <= starts[-1]:
        raise UsageError(f"--duration must reach past the last segment start ({starts[-1] / to_min:g} {protocol.time_unit}).")
    if args.frame_interval is not None:
        interval_min = args.frame_interval * to_min
    elif protocol.frame_interval_min is not None:
        interval_min = protocol.frame_interval_min
    else:
        interval_min = (end_min - starts[0]) / 120
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UsageError(f"output folder {out} exists and is not empty; pass --overwrite or choose another --out.")
    settings = SimulationSettings(num_cells=args.num_cells, frame_interval_min=interval_min,
                                  noise_fraction=args.noise_fraction)
    sim = simulate_imaging(protocol.to_inputs(end_min), settings, key=jax.random.key(args.seed))
    cell_id = [f"cell{i + 1:03d}" for i in range(args.num_cells)]
    out.mkdir(parents=True, exist_ok=True)
    time_in_unit = np.round(sim["time_min"] / to_min, 9)
    write_long_csv(out / "traces.csv", time_in_unit, sim["intensity"], cell_id)
    text = protocol_path.read_text()
    if protocol.frame_interval_min is None:
        # top-level keys must precede the [[segment]] tables
        text = f"frame_interval = {interval_min / to_min:g}  # added by zinckin simulate\n" + text
    atomic_write(out / "protocol.toml", lambda tmp: tmp.write_text(text))
    truth = {
        "population_median": sim["population"],
        "per_cell_sd_log": {n: settings.cell_sd_log for n in settings.per_cell},
        "cells": {k: dict(zip(cell_id, map(float, v))) for k, v in sim["cells"].items()},
        "seed": args.seed,
        "units": {"time": "min in the model, protocol time_unit in traces.csv"},
    }
    write_json(truth, out / "truth.json")
    command = "zinckin " + shlex.join(args.argv) if args.record_command is None else args.record_command
    atomic_write(out / "COMMAND.txt", lambda tmp: tmp.write_text(command + "\n"))
    print(f"wrote {args.num_cells} cells x {len(time_in_unit)} frames to {out}/traces.csv "
          f"(+ protocol.toml, truth.json, COMMAND.txt)")
    return 0


def _load_transcripts(config, base):
    from data import canonical_gene, read_ct, read_fold_change

    from ._config import ConfigError
    from ._transcripts import build_transcript_problem

    t = config.transcripts
    if t.fold_change is not None:
        table = read_fold_change(base / t.fold_change, dose_unit=t.dose_unit)
    else:
        table = read_ct(base / t.ct, reference_genes=t.reference_genes, ct_cutoff=t.ct_cutoff, dose_unit=t.dose_unit)
    plan = config.transcript_plan()
    efficiency = {}
    for name, value in t.efficiency.items():
        gene = canonical_gene(name, extra_reference=t.reference_genes)
        if gene is None or (hasattr(table, "reference_genes") and gene not in table.frame["gene"].values):
            raise ConfigError(f"[transcripts] efficiency: gene {name!r} is not in {table.path}. "
                              "Fix: use a gene name of the table (aliases such as SLC30A1 are accepted).")
        efficiency[gene] = value
    problem = build_transcript_problem(table, plan, efficiency=efficiency, steady=config.steady_config())
    return table, plan, problem


def _load(config_path):
    from ._config import load_config

    return _load_config(*load_config(config_path))


def _load_config(config, base):
    from data import load_imaging

    from ._config import CustomFitConfig, TranscriptFitConfig

    if isinstance(config, TranscriptFitConfig):
        return (config, *_load_transcripts(config, base))
    if isinstance(config, CustomFitConfig):
        from ._custom import load_custom

        return config, load_custom(config, base)
    d = config.data
    dataset = load_imaging(
        base / d.traces, base / d.protocol, format=d.format, mask_missing=d.mask_missing,
        exclude_cells=d.exclude_cells, cell_column=d.cell_column, time_column=d.time_column,
        intensity_column=d.intensity_column, min_calibration_frames=d.min_calibration_frames,
    )
    plan = config.parameter_plan(dataset.protocol.probe_kd_nM)
    return config, dataset, plan


def _describe_transcripts(table, plan, problem) -> None:
    from ._transcripts import sampled_names

    kind = "fold-change table" if problem.kind == "fold_change" else "raw Ct table"
    n_rows = len(table.frame)
    print(f"{kind} {table.path}: {n_rows} rows; genes {', '.join(problem.genes)}; tissues "
          + ", ".join(f"{t} [{s}]" for t, s in zip(problem.tissues, problem.species))
          + f"; forms {', '.join(problem.forms)} (reference {problem.reference_form}); doses "
          + ", ".join(f"{d:g}" for d in problem.doses) + f" {problem.dose_unit}")
    if problem.kind == "ct":
        n_cens = int(table.frame["censored"].sum())
        print(f"  {len(table.samples)} samples, reference genes {', '.join(table.reference_genes)}, "
              f"{n_cens} censored wells (cutoff {table.ct_cutoff:g})")
    model = "groupwise fold changes" if plan.model == "groupwise" else (
        "MTF-1 model B (" + ", ".join(f"{g}: {r}" for g, r in zip(problem.model.genes, problem.model.regulation))
        + f"; feedback {'on' if plan.feedback else 'off'})")
    print(f"model: {model}")
    line = f"sampled: {', '.join(sampled_names(problem, plan))}"
    if plan.model == "mtf1":
        line += (f"; per tissue: {', '.join(plan.per_tissue) or '-'}; "
                 f"fixed: {', '.join(f'{k}={v:g}' for k, v in plan.fixed.items()) or '-'}")
    print(line)


def _describe_custom(problem) -> None:
    from models._custom import describe_prior

    m = problem.model
    print(f"model {m.name!r} (time in {m.time_unit or 'model units'}): states {', '.join(f'{s.name} [{s.unit}]' for s in m.states)}")
    for prm in m.parameters:
        if prm.is_fixed:
            level = "data-set constant"
        else:
            level = "per data set" if prm.name in problem.per_dataset else "shared"
            if prm.name in problem.per_unit:
                level += f", per unit (sd ~ HalfNormal({problem.unit_sd_scale:g}))"
        print(f"  {prm.name} [{prm.unit}]: {describe_prior(prm.prior)} ({level})")
    for d in problem.datasets:
        counts = ", ".join(f"{k} {len(v[0])}" for k, v in d.observed.items())
        consts = ", ".join(f"{k}={v:g}" for k, v in d.constants.items())
        units = "" if d.units is None else f"{len(d.units)} units, "
        print(f"data set {d.name!r} ({d.path}): {units}t0 = {d.t0:g}, {len(d.times)} times up to {d.times[-1]:g}; "
              f"observed: {counts}" + (f"; constants {consts}" if consts else ""))


def cmd_check(args) -> int:
    _enable_x64()
    from ._config import CustomFitConfig, TranscriptFitConfig

    loaded = _load(args.config)
    if isinstance(loaded[0], CustomFitConfig):
        from ._custom import check_problem

        _describe_custom(loaded[1])
        check_problem(loaded[1])
        print(f"config {args.config}: OK (every model function ran at the prior medians on every data set's times)")
        return 0
    if isinstance(loaded[0], TranscriptFitConfig):
        print(f"config {args.config}: OK")
        _describe_transcripts(*loaded[1:])
        if loaded[3].kind == "ct":
            from data import livak_fold_change

            print("classic 2^-ddCt fold changes (Livak & Schmittgen 2001; censored wells left out):")
            print(livak_fold_change(loaded[1]).to_string(index=False, float_format="{:.3g}".format))
        return 0
    config, dataset, plan = loaded
    tr = dataset.traces
    print(f"config {args.config}: OK")
    print(f"traces {tr.path}: {len(tr.cell_id)} cells x {tr.time_min.size} frames, "
          f"{int((~tr.mask).sum())} masked values")
    print(f"protocol {dataset.protocol.path}: probe {dataset.protocol.probe} (Kd {dataset.protocol.probe_kd_nM:g} nM); "
          + ", ".join(f"{s.kind}@{s.start_min:g} min ({s.zn_ext_uM:g} uM Zn)" for s in dataset.protocol.segments))
    print(f"sampled: {', '.join(plan.sampled)}; per cell: {', '.join(plan.per_cell)}; "
          f"fixed: {', '.join(f'{k}={v:g}' for k, v in plan.fixed.items())}")
    return 0


@dataclasses.dataclass
class _Run:
    """One ``zinckin fit``: its config, where its paths resolve, its run directory and its clock."""

    config: object
    base: Path
    config_text: str
    config_file: str
    out: Path
    resume: bool
    argv: list
    timer: object
    # a process other than 0 of a multi-process job: writes into a private folder, removed at the end
    secondary: bool = False

    def inputs(self) -> dict:
        from ._provenance import input_files, sha256

        return {k: {"path": str(p.resolve()), "sha256": sha256(p)} for k, p in input_files(self.config, self.base).items()}

    def checkpointing(self):
        """How the NUTS run saves its progress (None when ``[output] checkpoint_every = 0``)."""
        from ._sampling import CHECKPOINT_NAME, Checkpointing

        if self.config.output.checkpoint_every == 0:
            return None
        inputs = self.inputs()
        ident = {"config": self.config.model_dump(mode="json"), "inputs": {k: v["sha256"] for k, v in inputs.items()}}
        fingerprint = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
        meta = {"config_text": self.config_text, "config_file": self.config_file, "base_dir": str(self.base),
                "inputs": inputs}
        return Checkpointing(path=self.out / CHECKPOINT_NAME, fingerprint=fingerprint, resume=self.resume,
                             chunk_size=self.config.output.checkpoint_every, meta=meta)

    def finish(self, record: dict, tree=None, gate_names=None) -> int:
        """Gate the run (NUTS), write ``config.toml`` and ``run.json`` (last), drop the checkpoint.

        Returns the exit status: 0, or 3 when the gate says the run did not converge.
        """
        from ._gate import EXIT_NOT_CONVERGED, format_gate, gate
        from ._output import atomic_write, write_json
        from ._provenance import provenance
        from ._sampling import CHECKPOINT_NAME

        status = 0
        if gate_names is not None:
            verdict = gate(tree, gate_names, self.config.gate.thresholds())
            record["gate"] = verdict
            print(format_gate(verdict))
            status = 0 if verdict["verdict"] == "converged" else EXIT_NOT_CONVERGED
        atomic_write(self.out / "config.toml", lambda tmp: tmp.write_text(self.config_text))
        record["provenance"] = provenance(self.out / "config.toml", self.config, self.base, self.timer, self.argv)
        record["provenance"]["config_file"] = self.config_file
        record["provenance"]["resumed"] = self.resume
        write_json(record, self.out / "run.json")
        (self.out / CHECKPOINT_NAME).unlink(missing_ok=True)
        _leave_job()
        if self.secondary:
            import shutil

            import jax

            shutil.rmtree(self.out, ignore_errors=True)
            print(f"process {jax.process_index()}: done (process 0 writes the run directory)")
            return status
        print(f"results in {self.out}/ (a report page: zinckin report {self.out})")
        return status


def _map_table(record: dict, table) -> None:
    """Print the MAP against the posterior and store it in the run record."""
    if len(table):
        print("MAP (the start point) against the posterior; z = (MAP - mean) / sd:")
        print(table.to_string(float_format="{:.4g}".format))
    record["map_vs_posterior"] = table.reset_index().to_dict(orient="records")


def _leave_job() -> None:
    """In a multi-process job: wait until every process has finished its fit (process 0 has
    written the run directory), then leave the job together.

    Once, in the 2-process test on a heavily loaded machine, jax.distributed's shutdown barrier
    (run at exit) failed and took process 0 down after the fit; the cause was not found. The
    processes now meet here first and shut down explicitly.
    """
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("zinckin fit finished")
        jax.distributed.shutdown()


def _secondary_process(config) -> bool:
    """Join a multi-process job if the config or environment asks (:func:`_distributed`); True on
    every process but process 0.
    """
    import jax

    return _distributed(config.runtime) and jax.process_index() != 0


def _private_out(out: Path, *, resume: bool) -> Path:
    """The folder a secondary process writes into (its copy of the checkpoint when resuming)."""
    import shutil
    import tempfile

    import jax

    from ._sampling import CHECKPOINT_NAME

    private = Path(tempfile.mkdtemp(prefix=f"zinckin-process{jax.process_index()}-"))
    if resume:
        shutil.copy2(out / CHECKPOINT_NAME, private / CHECKPOINT_NAME)
    return private


def _start_run(args) -> _Run:
    """Config, base folder and run directory of a fit, a ``--resume`` or a ``--from-run``.

    Refuses to start over an existing fit or an unfinished one unless ``--overwrite`` is given.
    """
    from ._config import ConfigError, load_config, parse_config
    from ._provenance import PhaseTimer, rerun_inputs, sha256
    from ._sampling import CHECKPOINT_NAME, read_checkpoint

    given = [name for name, v in (("CONFIG", args.config), ("--resume", args.resume), ("--from-run", args.from_run)) if v]
    if len(given) != 1:
        raise UsageError("zinckin fit takes exactly one of CONFIG, --resume RUN_DIR or --from-run RUN_DIR"
                         + (f" (got {', '.join(given)})" if given else "") + ".")
    timer = PhaseTimer()
    if args.resume:
        out = Path(args.resume)
        if args.out and Path(args.out).resolve() != out.resolve():
            raise UsageError("--resume continues in its own run directory; leave out --out.")
        if not (out / CHECKPOINT_NAME).exists():
            if (out / "posterior.nc").exists():
                raise UsageError(f"{out}: the fit there has finished; there is nothing to resume.")
            raise UsageError(f"{out}: no {CHECKPOINT_NAME} there, so nothing to resume. "
                             "Fix: check the path, or start the fit from its config.")
        meta = read_checkpoint(out / CHECKPOINT_NAME)["meta"]
        for key, entry in meta["inputs"].items():
            path = Path(entry["path"])
            if not path.exists() or sha256(path) != entry["sha256"]:
                raise ConfigError(f"{path} ({key}) {'is gone' if not path.exists() else 'changed'} since the fit in "
                                  f"{out} started. Fix: restore it to resume, or refit with --overwrite.")
        config = parse_config(meta["config_text"], meta["config_file"])
        if _secondary_process(config):
            return _Run(config, Path(meta["base_dir"]), meta["config_text"], meta["config_file"],
                        _private_out(out, resume=True), True, list(args.argv), timer, secondary=True)
        return _Run(config, Path(meta["base_dir"]), meta["config_text"], meta["config_file"], out, True,
                    list(args.argv), timer)
    if args.from_run:
        config_path, base = rerun_inputs(Path(args.from_run))
        if not args.out:
            raise UsageError("--from-run needs --out NEW_RUN_DIR (the stored run is left as it is).")
        text = config_path.read_text()
        config = parse_config(text, config_path)
        config_file = json.loads((Path(args.from_run) / "run.json").read_text())["provenance"]["config_file"]
    else:
        config, base = load_config(args.config)
        text = Path(args.config).read_text()
        config_file = str(Path(args.config).resolve())
    out = Path(args.out) if args.out else Path(config.output.dir)
    joined = _distributed(config.runtime)
    # every process of a multi-process job checks the run directory (one view of a shared file
    # system: all refuse or none), and none goes on before all have checked
    if (out / "posterior.nc").exists() and not args.overwrite:
        raise UsageError(f"{out} already holds a fit (posterior.nc); pass --overwrite or choose another --out.")
    if (out / CHECKPOINT_NAME).exists() and not args.overwrite:
        raise UsageError(f"{out} holds an unfinished fit ({CHECKPOINT_NAME}); continue it with "
                         f"`zinckin fit --resume {out}`, or pass --overwrite to start over.")
    if joined:
        import jax
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("zinckin fit checked its run directory")
        if jax.process_index() != 0:
            return _Run(config, base, text, config_file, _private_out(out, resume=False), False, list(args.argv),
                        timer, secondary=True)
    (out / CHECKPOINT_NAME).unlink(missing_ok=True)
    return _Run(config, base, text, config_file, out, False, list(args.argv), timer)


def _compilation_cache(runtime) -> str | None:
    """Turn on jax's persistent compilation cache for this process; returns its folder (or None).

    A resumed fit, a ``--from-run`` and every repeated job then load their compiled programs
    instead of compiling them again (programs that took under a second to compile are not kept).
    """
    import os

    import jax

    path = runtime.compilation_cache_dir
    if path is None:
        if jax.config.jax_compilation_cache_dir:
            return jax.config.jax_compilation_cache_dir
        path = os.environ.get("ZINCKIN_COMPILATION_CACHE")  # set but empty: no persistent cache, as in the config
        if path is None:
            path = str(Path.home() / ".cache" / "zinckin" / "jax")
    if path == "":
        return None
    path = str(Path(path).expanduser())
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return path


def cmd_fit(args) -> int:
    _enable_x64()
    import jax

    from ._config import CustomFitConfig, TranscriptFitConfig
    from ._fit import build_problem, population_var_names, run_nuts
    from ._output import (
        atomic_write,
        plot_ppc_traces,
        plot_rank,
        plot_trace,
        population_summary,
        write_tree,
    )

    run = _start_run(args)
    per_core = _cpu_device_per_core(run.config.runtime)
    _set_precision(run)
    _compilation_cache(run.config.runtime)
    with run.timer.phase("load"):
        loaded = _load_config(run.config, run.base)
    out = run.out
    if run.resume:
        print(f"resuming the fit in {out} from its checkpoint", flush=True)
    if isinstance(run.config, TranscriptFitConfig):
        return _fit_transcripts(args, run, *loaded[1:])
    if isinstance(run.config, CustomFitConfig):
        return _fit_custom(args, run, loaded[1])
    config, dataset, plan = loaded
    problem = build_problem(dataset, config.solver_config())
    if per_core and config.sampler.chain_method != "sharded":
        _cells_over_cores(problem.num_cells)
    sampler = config.sampler_config()
    method = config.sampler.method
    warnings = precision_warnings(config.runtime.precision, method=method, rtol=config.solver.rtol)
    if method == "map" and problem.num_cells >= LAPLACE_OFFCENTRE_CELLS:
        warnings.append(f"method = \"map\" with {problem.num_cells} cells: the Laplace approximation is centred on the "
                        "joint MAP, which moves away from the posterior mean of the constants shared by all cells as "
                        "about sqrt(cells) posterior sds (0.5 sd at 512 simulated cells, 1.3-1.8 at 4,096; "
                        "docs/performance.md); use method = \"nuts\" for those constants' intervals")
    _warn(warnings)
    tr = dataset.traces
    print(f"fitting {len(tr.cell_id)} cells x {tr.time_min.size} frames: {_what(config.sampler)}, seed {config.seed}",
          flush=True)
    with run.timer.phase("fit"):
        result = run_nuts(problem, plan, sampler, key=jax.random.key(config.seed), cell_id=tr.cell_id,
                          progress_bar=not args.no_progress, checkpoint=run.checkpointing() if method == "nuts" else None,
                          predictive_cells=config.output.predictive_cells, **_method_kwargs(config.sampler))
    with run.timer.phase("write"):
        names = population_var_names(plan)
        summary = population_summary(result.tree, names)
        diag = _diagnostics(result, names)
        diag["sampling_seconds"] = run.timer.seconds["fit"]
        write_tree(result.tree, out / "posterior.nc")
        atomic_write(out / "summary.csv", lambda tmp: summary.to_csv(tmp))
        if method == "nuts":
            plot_rank(result.tree, names, out / "rank.png")
            plot_trace(result.tree, names, out / "trace.png")
        plot_ppc_traces(result.tree, out / "ppc_traces.png", num_cells=config.output.num_ppc_cells)
    _print_summary(summary, method)
    print(json.dumps(diag))
    record = {"method": result.tree.attrs["method"], "diagnostics": diag, "config": config.model_dump(mode="json"),
              "config_file": run.config_file, "fixed": plan.fixed, "per_cell": list(plan.per_cell),
              "warnings": warnings,
              "map": {"potential": float(result.laplace.potential), "grad_norm": float(result.laplace.grad_norm),
                      "iterations": int(result.laplace.num_iter), "metric": result.laplace.metric}}
    from ._model import imaging_model

    return _finish(run, record, result, names, (imaging_model, (problem, plan)))


def _what(sampler) -> str:
    """What a fit will do, for its first line."""
    if sampler.method == "map":
        return f"MAP ({sampler.map_starts} start(s)) + Laplace approximation, {sampler.approx_draws} draws"
    if sampler.method == "svi":
        return (f"SVI (full-rank Gaussian, {sampler.svi_steps} steps from the MAP of {sampler.map_starts} start(s)), "
                f"{sampler.approx_draws} draws")
    return (f"{sampler.num_chains} chain(s) x ({sampler.num_warmup} warmup + {sampler.num_samples} draws), "
            f"MAP start from {sampler.map_starts} start(s)")


def _method_kwargs(sampler) -> dict:
    return {"method": sampler.method, "map_starts": sampler.map_starts, "approx_draws": sampler.approx_draws,
            "svi": sampler.svi()}


def _diagnostics(fit, names) -> dict:
    """Sampler diagnostics of a NUTS fit; the approximation's figures for ``map`` / ``svi``."""
    from ._output import diagnostics

    if fit.approximation is None:
        return diagnostics(fit.tree, names)
    failures = fit.tree["sample_stats"]["solver_failures"]
    return {**fit.approximation.info, "draws_with_solver_failures": int((failures > 0).sum())}


def _print_summary(summary, method: str) -> None:
    cols = ["mean", "sd", "hdi90_lb", "hdi90_ub"] + (["ess_bulk", "ess_tail", "r_hat"] if method == "nuts" else [])
    print(summary[[c for c in cols if c in summary.columns]].to_string(float_format="{:.4g}".format))


def _finish(run: _Run, record: dict, fit, names, model_and_args) -> int:
    """MAP-vs-posterior table (NUTS, SVI), then the gate (NUTS only) and the run record."""
    from ._output import map_vs_posterior

    method = fit.tree.attrs["method"]
    if method != "laplace":
        _map_table(record, map_vs_posterior(*model_and_args, fit.laplace, fit.tree, names))
    if method != "nuts":
        print(f"{method} approximation: no MCMC diagnostics apply, no gate verdict; check it against a NUTS run "
              "before trusting its intervals", flush=True)
        return run.finish(record)
    return run.finish(record, fit.tree, names)


def _fit_transcripts(args, run: _Run, table, plan, problem) -> int:
    import jax

    from data import CtTable, livak_fold_change

    from ._output import atomic_write, plot_dose_response, plot_rank, plot_trace, population_summary, write_tree
    from ._transcripts import bioavailability_summary, ppc_coverage, run_transcript_nuts, sampled_names

    config, out = run.config, run.out
    _describe_transcripts(table, plan, problem)
    sampler = config.sampler_config()
    method = config.sampler.method
    warnings = precision_warnings(config.runtime.precision, method=method, rtol=None, newton_tol=config.steady_state.tol)
    _warn(warnings)
    print(f"fitting: {_what(config.sampler)}, seed {config.seed}", flush=True)
    with run.timer.phase("fit"):
        fit = run_transcript_nuts(problem, plan, sampler, key=jax.random.key(config.seed),
                                  progress_bar=not args.no_progress, table=table,
                                  checkpoint=run.checkpointing() if method == "nuts" else None,
                                  **_method_kwargs(config.sampler))
    with run.timer.phase("write"):
        names = sampled_names(problem, plan)
        summary = population_summary(fit.tree, names)
        diag = _diagnostics(fit, names)
        diag["sampling_seconds"] = run.timer.seconds["fit"]
        bio = bioavailability_summary(fit.tree)
        record = {"method": fit.tree.attrs["method"], "warnings": warnings, "diagnostics": diag, "bioavailability": bio,
                  "config": config.model_dump(mode="json"),
                  "config_file": run.config_file, "fixed": plan.fixed}
        livak = livak_fold_change(table) if isinstance(table, CtTable) else None
        coverage = None
        if problem.kind == "fold_change":
            coverage = ppc_coverage(fit.tree)
            record["ppc_90_coverage"] = {"covered": int(coverage["covered"].sum()), "observations": len(coverage)}
        write_tree(fit.tree, out / "posterior.nc")
        atomic_write(out / "summary.csv", lambda tmp: summary.to_csv(tmp))
        if coverage is not None:
            atomic_write(out / "ppc_coverage.csv", lambda tmp: coverage.to_csv(tmp, index=False))
        if livak is not None:
            atomic_write(out / "livak.csv", lambda tmp: livak.to_csv(tmp, index=False))
        scalar_names = [n for n in names if n not in ("log_fc",)]
        if method == "nuts":
            plot_rank(fit.tree, scalar_names, out / "rank.png")
            plot_trace(fit.tree, scalar_names, out / "trace.png")
        plot_dose_response(fit.tree, out / "dose_response.png", livak=livak)
    _print_summary(summary, method)
    for b in bio:
        print(f"bioavailability of {b['form']} relative to {b['reference']}: median {b['median']:.3g}, "
              f"90% interval [{b['q0.05']:.3g}, {b['q0.95']:.3g}], P(> 1) = {b['p_greater_than_1']:.2f}")
    if coverage is not None:
        print("posterior predictive check (90% intervals):")
        print(coverage.to_string(index=False, float_format="{:.3g}".format))
    print(json.dumps(diag))
    from ._transcripts import transcript_model

    return _finish(run, record, fit, names, (transcript_model, (problem, plan)))


def _fit_custom(args, run: _Run, problem) -> int:
    import jax

    from ._custom import check_problem, run_custom, trajectory_bands
    from ._output import atomic_write, plot_rank, plot_timeseries_fit, plot_trace, population_summary, write_tree

    config, out = run.config, run.out
    _describe_custom(problem)
    check_problem(problem)
    sampler = config.sampler_config()
    method = config.sampler.method
    solver = problem.solver or problem.model.solver
    warnings = precision_warnings(config.runtime.precision, method=method, rtol=solver.rtol,
                                  implicit=solver.method == "kvaerno5")
    _warn(warnings)
    print(f"fitting: {_what(config.sampler)}, seed {config.seed}", flush=True)
    with run.timer.phase("fit"):
        fit = run_custom(problem, sampler, key=jax.random.key(config.seed), method=method,
                         progress_bar=not args.no_progress, checkpoint=run.checkpointing() if method == "nuts" else None,
                         num_starts=config.sampler.map_starts, num_laplace_draws=config.sampler.approx_draws,
                         svi=config.sampler.svi())
    with run.timer.phase("write"):
        names = problem.summary_names()
        summary = population_summary(fit.tree, names)
        record = {"method": fit.tree.attrs["method"], "warnings": warnings, "config": config.model_dump(mode="json"),
                  "config_file": run.config_file, "model": problem.model.name, "fixed": problem.model.fixed,
                  "per_dataset": list(problem.per_dataset), "per_unit": list(problem.per_unit)}
        diag = _diagnostics(fit, names)
        diag["sampling_seconds"] = run.timer.seconds["fit"]
        record["diagnostics"] = diag
        write_tree(fit.tree, out / "posterior.nc")
        atomic_write(out / "summary.csv", lambda tmp: summary.to_csv(tmp))
        if method == "nuts":
            plot_rank(fit.tree, names, out / "rank.png")
            plot_trace(fit.tree, names, out / "trace.png")
        plot_timeseries_fit(problem, trajectory_bands(problem, fit.tree), out / "fit.png")
    _print_summary(summary, method)
    print(json.dumps(diag))
    from ._custom import custom_model

    return _finish(run, record, fit, names, (custom_model, (problem,)))


def _simulate_custom(args) -> int:
    import jax
    import numpy as np
    import pandas as pd

    from ._config import CustomFitConfig, load_config
    from ._custom import check_problem, load_custom, reference_values, simulate_custom
    from ._output import atomic_write, write_json

    config, base = load_config(args.config)
    if not isinstance(config, CustomFitConfig):
        raise UsageError("--config must name a user-model config ([model] file = ...); imaging simulations take --protocol.")
    problem = load_custom(config, base)
    m = problem.model
    values = reference_values(problem)
    for item in args.param or []:
        name, _, text = item.partition("=")
        if name not in values:
            raise UsageError(f"--param {item}: {name!r} is not an estimated parameter or unit sd (known: {list(values)}).")
        try:
            values[name] = float(text)
        except ValueError:
            raise UsageError(f"--param {item}: {text!r} is not a number.") from None
    check_problem(problem)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UsageError(f"output folder {out} exists and is not empty; pass --overwrite or choose another --out.")
    sim = simulate_custom(problem, values, key=jax.random.key(args.seed))
    out.mkdir(parents=True, exist_ok=True)
    sites = problem.sites()
    for i, (d, spec) in enumerate(zip(problem.datasets, config.datasets)):
        table = {}
        for site, j, obs in sites:
            if j == i:
                u, t, _ = d.observed[obs]
                for k in range(len(t)):
                    table.setdefault((int(u[k]), int(t[k])), {})[obs] = sim["observed"][site][k]
        keys = sorted(table)
        frame = pd.DataFrame({spec.time_column: [d.times[t] / d.time_factor for _, t in keys]})
        if d.units is not None:
            frame.insert(0, spec.unit_column, [d.units[u] for u, _ in keys])
        for obs in d.observed:
            frame[obs] = [table[k].get(obs, np.nan) for k in keys]
        atomic_write(out / f"{Path(spec.file).stem}.csv", lambda tmp, f=frame: f.to_csv(tmp, index=False, float_format="%.8g"))
    truth = {"parameters": values, "seed": args.seed, "config": str(args.config)}
    if sim["units"]:
        truth["units"] = {n: dict(zip(problem.unit_labels(), map(float, v))) for n, v in sim["units"].items()}
    write_json(truth, out / "truth.json")
    print(f"simulated {len(problem.datasets)} data set(s) of model {m.name!r} at the observed times of the config's data "
          f"into {out}/ (+ truth.json)")
    return 0


def _run_dir(path) -> Path:
    run_dir = Path(path)
    if not (run_dir / "posterior.nc").exists() or not (run_dir / "run.json").exists():
        raise UsageError(f"{run_dir}: no finished fit there (needs posterior.nc and run.json). Fix: give the run "
                         "directory a `zinckin fit` wrote.")
    return run_dir


def cmd_report(args) -> int:
    _enable_x64()
    from ._report import build_report

    run_dir = _run_dir(args.run_dir)
    print(f"building the report of {run_dir}", flush=True)
    report = build_report(run_dir, out=Path(args.out) if args.out else None, max_pages=args.pages)
    for note in report.notes:
        print(f"note: {note}")
    print(f"{len(report.figures)} figures, {report.seconds:.0f} s: {report.html}")
    return 0


def cmd_profile(args) -> int:
    _enable_x64()
    import jax
    import xarray as xr

    from ._output import atomic_write
    from ._report import plot_profiles
    from ._review import profile_likelihoods
    from ._target import target_from_run

    run_dir = _run_dir(args.run_dir)
    target = target_from_run(run_dir)
    tree = xr.open_datatree(run_dir / "posterior.nc", engine="h5netcdf")
    print(f"profiling {', '.join(args.param) if args.param else 'the population parameters'} of {run_dir} "
          f"({args.points} grid points each)", flush=True)
    prof = profile_likelihoods(target, tree, names=args.param or None, num_points=args.points,
                               key=jax.random.key(args.seed), max_iter=args.max_iter,
                               log=lambda line: print(line, flush=True))
    atomic_write(run_dir / "profiles.csv", lambda tmp: prof.curves.to_csv(tmp, index=False))
    atomic_write(run_dir / "identifiability.csv", lambda tmp: prof.table.to_csv(tmp))
    plot_profiles(prof.curves, prof.table, run_dir / "profiles.png")
    print(prof.table.to_string(float_format="{:.4g}".format))
    flat = [n for n in prof.table.index if prof.table.loc[n, "verdict"] != "identified"]
    print("not identified by the data: " + (", ".join(flat) if flat else "none"))
    print(f"results in {run_dir}/ (profiles.csv, identifiability.csv, profiles.png)")
    return 0


def cmd_ppc(args) -> int:
    _enable_x64()
    import jax
    import numpy as np
    import pandas as pd

    from ._config import load_config
    from ._output import atomic_write, plot_dose_response
    from ._report import plot_panel_page, predictive_panels
    from ._review import prior_predictive
    from ._target import target_from_config

    if not args.prior:
        raise UsageError("zinckin ppc checks the priors before a fit: pass --prior CONFIG (posterior predictive "
                         "checks are in the run directory and in `zinckin report RUN_DIR`).")
    config, base = load_config(args.config)
    target = target_from_config(config, base)
    out = Path(args.out) if args.out else Path(config.output.dir) / "prior_check"
    print(f"drawing {args.draws} parameter sets from the priors of {args.config} and simulating its data", flush=True)
    check = prior_predictive(target, args.draws, key=jax.random.key(args.seed))
    print(f"{check.num_draws - check.failed} of {check.num_draws} prior draws solved"
          + (f"; {check.failed} failed (left out)" if check.failed else ""))
    out.mkdir(parents=True, exist_ok=True)
    panels = predictive_panels(check.tree)
    path = out / "prior_predictive.png"
    if panels:
        cover = np.array([p.coverage for p in panels])
        print(f"observations inside the 90% prior predictive band: {100 * np.nanmean(cover):.0f}% on average "
              f"(lowest panel {100 * np.nanmin(cover):.0f}%)")
        panels.sort(key=lambda p: p.coverage)  # the data the priors reach least first
        plot_panel_page(panels[:20], path, title="Prior predictive check: observed data and the 90% band of data "
                        "simulated from the priors (least covered first)")
    else:
        plot_dose_response(check.tree, path, title="Prior predictive check: observed fold changes and the priors")
        tree = check.tree
        site = next(iter(tree["log_likelihood"].data_vars))
        obs = np.asarray(tree["observed_data"][site], dtype=float)
        draws = np.asarray(tree["posterior_predictive"][site]).reshape((-1,) + obs.shape)
        lo, hi = np.quantile(draws, [0.05, 0.95], axis=0)
        print(f"observations inside the 90% prior predictive interval: {100 * np.mean((obs >= lo) & (obs <= hi)):.0f}%")
    summary = pd.DataFrame([{"draws": check.num_draws, "failed": check.failed}])
    atomic_write(out / "prior_check.csv", lambda tmp: summary.to_csv(tmp, index=False))
    print(f"results in {out}/ ({path.name}, prior_check.csv)")
    return 0


def cmd_compare(args) -> int:
    from ._compare import compare_runs

    if len(args.run_dirs) < 2:
        raise UsageError("zinckin compare needs at least two run directories.")
    table = compare_runs([_run_dir(d) for d in args.run_dirs], Path(args.out))
    print(table.to_string(float_format="{:.4g}".format))
    print(f"best by PSIS-LOO: {table.index[0]}; results in {args.out}/ (compare.csv, compare.png)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zinckin", description="Bayesian inference for cellular zinc kinetics.")
    p.add_argument("--traceback", action="store_true", help="show the Python traceback on errors")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("simulate", help="write a synthetic imaging data set")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--protocol", help="protocol TOML (default: the bundled example protocol)")
    s.add_argument("--num-cells", type=int, default=16)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--duration", type=float, help="recording length, in the protocol's time unit")
    s.add_argument("--frame-interval", type=float, help="time between frames, in the protocol's time unit")
    s.add_argument("--noise-fraction", type=float, default=0.03, help="noise sd as a fraction of F_min")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--record-command", help=argparse.SUPPRESS)
    s.add_argument("--config", help="a user-model config: simulate its data sets at their observed times instead")
    s.add_argument("--param", action="append", metavar="NAME=VALUE",
                   help="with --config: a true parameter value (default: prior medians); repeat for several")
    s.set_defaults(func=cmd_simulate)

    c = sub.add_parser("check", help="validate a config and its data without fitting")
    c.add_argument("config")
    c.set_defaults(func=cmd_check)

    f = sub.add_parser("fit", help="fit the model to the data named in a config",
                       epilog="exit status: 0 converged (or MAP done), 2 bad input, 3 ran but the diagnostics "
                              "gate says not converged")
    f.add_argument("config", nargs="?", help="the fit config (TOML)")
    f.add_argument("--out", help="run directory (default: output.dir of the config)")
    f.add_argument("--overwrite", action="store_true", help="replace an existing or unfinished fit in the run directory")
    f.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted fit from its checkpoint")
    f.add_argument("--from-run", metavar="RUN_DIR", help="refit exactly the config and inputs of a finished run (with --out)")
    f.add_argument("--no-progress", action="store_true", help="no progress bar")
    f.set_defaults(func=cmd_fit)

    r = sub.add_parser("report", help="write an HTML report of a finished run (diagnostics, posteriors, predictive checks)")
    r.add_argument("run_dir")
    r.add_argument("--out", help="folder for report.html and its figures (default: RUN_DIR/report)")
    r.add_argument("--pages", type=int, default=3, help="pages of predictive overlays to draw, worst fits first")
    r.set_defaults(func=cmd_report)

    pr = sub.add_parser("profile", help="profile likelihoods of a finished run's population parameters")
    pr.add_argument("run_dir")
    pr.add_argument("--param", action="append", metavar="NAME", help="profile only this parameter; repeat for several")
    pr.add_argument("--points", type=int, default=20, help="grid points per parameter (half on each side)")
    pr.add_argument("--max-iter", type=int, default=500, help="L-BFGS iterations per grid point")
    pr.add_argument("--seed", type=int, default=0)
    pr.set_defaults(func=cmd_profile)

    q = sub.add_parser("ppc", help="prior predictive check of a config: simulate its data from the priors")
    q.add_argument("config")
    q.add_argument("--prior", action="store_true", help="draw from the priors (required)")
    q.add_argument("--draws", type=int, default=200)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", help="output folder (default: OUTPUT_DIR/prior_check of the config)")
    q.set_defaults(func=cmd_ppc)

    cp = sub.add_parser("compare", help="compare runs fit to the same data by PSIS-LOO")
    cp.add_argument("run_dirs", nargs="+")
    cp.add_argument("--out", required=True, help="folder for compare.csv and compare.png")
    cp.set_defaults(func=cmd_compare)
    return p


def main(argv=None) -> int:
    from data import DataError
    from models import ModelError

    from ._config import ConfigError
    from ._sampling import CheckpointError

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except (DataError, ConfigError, ModelError, UsageError, CheckpointError) as e:
        if args.traceback:
            traceback.print_exc()
        print(f"zinckin {args.command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ValueError as e:
        if args.traceback:
            traceback.print_exc()
        print(f"zinckin {args.command}: error: {e} (rerun with --traceback for details)", file=sys.stderr)
        return EXIT_BAD_INPUT


def entry() -> None:
    sys.exit(main())

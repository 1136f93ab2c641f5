"""What a run directory records so that the run can be reproduced (``run.json`` ``provenance``).

The config file is copied verbatim into the run directory (``config.toml``); ``run.json`` holds
its sha256, the sha256 of every input file it names, the folder its relative paths resolve
against, the versions of the numerical stack, the git commit of the zinckin sources (when they
are a git checkout), the devices and precision, the seed and the wall time of each phase.
``zinckin fit --from-run RUN_DIR`` reads these back (:func:`rerun_inputs`).
"""

import hashlib
import importlib.metadata
import json
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

from ._config import ConfigError, CustomFitConfig, TranscriptFitConfig


PACKAGES = ("jax", "jaxlib", "numpyro", "diffrax", "equinox", "lineax", "optimistix", "optax", "arviz",
            "arviz-base", "arviz-stats", "arviz-plots", "xarray", "numpy", "scipy", "pandas", "zinckin")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def input_files(config, base: Path) -> dict[str, Path]:
    """Every input file a config names, by the key it is named under."""
    if isinstance(config, TranscriptFitConfig):
        t = config.transcripts
        return {"transcripts." + k: base / v for k, v in (("fold_change", t.fold_change), ("ct", t.ct)) if v}
    if isinstance(config, CustomFitConfig):
        files = {"model.file": base / config.model.file}
        for i, d in enumerate(config.datasets):
            files[f"datasets[{i}].file"] = base / d.file
        return files
    return {"data.traces": base / config.data.traces, "data.protocol": base / config.data.protocol}


def _versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _git() -> dict:
    """Commit and dirty flag of the zinckin sources, where they are a git checkout."""
    src = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None, "source": str(src),
                "note": "zinckin is installed as a package, not run from a git checkout; see versions.zinckin"}
    return {"commit": commit, "dirty": dirty, "source": str(src)}


def _devices() -> dict:
    import jax

    devs = jax.devices()
    return {"platform": devs[0].platform, "devices": [str(d) for d in devs], "process_count": jax.process_count(),
            "process_index": jax.process_index()}


class PhaseTimer:
    """Wall time per named phase (seconds), in the order the phases ran."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S%z")

    def phase(self, name: str):
        timer = self

        class _Phase:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[name] = round(timer.seconds.get(name, 0.0) + time.perf_counter() - self.t, 3)

        return _Phase()

    def total(self) -> float:
        return round(time.perf_counter() - self._start, 3)


def provenance(config_path: Path, config, base: Path, timer: PhaseTimer, argv) -> dict:
    """The ``provenance`` record of ``run.json``."""
    import jax

    config_path = Path(config_path)
    resolved = config.model_dump(mode="json")
    return {
        "config_file": str(config_path.resolve()),
        "config_sha256": sha256(config_path),
        "resolved_config": resolved,
        "resolved_config_sha256": hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest(),
        "base_dir": str(base),
        "inputs": {k: {"path": str(p.resolve()), "sha256": sha256(p)} for k, p in input_files(config, base).items()},
        "seed": config.seed,
        "precision": "float64" if jax.config.jax_enable_x64 else "float32",
        "compilation_cache_dir": jax.config.jax_compilation_cache_dir,
        "versions": _versions(),
        "git": _git(),
        "devices": _devices(),
        "host": {"hostname": socket.gethostname(), "platform": platform.platform()},
        "argv": list(argv),
        "started": timer.started,
        "wall_seconds": dict(timer.seconds, total=timer.total()),
    }


def rerun_inputs(run_dir: Path) -> tuple[Path, Path]:
    """The stored config of a run and the folder its paths resolve against, after checking the inputs.

    Raises
    ------
    ConfigError
        The run directory has no ``run.json`` / ``config.toml`` with provenance, or an input file
        changed or vanished since the run (named, with both hashes).
    """
    run_dir = Path(run_dir)
    record_path, config_path = run_dir / "run.json", run_dir / "config.toml"
    if not record_path.exists() or not config_path.exists():
        raise ConfigError(f"{run_dir}: not a zinckin run directory with provenance (needs run.json and config.toml). "
                          "Fix: point --from-run at the folder a `zinckin fit` wrote.")
    prov = json.loads(record_path.read_text()).get("provenance")
    if prov is None:
        raise ConfigError(f"{record_path}: has no provenance record (written by an older zinckin). Fix: refit from the config.")
    if sha256(config_path) != prov["config_sha256"]:
        raise ConfigError(f"{config_path}: changed since the run (sha256 differs from run.json). "
                          "Fix: restore it, or fit the edited config as a new run.")
    for key, entry in prov["inputs"].items():
        p = Path(entry["path"])
        if not p.exists():
            raise ConfigError(f"{p} ({key} of the run in {run_dir}) no longer exists. Fix: restore the file to reproduce the run.")
        if sha256(p) != entry["sha256"]:
            raise ConfigError(f"{p} ({key}) changed since the run in {run_dir}: sha256 {sha256(p)[:12]}... "
                              f"instead of {entry['sha256'][:12]}.... Fix: restore the original file to reproduce the run.")
    return config_path, Path(prov["base_dir"])

"""Fit configuration files (TOML), validated with pydantic."""

import math
import tomllib
from pathlib import Path
from typing import Annotated, Literal

import numpyro.distributions as dist
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from models import GENE_SPECS, PARAM_SPECS, REGULATION_KINDS, TRANSCRIPTION_SPECS, SolverConfig, SteadyStateConfig

from ._fit import SamplerConfig
from ._model import DEFAULT_FIXED, DEFAULT_PER_CELL, ParameterPlan, default_plan
from ._transcripts import DEFAULT_PER_TISSUE, DEFAULT_TRANSCRIPT_FIXED, TISSUE_PARAMS, TranscriptPlan


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file, the key and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSection(_Strict):
    traces: str
    protocol: str
    format: Literal["auto", "long", "fiji"] = "auto"
    mask_missing: bool = False
    exclude_cells: list[str] = Field(default_factory=list)
    cell_column: str = "cell"
    time_column: str = "time"
    intensity_column: str = "intensity"
    min_calibration_frames: int = Field(default=4, ge=1)


class PriorSpec(_Strict):
    """A prior override: ``{median = .., log_sd = ..}`` (log-normal) or ``{fixed = ..}``."""

    median: float | None = Field(default=None, gt=0)
    log_sd: float | None = Field(default=None, gt=0)
    fixed: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _one_kind(self):
        if self.fixed is not None and (self.median is not None or self.log_sd is not None):
            raise ValueError("give either 'fixed' or 'median'/'log_sd', not both")
        if self.fixed is None and (self.median is None or self.log_sd is None):
            raise ValueError("a prior needs both 'median' and 'log_sd' (log-normal), or 'fixed'")
        return self


def _apply_prior_overrides(overrides: dict, fixed: dict) -> dict:
    """Apply ``[priors]`` entries: ``fixed`` values go into ``fixed`` (in place), log-normal ones
    are returned as numpyro priors (and taken out of ``fixed``).
    """
    priors = {}
    for name, spec in overrides.items():
        if spec.fixed is not None:
            fixed[name] = spec.fixed
        else:
            fixed.pop(name, None)
            priors[name] = dist.LogNormal(math.log(spec.median), spec.log_sd)
    return priors


class ModelSection(_Strict):
    name: Literal["zinc_flux"] = "zinc_flux"
    per_cell: list[str] = Field(default_factory=lambda: list(DEFAULT_PER_CELL))
    population_sd_scale: float = Field(default=0.5, gt=0)
    parameterization: Literal["centered", "noncentered"] = "centered"
    fixed_default: list[str] = Field(default_factory=lambda: list(DEFAULT_FIXED))

    @field_validator("per_cell", "fixed_default")
    @classmethod
    def _known(cls, v):
        unknown = [n for n in v if n not in PARAM_SPECS]
        if unknown:
            raise ValueError(f"unknown parameter(s) {unknown}; known: {list(PARAM_SPECS)}")
        return v


class SolverSection(_Strict):
    solver: Literal["tsit5", "dopri5"] = "tsit5"
    rtol: float = Field(default=1e-6, gt=0, lt=1)
    atol: float = Field(default=1e-9, gt=0)
    max_steps: int = Field(default=4096, ge=16)
    # "system": all cells as one system, shared steps, per-cell error control; "rows": one solve per cell
    layout: Literal["system", "rows"] = "system"
    # with layout "system": the most cells per system, solved in blocks one after another; "auto":
    # models.CPU_BLOCK_ROWS on a CPU, all cells one system on a GPU; "all": one system everywhere
    block_rows: int | Literal["auto", "all"] = "auto"

    @field_validator("block_rows")
    @classmethod
    def _positive_block(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError(f"block_rows must be >= 1, 'auto' or 'all', got {v}")
        return v


class SamplerSection(_Strict):
    num_warmup: int = Field(default=300, ge=1)
    num_samples: int = Field(default=300, ge=1)
    num_chains: int = Field(default=2, ge=1)
    target_accept_prob: float = Field(default=0.8, gt=0, lt=1)
    max_tree_depth: int = Field(default=8, ge=1, le=12)
    chain_method: Literal["sequential", "vectorized", "sharded"] = "sequential"
    adapt_mass_matrix: bool = False
    # the Laplace metric: "dense" matrix, "block" (block-arrow over cells, never formed; for many
    # cells), "auto" (block from 64 cells); docs/inference.md
    metric: Literal["auto", "dense", "block"] = "auto"
    # "nuts"; or a quick Gaussian approximation: "map" (MAP + Laplace), "svi" (full-rank ELBO fit)
    method: Literal["nuts", "map", "svi"] = "nuts"
    map_starts: int = Field(default=1, ge=1)  # L-BFGS starts: the prior medians + (map_starts - 1) prior draws
    approx_draws: int = Field(default=2000, ge=10)  # draws kept from the "map" / "svi" approximation
    svi_steps: int = Field(default=2000, ge=1)
    svi_learning_rate: float = Field(default=0.01, gt=0)
    svi_particles: int = Field(default=4, ge=1)

    def nuts(self) -> SamplerConfig:
        """The NUTS settings (:class:`inference._fit.SamplerConfig`)."""
        return SamplerConfig(**self.model_dump(include=set(SamplerConfig.__dataclass_fields__)))

    def svi(self):
        """The SVI settings (:class:`inference._approx.SVISettings`)."""
        from ._approx import SVISettings

        return SVISettings(num_steps=self.svi_steps, learning_rate=self.svi_learning_rate,
                           num_particles=self.svi_particles)


class OutputSection(_Strict):
    dir: str = "runs/fit"
    num_ppc_cells: int = Field(default=8, ge=1)
    # imaging fits: the cells whose per-frame draws (predictive intensity, zc_nM, log likelihood)
    # are kept; "auto": all while they fit in inference._fit.PREDICTIVE_BUDGET values per array,
    # else an even subset (report and compare then use those cells' observations)
    predictive_cells: Literal["auto", "all"] | Annotated[int, Field(ge=1)] = "auto"
    checkpoint_every: int = Field(default=250, ge=0)  # kept draws per chain between checkpoints; 0: no checkpoints


class DistributedSection(_Strict):
    """``[runtime.distributed]``: one fit over several processes (hosts) with ``jax.distributed``.

    Each field left out is read from the environment (``ZINCKIN_COORDINATOR_ADDRESS``,
    ``ZINCKIN_NUM_PROCESSES``, ``ZINCKIN_PROCESS_ID``), else left to jax's own detection
    (``JAX_COORDINATOR_ADDRESS``, SLURM, Open MPI, Kubernetes). The process id usually comes from
    the environment, since every process reads the same config.
    """

    coordinator_address: str | None = None  # "host:port" of process 0
    num_processes: int | None = Field(default=None, ge=1)
    process_id: int | None = Field(default=None, ge=0)
    local_device_ids: list[int] | None = None  # this process's devices (default: all it sees)


class RuntimeSection(_Strict):
    """``[runtime]``: compilation cache, precision and multi-process runs."""

    # None: $ZINCKIN_COMPILATION_CACHE, else ~/.cache/zinckin/jax (unless jax already has a cache
    # directory, e.g. from JAX_COMPILATION_CACHE_DIR); "": no persistent cache
    compilation_cache_dir: str | None = None
    # "float32" halves memory and is faster on GPUs; checked against float64 in docs/inference.md
    # ("Precision"), with warnings where it is unsafe
    precision: Literal["float64", "float32"] = "float64"
    # several processes (hosts) in one fit; also switched on by $ZINCKIN_COORDINATOR_ADDRESS
    distributed: DistributedSection | None = None


class GateSection(_Strict):
    """``[gate]``: thresholds of the diagnostics verdict (see ``inference._gate``)."""

    max_r_hat: float = Field(default=1.01, gt=1)
    min_ess_bulk: float = Field(default=400, ge=0)
    min_ess_tail: float = Field(default=400, ge=0)
    max_divergences: int = Field(default=0, ge=0)
    min_bfmi: float = Field(default=0.2, ge=0)
    warn_bfmi: float = Field(default=0.3, ge=0)
    warn_tree_depth_fraction: float = Field(default=0.05, ge=0, le=1)
    max_solver_failure_fraction: float = Field(default=0.01, ge=0, le=1)

    def thresholds(self):
        from ._gate import GateThresholds

        return GateThresholds(**self.model_dump())


class FitConfig(_Strict):
    """The whole fit configuration. Paths in ``[data]`` are relative to the config file."""

    data: DataSection
    model: ModelSection = ModelSection()
    priors: dict[str, PriorSpec] = Field(default_factory=dict)
    solver: SolverSection = SolverSection()
    sampler: SamplerSection = SamplerSection()
    seed: int = 0
    output: OutputSection = OutputSection()
    gate: GateSection = GateSection()
    runtime: RuntimeSection = RuntimeSection()

    @field_validator("priors")
    @classmethod
    def _known_priors(cls, v):
        unknown = [n for n in v if n not in PARAM_SPECS]
        if unknown:
            raise ValueError(f"unknown parameter(s) {unknown}; known: {list(PARAM_SPECS)}")
        return v

    def solver_config(self) -> SolverConfig:
        s = self.solver
        return SolverConfig(solver=s.solver, rtol=s.rtol, atol=s.atol, max_steps=s.max_steps, layout=s.layout,
                            block_rows=None if s.block_rows == "all" else s.block_rows)

    def sampler_config(self) -> SamplerConfig:
        return self.sampler.nuts()

    def parameter_plan(self, probe_kd_nM: float) -> ParameterPlan:
        fixed = {n: PARAM_SPECS[n].median for n in self.model.fixed_default}
        priors = _apply_prior_overrides(self.priors, fixed)
        for name in self.model.per_cell:
            fixed.pop(name, None)
        return default_plan(probe_kd_nM=probe_kd_nM, fixed=fixed, priors=priors,
                            per_cell=self.model.per_cell,
                            population_sd_scale=self.model.population_sd_scale,
                            centered=self.model.parameterization == "centered")


TRANSCRIPT_PARAM_NAMES = tuple(TRANSCRIPTION_SPECS) + tuple(f"amplitude_{g}" for g in GENE_SPECS)


class TranscriptSection(_Strict):
    """``[transcripts]``: a qPCR data set, as a fold-change table or as raw Ct."""

    fold_change: str | None = None
    ct: str | None = None
    dose_unit: str | None = None
    reference_genes: list[str] = Field(default_factory=list)
    ct_cutoff: float = Field(default=40.0, gt=0)
    efficiency: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_file(self):
        if (self.fold_change is None) == (self.ct is None):
            raise ValueError("give exactly one of 'fold_change' (a fold-change table) or 'ct' (raw Ct wells)")
        if self.ct is not None and not self.reference_genes:
            raise ValueError("raw Ct data need 'reference_genes' (the normaliser genes, e.g. [\"GAPDH\"])")
        bad = {g: e for g, e in self.efficiency.items() if not (1.0 < e <= 2.2)}
        if bad:
            raise ValueError(f"efficiency is the amplification factor per cycle (2 = 100%), in (1, 2.2]; got {bad}")
        return self


class TranscriptModelSection(_Strict):
    name: Literal["mtf1", "groupwise"] = "mtf1"
    feedback: bool = False
    per_tissue: list[str] = Field(default_factory=lambda: list(DEFAULT_PER_TISSUE))
    reference_form: str = "sulfate"
    regulation: dict[str, Literal["induced", "repressed", "biphasic"]] = Field(default_factory=dict)
    fixed_default: list[str] = Field(default_factory=lambda: list(DEFAULT_TRANSCRIPT_FIXED))
    noise_scale: float = Field(default=0.5, gt=0)

    @field_validator("per_tissue")
    @classmethod
    def _tissue_params(cls, v):
        bad = [n for n in v if n not in TISSUE_PARAMS]
        if bad:
            raise ValueError(f"{bad} cannot vary per tissue; choose from {list(TISSUE_PARAMS)}")
        return v

    @field_validator("fixed_default")
    @classmethod
    def _fixed_known(cls, v):
        bad = [n for n in v if n not in TRANSCRIPTION_SPECS]
        if bad:
            raise ValueError(f"unknown parameter(s) {bad}; known: {list(TRANSCRIPTION_SPECS)}")
        return v

    @field_validator("regulation")
    @classmethod
    def _genes_known(cls, v):
        bad = [g for g in v if g not in GENE_SPECS]
        if bad:
            raise ValueError(f"unknown gene(s) {bad}; known: {list(GENE_SPECS)} (kinds: {list(REGULATION_KINDS)})")
        return v


class SteadySection(_Strict):
    tol: float = Field(default=1e-9, gt=0)
    max_newton_steps: int = Field(default=64, ge=1)
    t_max_h: float = Field(default=1e4, gt=0)


class TranscriptSamplerSection(SamplerSection):
    # transcript posteriors have few dimensions and scales that the MAP's curvature misses
    # (noise and random-effect sds near 0): re-estimating the dense metric in warmup pays.
    adapt_mass_matrix: bool = True
    metric: Literal["auto", "dense"] = "auto"  # the block-arrow metric is for imaging cells; dense here


class TranscriptFitConfig(_Strict):
    """A transcript fit: ``[transcripts]`` instead of ``[data]``. Paths are relative to the config file."""

    transcripts: TranscriptSection
    model: TranscriptModelSection = TranscriptModelSection()
    priors: dict[str, PriorSpec] = Field(default_factory=dict)
    steady_state: SteadySection = SteadySection()
    sampler: TranscriptSamplerSection = TranscriptSamplerSection()
    seed: int = 0
    output: OutputSection = OutputSection()
    gate: GateSection = GateSection()
    runtime: RuntimeSection = RuntimeSection()

    @field_validator("priors")
    @classmethod
    def _known_priors(cls, v):
        unknown = [n for n in v if n not in TRANSCRIPT_PARAM_NAMES]
        if unknown:
            raise ValueError(f"unknown parameter(s) {unknown}; known: {list(TRANSCRIPT_PARAM_NAMES)}")
        return v

    def sampler_config(self) -> SamplerConfig:
        return self.sampler.nuts()

    def steady_config(self) -> SteadyStateConfig:
        s = self.steady_state
        return SteadyStateConfig(tol=s.tol, max_newton_steps=s.max_newton_steps, t_max=s.t_max_h)

    def transcript_plan(self) -> TranscriptPlan:
        m = self.model
        fixed = {n: TRANSCRIPTION_SPECS[n].median for n in m.fixed_default}
        priors = _apply_prior_overrides(self.priors, fixed)
        for name in m.per_tissue:
            fixed.pop(name, None)
        return TranscriptPlan(model=m.name, priors=priors, fixed=fixed, per_tissue=tuple(m.per_tissue),
                              reference_form=m.reference_form, feedback=m.feedback, regulation=dict(m.regulation),
                              noise_scale=m.noise_scale)


class CustomModelSection(_Strict):
    """``[model]`` of a user-defined model: the Python file that defines it and how to use it."""

    file: str
    object: str = "model"
    per_dataset: list[str] = Field(default_factory=list)
    per_unit: list[str] = Field(default_factory=list)
    unit_sd_scale: float = Field(default=0.5, gt=0)
    unit_parameterization: Literal["noncentered", "centered"] = "noncentered"
    fixed: dict[str, float] = Field(default_factory=dict)


class DatasetSection(_Strict):
    """One ``[[datasets]]`` entry: a time-series table (wide, or long with a unit column) and its conditions."""

    file: str
    name: str | None = None
    time_column: str = "time"
    time_unit: str | None = None
    t0: float | None = None
    constants: dict[str, float] = Field(default_factory=dict)
    ignore_columns: list[str] = Field(default_factory=list)
    unit_column: str | None = None

    @field_validator("name")
    @classmethod
    def _identifier(cls, v):
        if v is not None and not v.isidentifier():
            raise ValueError(f"data set name {v!r} must be an identifier (letters, digits, '_')")
        return v


class CustomSolverSection(_Strict):
    """Solver overrides; keys left out keep the model file's ``ODESolver`` settings."""

    method: Literal["tsit5", "dopri5", "dopri8", "kvaerno5"] | None = None
    rtol: float | None = Field(default=None, gt=0, lt=1)
    atol: float | None = Field(default=None, gt=0)
    max_steps: int | None = Field(default=None, ge=16)


class CustomSamplerSection(SamplerSection):
    # small user models: the dense metric re-estimated in warmup is cheap and robust to
    # heavy-tailed priors (half-Cauchy) that the MAP's curvature misrepresents.
    adapt_mass_matrix: bool = True
    map_starts: int = Field(default=8, ge=1)  # oscillating and threshold models have local optima
    metric: Literal["auto", "dense"] = "auto"  # the block-arrow metric is for imaging cells; dense here


class CustomFitConfig(_Strict):
    """A fit of a user-defined model: ``[model] file = ...`` and ``[[datasets]]``. Paths are relative to the config."""

    model: CustomModelSection
    datasets: list[DatasetSection] = Field(min_length=1)
    solver: CustomSolverSection = CustomSolverSection()
    sampler: CustomSamplerSection = CustomSamplerSection()
    seed: int = 0
    output: OutputSection = OutputSection()
    gate: GateSection = GateSection()
    runtime: RuntimeSection = RuntimeSection()

    def sampler_config(self) -> SamplerConfig:
        return self.sampler.nuts()


def load_config(path) -> tuple[FitConfig | TranscriptFitConfig | CustomFitConfig, Path]:
    """Read and validate a fit config; returns the config and its folder (base of data paths).

    A config with a ``[transcripts]`` table is a :class:`TranscriptFitConfig`, one whose ``[model]``
    names a ``file`` is a :class:`CustomFitConfig` (user-defined model), otherwise an imaging
    :class:`FitConfig`.

    Raises
    ------
    ConfigError
        Missing file, TOML syntax errors, unknown keys, wrong types or values.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: the config file does not exist. Fix: check the path.") from None
    return parse_config(text, path), path.parent.resolve()


def parse_config(text: str, path) -> FitConfig | TranscriptFitConfig | CustomFitConfig:
    """Validate config text (``path`` names it in messages); see :func:`load_config`."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e}). Fix: correct the syntax there.") from None
    try:
        if "transcripts" in raw:
            kind = TranscriptFitConfig
        elif isinstance(raw.get("model"), dict) and "file" in raw["model"]:
            kind = CustomFitConfig
        else:
            kind = FitConfig
        config = kind.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"key '{loc}': {err['msg']}")
        raise ConfigError(f"{path}: invalid config: " + "; ".join(lines) + ". Fix: correct these keys (see docs/config.md).") from None
    return config

"""Bayesian inference for zinc homeostasis models (numpyro)."""

import os as _os


_os.environ.setdefault("EQX_ON_ERROR", "off")  # before equinox is imported; see models/__init__.py
import numpyro as _numpyro  # noqa: E402, F401  (before its submodules; see models/__init__.py)

from ._approx import Approximation as Approximation, SVISettings as SVISettings, approximate as approximate
from ._config import (
    ConfigError as ConfigError,
    FitConfig as FitConfig,
    TranscriptFitConfig as TranscriptFitConfig,
    load_config as load_config,
)
from ._fit import (
    FitResult as FitResult,
    SamplerConfig as SamplerConfig,
    build_problem as build_problem,
    population_var_names as population_var_names,
    run_nuts as run_nuts,
)
from ._laplace import LaplaceInit as LaplaceInit, laplace_init as laplace_init
from ._model import (
    ImagingProblem as ImagingProblem,
    ParameterPlan as ParameterPlan,
    default_plan as default_plan,
    imaging_model as imaging_model,
)
from ._simulate import SimulationSettings as SimulationSettings, simulate_ct as simulate_ct, simulate_imaging as simulate_imaging
from ._transcripts import (
    TranscriptFit as TranscriptFit,
    TranscriptPlan as TranscriptPlan,
    TranscriptProblem as TranscriptProblem,
    bioavailability_summary as bioavailability_summary,
    build_transcript_problem as build_transcript_problem,
    default_transcript_plan as default_transcript_plan,
    ppc_coverage as ppc_coverage,
    run_transcript_nuts as run_transcript_nuts,
    transcript_model as transcript_model,
)

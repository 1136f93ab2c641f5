"""Kinetic models of cellular zinc homeostasis (JAX / diffrax)."""

import os as _os


# Runtime checks inside equinox/lineax/optimistix (for example a linear solve that meets a NaN at
# a wild parameter draw) are off: the NaN flows on, the solve's own result code and the
# finiteness checks of models and inference mark that row as failed (log density -inf, counted)
# and sampling goes on. Raising would kill a run over one bad draw; "nan" mode would poison every
# row of a vmapped batch (cells, starts, chains), since equinox reduces the error flag over the
# batch. Set before equinox is imported; an explicit EQX_ON_ERROR in the environment wins.
_os.environ.setdefault("EQX_ON_ERROR", "off")

# numpyro itself before any of its submodules: arviz-base registers "numpyro" as a lazy module
# (lazy_loader); a first import of "numpyro.distributions" through it leaves
# numpyro.distributions without its "distribution" attribute, and numpyro.factor then fails.
import numpyro as _numpyro  # noqa: E402, F401

from ._coupled import (
    COUPLED_DEFAULT_FIXED as COUPLED_DEFAULT_FIXED,
    COUPLED_GENES as COUPLED_GENES,
    COUPLED_SPECS as COUPLED_SPECS,
    coupled_model as coupled_model,
    coupled_vector_field as coupled_vector_field,
)
from ._custom import (
    CPU_BLOCK_ROWS as CPU_BLOCK_ROWS,
    CPU_MIN_ROWS_PER_DEVICE as CPU_MIN_ROWS_PER_DEVICE,
    TIME_UNITS as TIME_UNITS,
    LogNormal as LogNormal,
    ModelError as ModelError,
    Normal as Normal,
    Observable as Observable,
    ODEModel as ODEModel,
    ODESolver as ODESolver,
    Parameter as Parameter,
    PreEquilibrated as PreEquilibrated,
    State as State,
    StudentT as StudentT,
    row_devices as row_devices,
    set_row_devices as set_row_devices,
    time_conversion as time_conversion,
    using_row_devices as using_row_devices,
)
from ._dynamics import (
    AbstractZincModel as AbstractZincModel,
    FluxState as FluxState,
    FullState as FullState,
    ZincFluxFull as ZincFluxFull,
    ZincFluxRapidEquilibrium as ZincFluxRapidEquilibrium,
    derived_rates as derived_rates,
)
from ._flux import FLUX_DEFAULT_FIXED as FLUX_DEFAULT_FIXED, FLUX_SOLVER as FLUX_SOLVER, flux_model as flux_model
from ._observation import FluorescenceParams as FluorescenceParams, fluorescence as fluorescence
from ._params import (
    PARAM_SPECS as PARAM_SPECS,
    ParamSpec as ParamSpec,
    ZincFluxParams as ZincFluxParams,
    default_params as default_params,
    default_priors as default_priors,
)
from ._protocol import SEGMENT_KINDS as SEGMENT_KINDS, ProtocolInputs as ProtocolInputs
from ._solve import (
    SolverConfig as SolverConfig,
    Trajectory as Trajectory,
    full_model_config as full_model_config,
    solve as solve,
)
from ._steady import SteadyState as SteadyState, SteadyStateConfig as SteadyStateConfig, steady_state as steady_state
from ._transcription import (
    GENE_SPECS as GENE_SPECS,
    REGULATION_KINDS as REGULATION_KINDS,
    TRANSCRIPTION_SPECS as TRANSCRIPTION_SPECS,
    GeneSpec as GeneSpec,
    MTF1Transcription as MTF1Transcription,
    TranscriptionParams as TranscriptionParams,
    default_transcription_params as default_transcription_params,
    transcription_model as transcription_model,
)

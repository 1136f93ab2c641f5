r"""User-defined kinetic models: the public API for bringing your own ODE model.

A model is an :class:`ODEModel` built from

- :class:`State` entries (name, unit, initial value: a number, a parameter name, or found by
  pre-equilibration with :class:`PreEquilibrated`);
- :class:`Parameter` entries (name, unit, and either a numpyro distribution as the prior or a
  number that fixes the value);
- a vector field ``f(t, y, p)`` where ``y`` maps state names to scalars and ``p`` maps parameter
  names to scalars; it returns a mapping with the same state names (or a sequence in the order of
  ``states``);
- :class:`Observable` entries: a function ``g(t, y, p)`` (or a state name) and a noise model
  (:class:`Normal`, :class:`LogNormal`, :class:`StudentT`) whose scale is a number or the name of
  an estimated parameter.

The model is written in one time unit (``time_unit``); data in another known unit are converted
at the data boundary. :meth:`ODEModel.check` runs every user function once at the prior medians
and turns mistakes (wrong number of derivatives, an undeclared parameter, a NaN observable) into
:class:`ModelError` messages before any sampling.

Example (Lotka-Volterra, time in years)::

    import numpyro.distributions as dist
    from models import LogNormal, ODEModel, Observable, Parameter, State

    def vector_field(t, y, p):
        return {"hare": (p["alpha"] - p["beta"] * y["lynx"]) * y["hare"],
                "lynx": (-p["gamma"] + p["delta"] * y["hare"]) * y["lynx"]}

    model = ODEModel(
        name="lotka_volterra", time_unit="year", vector_field=vector_field,
        states=[State("hare", "thousand pelts", initial="hare_0"),
                State("lynx", "thousand pelts", initial="lynx_0")],
        parameters=[Parameter("alpha", "1/year", dist.TruncatedNormal(1.0, 0.5, low=0.0)), ...],
        observables=[Observable("hare", "hare", LogNormal("sigma_hare")), ...],
    )
"""

import contextlib
import dataclasses
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optimistix as optx

from ._compat import enable_shard_map_solves
from ._steady import SteadyStateConfig, steady_state


class ModelError(ValueError):
    """A mistake in a user-defined model, reported before any sampling."""


TIME_UNITS = {"s": 1.0 / 60.0, "min": 1.0, "h": 60.0, "day": 1440.0, "week": 10080.0, "year": 525960.0}
"""Known time units, in minutes (a year is 365.25 days)."""


def time_conversion(from_unit: str, to_unit: str) -> float:
    """Factor that converts times in ``from_unit`` to ``to_unit``; ModelError for unknown units."""
    if from_unit == to_unit:
        return 1.0
    for u in (from_unit, to_unit):
        if u not in TIME_UNITS:
            raise ModelError(f"unknown time unit {u!r}; known units: {', '.join(TIME_UNITS)}. "
                             "Fix: use one of these, or give data and model the same unit.")
    return TIME_UNITS[from_unit] / TIME_UNITS[to_unit]


# ----------------------------------------------------------------------------------------------
# Declarations


@dataclasses.dataclass(frozen=True)
class State:
    """A state variable.

    Attributes
    ----------
    name : identifier used in ``y[name]``.
    unit : unit of the state (documentation and output attributes).
    initial : value at ``t0``: a number (fixed), the name of a parameter (estimated, or fixed if
        that parameter is fixed), or None when the model is :class:`PreEquilibrated` (then a
        number or parameter here is the Newton starting guess).
    description : free text.
    """

    name: str
    unit: str = ""
    initial: float | str | None = None
    description: str = ""


@dataclasses.dataclass(frozen=True)
class Parameter:
    """A model parameter.

    Attributes
    ----------
    name : identifier used in ``p[name]``.
    unit : unit of the parameter.
    prior : a ``numpyro.distributions.Distribution`` (any: truncated, half, log-normal, ...), or a
        number, which fixes the parameter (a known constant such as a dose or a volume).
    description : free text.
    """

    name: str
    unit: str = ""
    prior: Any = None
    description: str = ""

    @property
    def is_fixed(self) -> bool:
        return isinstance(self.prior, numbers.Real)


@dataclasses.dataclass(frozen=True)
class Normal:
    r"""Additive Gaussian noise, $y_\text{obs} \sim \mathcal N(g, \sigma)$.

    ``scale`` is $\sigma$ (in the observable's unit): a number or a parameter name.
    """

    scale: float | str

    def distribution(self, pred, p):
        return dist.Normal(pred, _value(self.scale, p))

    def valid(self, pred):
        return jnp.isfinite(pred)


@dataclasses.dataclass(frozen=True)
class LogNormal:
    r"""Multiplicative noise, $\ln y_\text{obs} \sim \mathcal N(\ln g, \sigma)$.

    ``scale`` is $\sigma$ on the log scale (about the coefficient of variation when small). Needs
    positive data and a positive prediction; a non-positive prediction rejects the draw (counted
    with the solver failures).
    """

    scale: float | str

    def distribution(self, pred, p):
        return dist.LogNormal(jnp.log(jnp.where(pred > 0, pred, 1.0)), _value(self.scale, p))

    def valid(self, pred):
        return jnp.isfinite(pred) & (pred > 0)


@dataclasses.dataclass(frozen=True)
class StudentT:
    r"""Heavy-tailed noise, $y_\text{obs} \sim t_\nu(g, \sigma)$, robust to outlying points.

    ``scale`` is $\sigma$ and ``df`` is $\nu$; each a number or a parameter name.
    """

    scale: float | str
    df: float | str = 4.0

    def distribution(self, pred, p):
        return dist.StudentT(_value(self.df, p), pred, _value(self.scale, p))

    def valid(self, pred):
        return jnp.isfinite(pred)


NOISE_MODELS = (Normal, LogNormal, StudentT)


@dataclasses.dataclass(frozen=True)
class Observable:
    """A measured quantity.

    Attributes
    ----------
    name : column name in the data table.
    fn : ``g(t, y, p) -> scalar``, or the name of a state (observed directly).
    noise : :class:`Normal`, :class:`LogNormal` or :class:`StudentT`.
    unit : unit of the observable.
    """

    name: str
    fn: Callable | str
    noise: Any
    unit: str = ""


@dataclasses.dataclass(frozen=True)
class PreEquilibrated:
    r"""Start every solve at the steady state of the model under baseline conditions.

    The start solves $f(t_e, y^*, p_\text{baseline}) = 0$, where ``baseline`` overrides
    parameters (for example a stimulus or dose set to its resting value) and $t_e$ is ``time``
    (default: the data set's ``t0``; ``-inf`` evaluates time-switched inputs before any switch).
    Newton with an integration fallback, differentiated implicitly (:func:`models.steady_state`);
    a failed search rejects the draw and is counted. The Newton guess is ``guess(p)`` (a mapping
    state -> value) when given, else each state's ``initial`` entry, or 1.
    """

    baseline: Mapping[str, float] = dataclasses.field(default_factory=dict)
    config: SteadyStateConfig = SteadyStateConfig()
    guess: Callable | None = None
    time: float | None = None


def _pad_rows(tree, pad: int):
    """Every array of ``tree`` with ``pad`` copies of its first row appended (rows that solve like
    a real one and are dropped afterwards).
    """
    return jax.tree.map(lambda x: jnp.concatenate([x, jnp.repeat(x[:1], pad, axis=0)]), tree)


CPU_BLOCK_ROWS = 64
"""Rows per system of the system layout on a CPU, with ``block_rows="auto"`` (docs/performance.md)."""

CPU_MIN_ROWS_PER_DEVICE = 256
"""Fewest rows per CPU device for which ``zinckin fit`` splits the cells over one device per core:
measured on 2 cores, the imaging gradient over 2 devices was 1.47x faster at 512 cells (256 per
device) and 2.06x at 4,096, but 0.65x at 64 and 0.50x at 8 (a fixed cost per call;
docs/performance.md)."""


def check_block_rows(value, error=ValueError) -> None:
    """Raise ``error`` unless ``value`` is a positive integer, None or ``"auto"``."""
    if value is None or value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return
    raise error(f"solver block_rows must be a positive integer, None (all rows one system) or 'auto', got {value!r}.")


def block_size(block_rows, platform: str) -> int | None:
    """Rows per block of the system layout: ``"auto"`` is :data:`CPU_BLOCK_ROWS` on a CPU, one block elsewhere."""
    if block_rows == "auto":
        return CPU_BLOCK_ROWS if platform == "cpu" else None
    return block_rows


class ODESolver(eqx.Module):
    """Numerical settings of a user-model solve.

    Attributes
    ----------
    method : ``"tsit5"``, ``"dopri5"``, ``"dopri8"`` (explicit) or ``"kvaerno5"`` (implicit,
        for stiff models).
    rtol, atol : tolerances of the PID step-size controller.
    max_steps : step bound; a solve that needs more fails (counted inside sampling, not raised).
    dt0 : first step (model time units), or None for diffrax's automatic choice. A model that
        starts at a steady state (derivative zero) needs a small fixed value: the automatic
        choice then takes a huge first step.
    dtmax : largest step, or None for no bound.
    layout : how :meth:`ODEModel.solve_batch` lays out many rows.

        - ``"rows"`` (default): one solve per row, ``vmap``-ed. Every row has its own step
          sizes, and fails on its own.
        - ``"system"``: all rows form one ODE system with shared steps. The error of each
          row is measured by its own RMS norm, and the step is accepted only when every row's
          error is within tolerance (the norm is the largest row norm), so each row's local
          error stays within its own tolerance, as under ``"rows"``. All rows must share the start and
          the saving times (checked: rows that differ fail). A failed step fails every row.
          On a CPU the imaging gradient is about 3x faster. It saves the ``vmap``-ed
          step loop's per-row selects and bookkeeping, and the shared steps cost little when
          the rows follow one protocol (docs/performance.md).
    block_rows : with ``layout="system"``, the most rows in one system: an integer, None for
        all rows in one, or ``"auto"`` (the default: :data:`CPU_BLOCK_ROWS` on a CPU, all rows
        in one on a GPU or TPU). More rows are cut into blocks of this size (the last one
        padded), solved one after another (``lax.map``), each with its own steps; a failed step
        fails only its block. Over several devices the blocks are cut within each device's
        share of the rows. On a CPU, blocks keep a step's working set in cache, and fewer rows
        set each block's step count (docs/performance.md); on a GPU one system keeps the
        device busy.
    """

    method: str = "tsit5"
    rtol: float = 1e-8
    atol: float = 1e-10
    max_steps: int = 16_384
    dt0: float | None = None
    dtmax: float | None = None
    layout: str = "rows"
    block_rows: int | str | None = "auto"

    def __check_init__(self):
        check_block_rows(self.block_rows, ModelError)
        if self.method not in ("tsit5", "dopri5", "dopri8", "kvaerno5"):
            raise ModelError(f"solver method must be tsit5, dopri5, dopri8 or kvaerno5, got {self.method!r}.")
        if self.layout not in ("rows", "system"):
            raise ModelError(f"solver layout must be 'rows' or 'system', got {self.layout!r}.")
        if not (0 < self.rtol < 1 and self.atol > 0 and self.max_steps >= 1):
            raise ModelError(f"need 0 < rtol < 1, atol > 0, max_steps >= 1; got {self.rtol}, {self.atol}, {self.max_steps}.")
        if self.dt0 is not None and not (self.dt0 > 0 and (self.dtmax is None or self.dt0 <= self.dtmax)):
            raise ModelError(f"need 0 < dt0 <= dtmax, got dt0={self.dt0}, dtmax={self.dtmax}.")

    def rows_per_block(self, platform: str) -> int | None:
        """:attr:`block_rows` on a device of ``platform`` (``"cpu"``, ``"gpu"``, ...); None: one block."""
        return block_size(self.block_rows, platform)

    def make(self):
        if self.method == "kvaerno5":
            return diffrax.Kvaerno5(root_finder=optx.Newton(rtol=max(self.rtol, 1e-8), atol=max(self.atol, 1e-10)))
        return {"tsit5": diffrax.Tsit5, "dopri5": diffrax.Dopri5, "dopri8": diffrax.Dopri8}[self.method]()


def describe_prior(prior) -> str:
    """A short readable form of a numpyro distribution, e.g. ``TruncatedNormal(loc=1, scale=0.5, low=0)``."""
    if isinstance(prior, numbers.Real):
        return f"fixed at {float(prior):g}"
    base = getattr(prior, "base_dist", None)
    if base is not None and (hasattr(prior, "low") or hasattr(prior, "high")):
        bounds = []
        for b in ("low", "high"):
            if hasattr(prior, b):
                bounds.append(f"{b}={float(getattr(prior, b)):g}")
        return f"{describe_prior(base)} truncated ({', '.join(bounds)})"
    args = []
    for k in getattr(prior, "arg_constraints", {}):
        v = getattr(prior, k, None)
        if v is not None and np.ndim(v) == 0:
            args.append(f"{k}={float(v):g}")
    return f"{type(prior).__name__}({', '.join(args)})"


def _value(spec, p):
    return p[spec] if isinstance(spec, str) else spec


# ----------------------------------------------------------------------------------------------
# Named views handed to user functions: unknown names give a ModelError, not a KeyError


class _Named(Mapping):
    __slots__ = ("_names", "_values", "_what", "_model")

    def __init__(self, names, values, what, model):
        self._names, self._values, self._what, self._model = names, values, what, model

    def __getitem__(self, key):
        try:
            return self._values[self._names.index(key)]
        except ValueError:
            if self._what == "parameter":
                fix = f"declare Parameter({key!r}, unit, prior) (a numpyro distribution, or a number to fix it)"
            else:
                fix = "add State({key!r}, ...) or correct the name"
            raise ModelError(f"model {self._model!r}: a function reads {self._what} {key!r}, which the model does not "
                             f"declare (declared: {', '.join(self._names)}). Fix: {fix}.") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


# ----------------------------------------------------------------------------------------------
# The model


_ROW_DEVICES: list | None = None


def row_devices() -> list:
    """The devices that batched solves split their rows over: all local devices by default.

    Set with :func:`set_row_devices` (for example one device to turn splitting off).
    """
    return list(jax.local_devices()) if _ROW_DEVICES is None else list(_ROW_DEVICES)


def set_row_devices(devices) -> None:
    """Split the rows of batched solves over ``devices`` (None: all local devices)."""
    global _ROW_DEVICES
    _ROW_DEVICES = None if devices is None else list(devices)


@contextlib.contextmanager
def using_row_devices(devices):
    """:func:`set_row_devices` for the duration of a ``with`` block (solves traced inside it)."""
    global _ROW_DEVICES
    previous = _ROW_DEVICES
    set_row_devices(devices)
    try:
        yield
    finally:
        _ROW_DEVICES = previous


class ODEModel:
    """A user-defined kinetic model (see the module docstring for the pieces and an example).

    Parameters
    ----------
    name : model name (outputs, messages).
    states, parameters, observables : the declarations.
    vector_field : ``f(t, y, p)``; returns a mapping keyed by state names or a sequence of
        ``len(states)`` scalars.
    initial : None (each state's ``initial``), a :class:`PreEquilibrated`, or a callable
        ``p -> mapping of state values``.
    time_unit : unit of ``t`` in the vector field (one of :data:`TIME_UNITS` for automatic
        conversion of data in another unit).
    jump_times : times of discontinuities in the vector field (e.g. a dose switched on), passed
        to the step-size controller.
    solver : default :class:`ODESolver`.
    description : free text.

    Raises
    ------
    ModelError
        Duplicate names, a parameter without a prior, a noise scale or an initial value that
        names no parameter, an observable of an unknown state, a prior that is not a numpyro
        distribution.
    """

    def __init__(self, *, name: str, states: Sequence[State], parameters: Sequence[Parameter], vector_field: Callable,
                 observables: Sequence[Observable], initial=None, time_unit: str = "", jump_times: Sequence[float] = (),
                 solver: ODESolver | None = None, description: str = ""):
        self.name = name
        self.states = tuple(states)
        self.parameters = tuple(parameters)
        self.vector_field = vector_field
        self.observables = tuple(observables)
        self.initial = initial
        self.time_unit = time_unit
        self.jump_times = tuple(float(t) for t in jump_times)
        self.solver = solver if solver is not None else ODESolver()
        self.description = description
        self._validate_declarations()

    def __repr__(self) -> str:
        return (f"ODEModel({self.name!r}: states {list(self.state_names)}, {len(self.sampled_names)} estimated and "
                f"{len(self.fixed)} fixed parameters, observables {[o.name for o in self.observables]})")

    # -- declarations -------------------------------------------------------------------------

    def _err(self, msg: str) -> ModelError:
        return ModelError(f"model {self.name!r}: {msg}")

    def _validate_declarations(self) -> None:
        if not callable(self.vector_field):
            raise self._err("vector_field is not callable. Fix: pass a function f(t, y, p).")
        for what, items, cls in (("state", self.states, State), ("parameter", self.parameters, Parameter),
                                 ("observable", self.observables, Observable)):
            if not items:
                raise self._err(f"no {what}s declared. Fix: give at least one {cls.__name__}(...).")
            for item in items:
                if not isinstance(item, cls):
                    raise self._err(f"{item!r} in the {what}s is not a {cls.__name__}. Fix: declare it with {cls.__name__}(...).")
                if not (isinstance(item.name, str) and item.name.isidentifier()):
                    raise self._err(f"{what} name {item.name!r} is not an identifier. Fix: use letters, digits and '_'.")
            names = [i.name for i in items]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise self._err(f"{what} names {dup} are declared more than once. Fix: give each a unique name.")
        clash = set(self.state_names) & set(self.param_names)
        if clash:
            raise self._err(f"{sorted(clash)} are both states and parameters. Fix: rename one of each pair.")
        for prm in self.parameters:
            if prm.prior is None:
                raise self._err(f"parameter {prm.name!r} has no prior. Fix: give prior=<numpyro distribution> "
                                "(e.g. dist.LogNormal(0, 1), dist.HalfNormal(1)) or a number to fix it.")
            if not prm.is_fixed and not isinstance(prm.prior, dist.Distribution):
                raise self._err(f"parameter {prm.name!r}: prior {prm.prior!r} is neither a numpyro distribution nor a "
                                "number. Fix: use numpyro.distributions (e.g. dist.TruncatedNormal(1, 0.5, low=0)).")
            if not prm.is_fixed and (prm.prior.event_shape != () or prm.prior.batch_shape != ()):
                raise self._err(f"parameter {prm.name!r}: the prior must be scalar (batch and event shape ()), got "
                                f"batch {prm.prior.batch_shape}, event {prm.prior.event_shape}. Fix: one Parameter per scalar.")
        for obs in self.observables:
            if not isinstance(obs.noise, NOISE_MODELS):
                raise self._err(f"observable {obs.name!r}: noise {obs.noise!r} is not one of Normal, LogNormal, StudentT. "
                                "Fix: e.g. noise=LogNormal('sigma').")
            for field in dataclasses.fields(obs.noise):
                ref = getattr(obs.noise, field.name)
                self._check_ref(ref, f"observable {obs.name!r}: noise {field.name}")
                if not isinstance(ref, str) and not (isinstance(ref, numbers.Real) and ref > 0):
                    raise self._err(f"observable {obs.name!r}: noise {field.name} {ref!r} must be a positive number or a parameter name.")
            if isinstance(obs.fn, str) and obs.fn not in self.state_names:
                raise self._err(f"observable {obs.name!r} observes state {obs.fn!r}, which is not declared "
                                f"(states: {', '.join(self.state_names)}). Fix: correct the name or pass a function.")
            if not isinstance(obs.fn, str) and not callable(obs.fn):
                raise self._err(f"observable {obs.name!r}: fn must be a state name or a function g(t, y, p).")
        init = self.initial
        if init is None:
            for s in self.states:
                if s.initial is None:
                    raise self._err(f"state {s.name!r} has no initial value. Fix: State({s.name!r}, unit, initial=<number or "
                                    "parameter name>), or initial=PreEquilibrated(...) for the model.")
        elif not (isinstance(init, PreEquilibrated) or callable(init)):
            raise self._err("initial must be None, PreEquilibrated(...) or a function p -> {state: value}.")
        for s in self.states:
            if s.initial is not None:
                self._check_ref(s.initial, f"state {s.name!r}: initial")
        if isinstance(init, PreEquilibrated):
            for k in init.baseline:
                if k not in self.param_names:
                    raise self._err(f"PreEquilibrated baseline sets {k!r}, which is not a parameter. Fix: correct the name.")

    def _check_ref(self, ref, where: str) -> None:
        if isinstance(ref, str) and ref not in self.param_names:
            raise self._err(f"{where} refers to parameter {ref!r}, which is not declared. Fix: add Parameter({ref!r}, unit, prior).")

    @property
    def state_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.states)

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.parameters)

    @property
    def sampled_names(self) -> tuple[str, ...]:
        """Parameters with a prior distribution (estimated), in declaration order."""
        return tuple(p.name for p in self.parameters if not p.is_fixed)

    @property
    def fixed(self) -> dict[str, float]:
        """Parameters fixed to a number."""
        return {p.name: float(p.prior) for p in self.parameters if p.is_fixed}

    @property
    def priors(self) -> dict[str, dist.Distribution]:
        return {p.name: p.prior for p in self.parameters if not p.is_fixed}

    def units(self) -> dict[str, str]:
        """Units of states, parameters and observables by name."""
        out = {s.name: s.unit for s in self.states}
        out.update({p.name: p.unit for p in self.parameters})
        out.update({o.name: o.unit for o in self.observables})
        return out

    def with_fixed(self, values: Mapping[str, float]) -> "ODEModel":
        """A copy with some parameters fixed to numbers (config overrides)."""
        for k in values:
            if k not in self.param_names:
                raise self._err(f"cannot fix {k!r}: not a parameter (parameters: {', '.join(self.param_names)}).")
        params = [dataclasses.replace(p, prior=float(values[p.name])) if p.name in values else p for p in self.parameters]
        return ODEModel(name=self.name, states=self.states, parameters=params, vector_field=self.vector_field,
                        observables=self.observables, initial=self.initial, time_unit=self.time_unit,
                        jump_times=self.jump_times, solver=self.solver, description=self.description)

    # -- numerics -----------------------------------------------------------------------------

    def params_view(self, values: Mapping[str, Any]) -> Mapping:
        """A read-only mapping of all parameters with clear errors for undeclared names."""
        return _Named(self.param_names, [values[n] for n in self.param_names], "parameter", self.name)

    def _state_view(self, y) -> Mapping:
        return _Named(self.state_names, [y[i] for i in range(len(self.states))], "state", self.name)

    def rhs(self, t, y, p: Mapping):
        """The vector field on a flat state array ``y`` (shape ``(n_states,)``)."""
        out = self.vector_field(t, self._state_view(y), p)
        if isinstance(out, Mapping):
            return jnp.stack([jnp.asarray(out[n], dtype=y.dtype) for n in self.state_names])
        return jnp.stack([jnp.asarray(v, dtype=y.dtype) for v in out])

    def initial_guess(self, p: Mapping, dtype=None):
        """The state at ``t0`` from the declarations (for PreEquilibrated: the Newton guess)."""
        fn = self.initial.guess if isinstance(self.initial, PreEquilibrated) else self.initial
        if callable(fn):
            out = fn(p)
            return jnp.stack([jnp.asarray(out[n], dtype=dtype) for n in self.state_names])
        vals = [1.0 if s.initial is None else _value(s.initial, p) for s in self.states]
        return jnp.stack([jnp.asarray(v, dtype=dtype) for v in vals])

    def initial_state(self, t0, p: Mapping, dtype=None):
        """``(y0, ok)``: the state at ``t0``, pre-equilibrated when the model says so."""
        values = {n: jnp.asarray(p[n], dtype=dtype)[None] for n in self.param_names}
        y0, ok = self.initial_states(jnp.asarray(t0, dtype=dtype)[None], values, dtype)
        return y0[0], ok[0]

    def initial_states(self, t0, values: Mapping, dtype=None):
        """Batched :meth:`initial_state`: ``values`` maps every parameter to shape ``(n_rows,)``.

        Returns ``(y0, ok)`` of shapes ``(n_rows, n_states)`` and ``(n_rows,)``. Pre-equilibration
        solves all rows in one batched :func:`models.steady_state` call, so its integration
        fallback runs only when some row's Newton solve failed (a ``vmap`` over single rows
        would turn that branch into a select and always integrate).
        """
        guess = jax.vmap(lambda v: self.initial_guess(self.params_view(v), dtype))(dict(values))
        if not isinstance(self.initial, PreEquilibrated):
            return guess, jnp.all(jnp.isfinite(guess), axis=-1)
        rows = guess.shape[0]
        base = {n: jnp.asarray(values[n], dtype=guess.dtype) for n in self.param_names}
        base.update({k: jnp.full((rows,), v, dtype=guess.dtype) for k, v in self.initial.baseline.items()})
        t_eq = jnp.broadcast_to(jnp.asarray(t0 if self.initial.time is None else self.initial.time, dtype=guess.dtype), (rows,))

        def f(t, y, args):
            vals, te = args
            return self.rhs(te, y, self.params_view(vals))

        ss = steady_state(f, guess, (base, t_eq), self.initial.config)
        return ss.y, ss.success

    def solve(self, p: Mapping, t0, ts, solver: ODESolver | None = None):
        """Integrate from ``t0`` and save at ``ts`` (model time unit; ``ts[0] >= t0``).

        Returns ``(ys, ok)`` with ``ys`` of shape ``(len(ts), n_states)``. A failed solve (step
        bound, non-finite state, failed pre-equilibration) gives ``ok=False`` and finite
        placeholders; it never raises.
        """
        ts = jnp.asarray(ts)
        values = {n: jnp.asarray(p[n], dtype=ts.dtype)[None] for n in self.param_names}
        ys, ok = self.solve_batch(values, jnp.asarray(t0, dtype=ts.dtype)[None], ts[None], solver)
        return ys[0], ok[0]

    def solve_batch(self, values: Mapping, t0, ts, solver: ODESolver | None = None):
        """Solve many rows (cells, samples, data sets) at once, ``vmap``-ed.

        Parameters
        ----------
        values : every parameter name -> array of shape ``(n_rows,)`` (or a scalar, broadcast).
        t0 : start of each solve, shape ``(n_rows,)``.
        ts : saving times of each row, shape ``(n_rows, n_time)``, non-decreasing along a row
            (pad a shorter row by repeating its last time).

        Returns ``(ys, ok)`` of shapes ``(n_rows, n_time, n_states)`` and ``(n_rows,)``. Rows fail
        independently (step bound, non-finite state, failed pre-equilibration): a failed row has
        ``ok=False`` and finite placeholders and does not change the other rows. Under ``vmap``
        the adaptive step loop runs until the slowest row is done. With several devices
        (:func:`row_devices`), the rows are split into one share per device, each solved by its
        device alone (``jax.shard_map``; :mod:`models._compat`).
        With ``solver.layout == "system"`` the rows are one system with shared steps, or blocks
        of ``block_rows`` (:class:`ODESolver`; a failed step fails its system or block). In
        blocks, each device cuts its own share of the rows into blocks (``shard_map``; so the
        blocks, and the results to within the tolerance, depend on the number of devices unless
        the shares are whole blocks). As one system (``block_rows`` None, the default on GPUs),
        the rows are laid out one share per device (``NamedSharding``): each device steps its
        share, and the step's error norm is reduced across devices at every step.
        """
        solver = solver or self.solver
        ts = jnp.asarray(ts)
        rows = ts.shape[0]
        values = {n: jnp.broadcast_to(jnp.asarray(values[n], dtype=ts.dtype), (rows,)) for n in self.param_names}
        t0 = jnp.broadcast_to(jnp.asarray(t0, dtype=ts.dtype), (rows,))
        solve = self._solve_blocks if solver.layout == "system" else self._solve_rows
        devices = row_devices()
        if len(devices) < 2:
            return solve(values, t0, ts, solver)
        # rows padded (copies of row 0) to a multiple of the device count, one share per device
        pad = (-rows) % len(devices)
        padded = _pad_rows((values, t0, ts), pad)
        mesh = jax.sharding.Mesh(np.asarray(devices), ("rows",))
        size = solver.rows_per_block(devices[0].platform)
        in_blocks = solver.layout == "system" and size is not None
        if (solver.layout == "rows" or in_blocks) and enable_shard_map_solves():
            # rows that step on their own (per row, or per block within each device's share):
            # each device solves its share alone; no traffic between devices inside the loops
            spec = jax.sharding.PartitionSpec("rows")
            ys, ok = jax.shard_map(lambda v, a, b: solve(v, a, b, solver), mesh=mesh, in_specs=(spec, spec, spec),
                                   out_specs=(spec, spec), check_vma=False)(*padded)
            return ys[:rows], ok[:rows]
        # one system over all devices (or equinox unpatched): XLA's SPMD partitioner runs each
        # device's share of the rows there (the step loop's error norm and "any row still
        # running" test are the cross-device traffic, at every step)
        spread = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("rows"))
        padded = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, spread), padded)
        if in_blocks and (rows + pad) // len(devices) > size:
            # blocks within each device's share of the rows: one row of devices, vmapped
            shares = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x.reshape((len(devices), -1) + x.shape[1:]), spread),
                                  padded)
            ys, ok = jax.vmap(lambda v, a, b: self._solve_blocks(v, a, b, solver))(*shares)
            return ys.reshape((-1,) + ys.shape[2:])[:rows], ok.reshape(-1)[:rows]
        ys, ok = solve(*padded, solver)
        return ys[:rows], ok[:rows]

    def _solve_rows(self, values, t0, ts, solver):
        y0, ok0 = self.initial_states(t0, values, ts.dtype)
        controller = diffrax.PIDController(rtol=solver.rtol, atol=solver.atol, dtmax=solver.dtmax)
        if self.jump_times:
            controller = diffrax.ClipStepSizeController(controller, jump_ts=jnp.asarray(self.jump_times, dtype=ts.dtype))
        term = diffrax.ODETerm(lambda t, y, args: self.rhs(t, y, self.params_view(args)))

        def one(v, start, saveat_ts, y_start):
            sol = diffrax.diffeqsolve(
                term, solver.make(), t0=start, t1=saveat_ts[-1], dt0=solver.dt0, y0=y_start, args=v,
                saveat=diffrax.SaveAt(ts=saveat_ts), stepsize_controller=controller, max_steps=solver.max_steps,
                throw=False,
            )
            return sol.ys, diffrax.is_successful(sol.result)

        ys, ok = jax.vmap(one)(values, t0, ts, y0)
        ok = ok0 & ok & jnp.all(jnp.isfinite(ys), axis=(1, 2))
        return jnp.where(ok[:, None, None], ys, 1.0), ok

    def _solve_blocks(self, values, t0, ts, solver):
        """The system layout, in blocks of at most ``solver.block_rows`` rows solved one after
        another (the last block padded with copies of row 0).
        """
        rows, size = ts.shape[0], solver.rows_per_block(row_devices()[0].platform)
        if size is None or rows <= size:
            return self._solve_system(values, t0, ts, solver)
        blocks = -(-rows // size)
        pad = blocks * size - rows
        stacked = jax.tree.map(lambda x: x.reshape((blocks, size) + x.shape[1:]), _pad_rows((values, t0, ts), pad))
        ys, ok = jax.lax.map(lambda block: self._solve_system(*block, solver), stacked)
        return ys.reshape((blocks * size,) + ys.shape[2:])[:rows], ok.reshape(-1)[:rows]

    def _solve_system(self, values, t0, ts, solver):
        """All rows as one system with shared steps (``layout="system"``, see :class:`ODESolver`)."""
        y0, ok0 = self.initial_states(t0, values, ts.dtype)

        def largest_row_rms(err):
            return jnp.max(jnp.sqrt(jnp.mean(jnp.square(err), axis=-1)))

        controller = diffrax.PIDController(rtol=solver.rtol, atol=solver.atol, dtmax=solver.dtmax, norm=largest_row_rms)
        if self.jump_times:
            controller = diffrax.ClipStepSizeController(controller, jump_ts=jnp.asarray(self.jump_times, dtype=ts.dtype))
        rhs_rows = jax.vmap(lambda t, y, v: self.rhs(t, y, self.params_view(v)), in_axes=(None, 0, 0))
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(rhs_rows), solver.make(), t0=t0[0], t1=ts[0, -1], dt0=solver.dt0, y0=y0, args=values,
            saveat=diffrax.SaveAt(ts=ts[0]), stepsize_controller=controller, max_steps=solver.max_steps, throw=False,
        )
        ys = jnp.swapaxes(sol.ys, 0, 1)
        shared = jnp.all(t0 == t0[0]) & jnp.all(ts == ts[0])
        ok = ok0 & diffrax.is_successful(sol.result) & shared & jnp.all(jnp.isfinite(ys), axis=(1, 2))
        return jnp.where(ok[:, None, None], ys, 1.0), ok

    def observe_batch(self, ts, ys, values: Mapping) -> dict:
        """:meth:`observe` for rows: ``ts`` ``(n_rows, n_time)``, ``ys`` ``(n_rows, n_time, n_states)``,
        ``values`` parameter -> ``(n_rows,)``; returns ``{name: (n_rows, n_time)}``.
        """
        values = {n: jnp.broadcast_to(jnp.asarray(values[n], dtype=ts.dtype), ts.shape[:1]) for n in self.param_names}
        return jax.vmap(lambda t, y, v: self.observe(t, y, self.params_view(v)))(ts, ys, values)

    def observe(self, ts, ys, p: Mapping) -> dict:
        """Each observable at every saved time: ``{name: (len(ts),)}``."""
        out = {}
        for obs in self.observables:
            if isinstance(obs.fn, str):
                out[obs.name] = ys[:, self.state_names.index(obs.fn)]
            else:
                out[obs.name] = jax.vmap(lambda t, y, fn=obs.fn: jnp.asarray(fn(t, self._state_view(y), p)))(ts, ys)
        return out

    # -- checks -------------------------------------------------------------------------------

    def reference_values(self, num_draws: int = 401, seed: int = 0) -> dict[str, float]:
        """Prior medians (Monte Carlo, fixed seed) of the estimated parameters, plus fixed values."""
        key = jax.random.key(seed)
        out = dict(self.fixed)
        for i, (name, prior) in enumerate(self.priors.items()):
            draws = np.asarray(prior.sample(jax.random.fold_in(key, i), (num_draws,)))
            out[name] = float(np.median(draws))
        return out

    def check(self, t0: float, ts, values: Mapping[str, float] | None = None) -> dict:
        """Run every user function once and raise :class:`ModelError` naming any mistake.

        Uses ``values`` (default: :meth:`reference_values`, the prior medians). Checks, in order:
        the initial state, the vector field's output (one scalar derivative per state, finite),
        each observable at ``t0``, the solve over ``ts``, and each observable along it.
        Returns the simulated observables at ``values`` (a dict of arrays) when all is well.
        """
        at = "with the parameters at their prior medians" if values is None else "with the given parameters"
        values = dict(self.reference_values() if values is None else values)
        shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
        p = self.params_view({k: jnp.asarray(v, dtype=float) for k, v in values.items()})

        def call(what, fn, *args):
            try:
                return fn(*args)
            except ModelError:
                raise
            except Exception as e:  # a bug in user code: name the function and keep the message
                raise self._err(f"{what} raised {type(e).__name__}: {e}. Fix: correct {what}.") from e

        ts = jnp.asarray(ts, dtype=float)
        y0 = call("the initial values", self.initial_guess, p, ts.dtype)
        if y0.shape != (len(self.states),):
            raise self._err(f"the initial values have shape {y0.shape}; expected ({len(self.states)},). Fix: one scalar per state.")
        out = call("vector_field", self.vector_field, jnp.asarray(t0, dtype=ts.dtype), self._state_view(y0), p)
        n = len(self.states)
        if isinstance(out, Mapping):
            keys = list(out.keys())
            if set(keys) != set(self.state_names):
                missing = [s for s in self.state_names if s not in keys]
                extra = [k for k in keys if k not in self.state_names]
                raise self._err(f"vector_field returned derivatives for {keys}, but the states are {list(self.state_names)} "
                                f"(missing {missing}, unknown {extra}). Fix: return one derivative per declared state.")
            values_out = [out[s] for s in self.state_names]
        else:
            try:
                values_out = list(out)
            except TypeError:
                raise self._err(f"vector_field returned {type(out).__name__}; expected a mapping state -> derivative or a "
                                f"sequence of {n} derivatives.") from None
            if len(values_out) != n:
                raise self._err(f"vector_field returned {len(values_out)} derivatives, but the model has {n} states "
                                f"({', '.join(self.state_names)}). Fix: return one derivative per state, in this order.")
        for s, v in zip(self.state_names, values_out):
            if jnp.shape(v) != ():
                raise self._err(f"vector_field: the derivative of {s!r} has shape {jnp.shape(v)}, expected a scalar.")
        dy = jnp.stack([jnp.asarray(v, dtype=ts.dtype) for v in values_out])
        if not bool(jnp.all(jnp.isfinite(dy))):
            bad = [s for s, v in zip(self.state_names, np.asarray(dy)) if not np.isfinite(v)]
            raise self._err(f"vector_field gives non-finite derivatives for {bad} at t0={t0:g} {at} ({shown}). "
                            "Fix: check divisions and logarithms in the vector field, or the initial values.")
        y_start, ok0 = call("the pre-equilibration", self.initial_state, jnp.asarray(t0, dtype=ts.dtype), p, ts.dtype)
        if not bool(ok0):
            raise self._err(f"the initial state is not finite or the pre-equilibration found no steady state {at} ({shown}). "
                            "Fix: check the initial values, the PreEquilibrated baseline, or the steady-state settings.")
        first = call("an observable", self.observe, jnp.asarray([t0], dtype=ts.dtype), y_start[None], p)
        for name, v in first.items():
            if jnp.shape(v) != (1,):
                raise self._err(f"observable {name!r} returned shape {jnp.shape(v)[1:]}, expected a scalar.")
            if not bool(jnp.all(jnp.isfinite(v))):
                raise self._err(f"observable {name!r} returned {float(v[0])} at t0={t0:g} {at} ({shown}). "
                                "Fix: check its formula (division by zero, log of a non-positive number).")
        ys, ok = self.solve(p, jnp.asarray(t0, dtype=ts.dtype), ts)
        if not bool(ok):
            raise self._err(f"the ODE solve from t0={t0:g} to {float(ts[-1]):g} failed {at} ({shown}). Fix: check the vector "
                            "field and priors; for a stiff model use solver method 'kvaerno5' or raise max_steps.")
        pred = call("an observable", self.observe, ts, ys, p)
        for obs in self.observables:
            v = np.asarray(pred[obs.name])
            bad = ~np.isfinite(v)
            if bad.any():
                raise self._err(f"observable {obs.name!r} returned {v[bad][0]} at t={float(ts[np.argmax(bad)]):g} {at} ({shown}). "
                                "Fix: check its formula (division by zero, log of a non-positive number).")
        return {k: np.asarray(v) for k, v in pred.items()}


__all__ = ["ODEModel", "State", "Parameter", "Observable", "Normal", "LogNormal", "StudentT", "PreEquilibrated",
           "ODESolver", "ModelError", "TIME_UNITS", "time_conversion"]

"""Protocol inputs of an imaging experiment, as piecewise-constant functions of time."""

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from ._types import RealScalar, RealScalarLike


SEGMENT_KINDS = ("baseline", "stimulus", "zinc", "fmax", "fmin")


class ProtocolInputs(eqx.Module):
    r"""The experimental protocol, as the model sees it (time in minutes).

    The recording is split into segments at ``start_min``; inside segment $k$ the inputs are

    - free extracellular zinc $Z_o(t) = z_k (1 - T_k)$ in uM, where $z_k$ is the total zinc of
      the medium and $T_k \in \{0, 1\}$ says whether TPEN is present (TPEN in excess chelates
      the extracellular zinc);
    - ionophore (pyrithione) presence $I_k \in \{0, 1\}$, on from the Fmax calibration onwards;
    - TPEN presence $T_k$, on from the Fmin calibration onwards;
    - stimulus drive $s(t) = \exp(-(t - t_s)/\tau_s)$ for $t \ge t_s$ and 0 before, where
      $t_s$ is the start of the first ``stimulus`` segment ($s \equiv 0$ without one).

    The segment starts after the first are discontinuities of the vector field; they are passed
    to the solver as ``jump_ts`` so that no step straddles one.

    Attributes
    ----------
    start_min : tuple of float
        Start time of each segment (minutes), strictly increasing, first one the recording start.
    kind : tuple of str
        Segment kind, one of ``baseline``, ``stimulus``, ``zinc``, ``fmax``, ``fmin``.
    zn_ext_uM : tuple of float
        Total extracellular zinc in each segment (uM).
    end_min : float
        End of the recording (minutes).
    """

    start_min: tuple[float, ...] = eqx.field(static=True)
    kind: tuple[str, ...] = eqx.field(static=True)
    zn_ext_uM: tuple[float, ...] = eqx.field(static=True)
    end_min: float = eqx.field(static=True)

    def __check_init__(self):
        n = len(self.start_min)
        if n == 0:
            raise ValueError("A protocol needs at least one segment.")
        if len(self.kind) != n or len(self.zn_ext_uM) != n:
            raise ValueError(
                f"start_min, kind and zn_ext_uM must have the same length, got {n}, "
                f"{len(self.kind)} and {len(self.zn_ext_uM)}."
            )
        if any(b <= a for a, b in zip(self.start_min, self.start_min[1:])):
            raise ValueError(f"Segment starts must strictly increase, got {self.start_min}.")
        if self.end_min <= self.start_min[-1]:
            raise ValueError(
                f"end_min={self.end_min} must be after the last segment start {self.start_min[-1]}."
            )
        for k in self.kind:
            if k not in SEGMENT_KINDS:
                raise ValueError(f"Unknown segment kind {k!r}; expected one of {SEGMENT_KINDS}.")
        if self.kind[0] != "baseline":
            raise ValueError(
                f"The first segment must be 'baseline' (the resting steady state), got {self.kind[0]!r}."
            )
        if self.zn_ext_uM[0] <= 0:
            raise ValueError(
                "The baseline extracellular zinc must be > 0 uM: the resting steady state balances "
                f"ZIP influx against ZnT efflux, got zn_ext_uM={self.zn_ext_uM[0]}."
            )
        if any(z < 0 for z in self.zn_ext_uM):
            raise ValueError(f"zn_ext_uM must be >= 0 in every segment, got {self.zn_ext_uM}.")

    # -- derived, static ----------------------------------------------------------------------
    @property
    def t0(self) -> float:
        return self.start_min[0]

    @property
    def jump_times(self) -> tuple[float, ...]:
        """Segment starts after the first: the discontinuities of the inputs."""
        return self.start_min[1:]

    def _flags(self, name: str) -> np.ndarray:
        on = False
        out = []
        for k in self.kind:
            if name == "ionophore" and k == "fmax":
                on = True
            if name == "tpen" and k == "fmin":
                on = True
            out.append(1.0 if on else 0.0)
        return np.asarray(out)

    @property
    def stimulus_start_min(self) -> float | None:
        for s, k in zip(self.start_min, self.kind):
            if k == "stimulus":
                return s
        return None

    def segment_index(self, t: RealScalarLike) -> RealScalar:
        starts = jnp.asarray(self.start_min)
        return jnp.clip(jnp.searchsorted(starts, t, side="right") - 1, 0, len(self.start_min) - 1)

    def inputs(self, t: RealScalarLike, stim_decay_min: RealScalarLike):
        """Return ``(zo_free_uM, stimulus, ionophore, tpen)`` at time ``t`` (minutes)."""
        k = self.segment_index(t)
        tpen = jnp.asarray(self._flags("tpen"))[k]
        iono = jnp.asarray(self._flags("ionophore"))[k]
        zo = jnp.asarray(self.zn_ext_uM)[k] * (1.0 - tpen)
        ts = self.stimulus_start_min
        if ts is None:
            stim = jnp.zeros_like(jnp.asarray(t, dtype=float))
        else:
            dt = jnp.maximum(t - ts, 0.0)
            stim = jnp.where(t >= ts, jnp.exp(-dt / stim_decay_min), 0.0)
        return zo, stim, iono, tpen

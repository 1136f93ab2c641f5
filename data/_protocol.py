"""Protocol description files: segments, zinc concentrations, probe, time unit."""

import dataclasses
import math
import tomllib
from pathlib import Path

from ._errors import DataError


TIME_UNITS_TO_MIN = {"ms": 1.0 / 60000.0, "s": 1.0 / 60.0, "min": 1.0, "h": 60.0}
ZINC_UNITS_TO_UM = {"zn_ext_nM": 1e-3, "zn_ext_uM": 1.0, "zn_ext_mM": 1e3}
PROBE_KD_UNITS_TO_NM = {"probe_kd_pM": 1e-3, "probe_kd_nM": 1.0, "probe_kd_uM": 1e3}
SEGMENT_KINDS = ("baseline", "stimulus", "zinc", "fmax", "fmin")
KNOWN_PROBES = {"FluoZin-3": 15.0, "Zinpyr-1": 0.7, "Zinquin": 370.0}


@dataclasses.dataclass(frozen=True)
class Segment:
    """One protocol segment, times already in minutes and zinc in uM."""

    start_min: float
    kind: str
    zn_ext_uM: float
    label: str = ""


@dataclasses.dataclass(frozen=True)
class Protocol:
    """A validated imaging protocol (minutes, uM, nM).

    Attributes
    ----------
    segments : tuple of Segment, in time order; the first is ``baseline``.
    probe : probe name.
    probe_kd_nM : probe-zinc dissociation constant (nM).
    time_unit : the unit the source files use (times here are converted to minutes).
    frame_interval_min : time between frames for files without a time column, or None.
    path : the protocol file.
    """

    segments: tuple[Segment, ...]
    probe: str
    probe_kd_nM: float
    time_unit: str
    frame_interval_min: float | None
    path: str

    def bounds(self, kind: str, end_min: float) -> tuple[float, float]:
        """(start, end) in minutes of the first segment of ``kind``; end is the next start."""
        for i, s in enumerate(self.segments):
            if s.kind == kind:
                end = self.segments[i + 1].start_min if i + 1 < len(self.segments) else end_min
                return s.start_min, end
        raise KeyError(kind)

    def to_inputs(self, end_min: float):
        """The :class:`models.ProtocolInputs` the model integrates against."""
        from models import ProtocolInputs

        return ProtocolInputs(
            start_min=tuple(s.start_min for s in self.segments),
            kind=tuple(s.kind for s in self.segments),
            zn_ext_uM=tuple(s.zn_ext_uM for s in self.segments),
            end_min=float(end_min),
        )


def _unit_value(path, table: dict, units: dict, what: str, where: str, required: bool = True):
    given = [k for k in units if k in table]
    bare = what in table
    if bare:
        raise DataError(
            path, f"'{what}' has no unit.",
            f"write the unit into the key, one of {', '.join(units)} (for example {list(units)[1]} = ...).",
            where=where,
        )
    if len(given) > 1:
        raise DataError(
            path, f"{what} is given in more than one unit ({', '.join(given)}).",
            "keep exactly one of them.", where=where,
        )
    if not given:
        if required:
            raise DataError(path, f"{what} is missing.", f"add one of {', '.join(units)}.", where=where)
        return None
    key = given[0]
    value = table[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(path, f"{key} = {value!r} is not a finite number.", "give a number.", where=where)
    return float(value) * units[key]


def read_protocol(path) -> Protocol:
    """Read and validate a protocol TOML file.

    Format::

        time_unit = "s"              # ms, s, min or h: unit of every time here and in the traces
        probe = "FluoZin-3"
        probe_kd_nM = 15.0           # or probe_kd_pM / probe_kd_uM
        frame_interval = 15          # optional; for wide exports without a time column

        [[segment]]
        start = 0
        kind = "baseline"            # baseline, stimulus, zinc, fmax, fmin
        zn_ext_uM = 1.0              # or zn_ext_nM / zn_ext_mM
        label = "HBSS + 1 uM ZnCl2"  # optional

    Raises
    ------
    DataError
        On a missing or unknown time unit, a concentration without or with mixed units, segments
        out of order, a first segment that is not baseline, or a missing Fmax or Fmin calibration.
    """
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(path, "the protocol file does not exist.", "check the path in the config.") from None
    except tomllib.TOMLDecodeError as e:
        raise DataError(path, f"not valid TOML ({e}).", "correct the syntax at that line.") from None

    unit = raw.get("time_unit")
    if unit is None:
        raise DataError(
            path, "time_unit is missing.",
            f"add time_unit = one of {list(TIME_UNITS_TO_MIN)} (the unit of segment starts and trace times).",
        )
    if unit not in TIME_UNITS_TO_MIN:
        raise DataError(
            path, f"unknown time_unit {unit!r}.", f"use one of {list(TIME_UNITS_TO_MIN)}."
        )
    to_min = TIME_UNITS_TO_MIN[unit]

    probe = raw.get("probe")
    if not isinstance(probe, str) or not probe:
        raise DataError(path, "probe (the probe name) is missing.", f"add probe = \"...\", e.g. one of {list(KNOWN_PROBES)}.")
    kd = _unit_value(path, raw, PROBE_KD_UNITS_TO_NM, "probe_kd", "top level")
    if kd <= 0:
        raise DataError(path, f"probe Kd must be > 0, got {kd} nM.", "give the probe's Kd.")

    interval = raw.get("frame_interval")
    if interval is not None:
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not interval > 0:
            raise DataError(path, f"frame_interval = {interval!r} must be a positive number.", f"give it in {unit}.")
        interval = float(interval) * to_min

    rows = raw.get("segment")
    if not isinstance(rows, list) or not rows:
        raise DataError(path, "no [[segment]] tables.", "describe each protocol segment as a [[segment]] table.")
    segments = []
    for i, row in enumerate(rows, start=1):
        where = f"segment {i}"
        if not isinstance(row, dict):
            raise DataError(path, "segment is not a table.", "use [[segment]] tables.", where=where)
        start = row.get("start")
        if isinstance(start, bool) or not isinstance(start, (int, float)) or not math.isfinite(start):
            raise DataError(path, f"start = {start!r} is not a number.", f"give the start time in {unit}.", where=where)
        kind = row.get("kind")
        if kind not in SEGMENT_KINDS:
            raise DataError(path, f"unknown kind {kind!r}.", f"use one of {list(SEGMENT_KINDS)}.", where=where)
        zn = _unit_value(path, row, ZINC_UNITS_TO_UM, "zn_ext", where)
        if zn < 0:
            raise DataError(path, f"extracellular zinc {zn} uM is negative.", "give a concentration >= 0.", where=where)
        segments.append(Segment(float(start) * to_min, kind, zn, str(row.get("label", ""))))

    for i in range(1, len(segments)):
        if segments[i].start_min <= segments[i - 1].start_min:
            raise DataError(
                path, f"segment {i + 1} starts at or before segment {i}.",
                "list segments in time order with strictly increasing start.", where=f"segment {i + 1}",
            )
    if segments[0].kind != "baseline":
        raise DataError(path, f"the first segment is {segments[0].kind!r}.", "start the protocol with a baseline segment.", where="segment 1")
    if segments[0].zn_ext_uM <= 0:
        raise DataError(
            path, "baseline extracellular zinc is 0: the model's resting state balances ZIP influx against efflux.",
            "give the zinc concentration of the baseline medium (> 0).", where="segment 1",
        )
    kinds = [s.kind for s in segments]
    for cal, name in (("fmax", "Fmax (ionophore + saturating zinc)"), ("fmin", "Fmin (TPEN)")):
        if cal not in kinds:
            raise DataError(
                path, f"no {cal} calibration segment.",
                f"add the {name} segment: the fit needs both calibrations to place F_min and F_max.",
            )
        if kinds.count(cal) > 1:
            raise DataError(path, f"more than one {cal} segment.", f"keep one {cal} segment.")
    if kinds.index("fmin") < kinds.index("fmax"):
        raise DataError(path, "fmin comes before fmax.", "the model assumes the ionophore (Fmax) step precedes TPEN (Fmin).")
    for s in segments[kinds.index("fmax"):]:
        if s.kind not in ("fmax", "fmin"):
            raise DataError(path, f"a {s.kind!r} segment follows the calibrations.", "put calibrations at the end.")
    return Protocol(tuple(segments), probe, kd, unit, interval, str(path))

"""Readers and validation for per-cell imaging traces."""

import dataclasses
import re
from pathlib import Path

import numpy as np
import pandas as pd

from ._errors import DataError
from ._protocol import TIME_UNITS_TO_MIN, Protocol, read_protocol


MIN_CALIBRATION_FRAMES = 4


@dataclasses.dataclass(frozen=True, eq=False)
class ImagingTraces:
    """Validated fluorescence traces of many cells on one time grid.

    Attributes
    ----------
    time_min : (n_time,) frame times in minutes, strictly increasing.
    intensity : (n_cells, n_time) raw fluorescence; NaN where a frame is missing.
    mask : (n_cells, n_time) True where ``intensity`` is observed.
    cell_id : cell identifiers, unique, in file order.
    path : the source file.
    """

    time_min: np.ndarray
    intensity: np.ndarray
    mask: np.ndarray
    cell_id: tuple[str, ...]
    path: str

    def __post_init__(self):
        n, t = len(self.cell_id), self.time_min.shape[0]
        if self.intensity.shape != (n, t) or self.mask.shape != (n, t):
            raise ValueError(
                f"intensity {self.intensity.shape} / mask {self.mask.shape} do not match "
                f"({n} cells, {t} times)."
            )
        if len(set(self.cell_id)) != n:
            raise ValueError("cell_id must be unique.")


@dataclasses.dataclass(frozen=True, eq=False)
class ImagingDataset:
    """Traces plus their protocol, checked against each other."""

    traces: ImagingTraces
    protocol: Protocol

    @property
    def end_min(self) -> float:
        return float(self.traces.time_min[-1])

    def segment_bounds(self, kind: str) -> tuple[float, float]:
        return self.protocol.bounds(kind, self.end_min)


def _line(i: int) -> str:
    return f"line {i + 2}"  # header is line 1


def _numeric(path, series: pd.Series, column: str, cells: pd.Series | None):
    """Convert strings to floats; non-numeric -> DataError; empty/NaN -> NaN (or error)."""
    text = series.astype("string").str.strip()
    values = pd.to_numeric(text, errors="coerce")
    empty = text.isna() | text.str.lower().isin(["", "nan", "na", "null"])
    bad = values.isna() & ~empty
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        cell = f" (cell '{cells.iloc[i]}')" if cells is not None else ""
        raise DataError(
            path, f"value {series.iloc[i]!r} in column '{column}'{cell} is not a number.",
            "correct or delete that value (an empty cell is read as a missing frame).",
            where=_line(i),
        )
    inf = ~np.isfinite(values.to_numpy(dtype=float, na_value=np.nan)) & ~values.isna().to_numpy()
    if inf.any():
        i = int(np.flatnonzero(inf)[0])
        raise DataError(path, f"value {series.iloc[i]!r} in column '{column}' is infinite.", "correct it.", where=_line(i))
    return values.to_numpy(dtype=float, na_value=np.nan), empty.to_numpy()


def _read_table(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise DataError(path, "the traces file does not exist.", "check the path in the config.")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            return pd.read_parquet(path).astype("string")
        return pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, OSError, ValueError) as e:
        raise DataError(path, f"cannot be read as a table ({e}).", "export it as CSV with a header row, or as Parquet.") from None


def read_long(path, *, time_unit: str, cell_column="cell", time_column="time",
              intensity_column="intensity", mask_missing: bool = False) -> ImagingTraces:
    """Read a long table (one row per cell and frame) from CSV or Parquet.

    Parameters
    ----------
    path : CSV (``.csv``) or Parquet (``.parquet``) file.
    time_unit : unit of the time column: ``ms``, ``s``, ``min`` or ``h``.
    cell_column, time_column, intensity_column : column names.
    mask_missing : if True, empty or NaN intensities and frames a cell lacks are masked out of
        the likelihood; if False (default) they are an error.

    Raises
    ------
    DataError
        Missing columns, non-numeric values, missing intensities (unless masked), time not
        increasing within a cell, or a (cell, time) pair given twice.
    """
    path = Path(path)
    if time_unit not in TIME_UNITS_TO_MIN:
        raise DataError(path, f"unknown time unit {time_unit!r}.", f"use one of {list(TIME_UNITS_TO_MIN)} in the protocol's time_unit.")
    df = _read_table(path)
    for col in (cell_column, time_column, intensity_column):
        if col not in df.columns:
            raise DataError(
                path, f"column '{col}' is missing (columns are {list(df.columns)}).",
                "rename the column or set the column names in the config's [data] section.",
            )
    cells = df[cell_column].astype("string").str.strip()
    if cells.isna().any() or (cells == "").any():
        i = int(np.flatnonzero((cells.isna() | (cells == "")).to_numpy())[0])
        raise DataError(path, f"empty cell id in column '{cell_column}'.", "give every row a cell id.", where=_line(i))
    t, t_empty = _numeric(path, df[time_column], time_column, cells)
    if t_empty.any():
        i = int(np.flatnonzero(t_empty)[0])
        raise DataError(path, f"missing time in column '{time_column}' (cell '{cells.iloc[i]}').", "fill in the frame time.", where=_line(i))
    y, y_empty = _numeric(path, df[intensity_column], intensity_column, cells)

    order: dict[str, list[int]] = {}
    for i, c in enumerate(cells.tolist()):
        order.setdefault(c, []).append(i)
    for c, rows in order.items():
        tc = t[rows]
        seen_t: dict[float, int] = {}
        for r, tv in zip(rows, tc):
            if tv in seen_t:
                raise DataError(
                    path, f"cell id '{c}' appears twice at time {tv:g} ({_line(seen_t[tv])} and {_line(r)}).",
                    "cell ids must be unique per cell: rename one of the cells or remove the duplicated row.",
                    where=_line(r),
                )
            seen_t[tv] = r
        back = np.flatnonzero(np.diff(tc) < 0)
        if back.size:
            r = rows[back[0] + 1]
            raise DataError(
                path, f"time does not increase for cell '{c}' ({tc[back[0]]:g} then {tc[back[0] + 1]:g}).",
                "sort the rows of each cell by time, or fix the time value.", where=_line(r),
            )
    grid = np.unique(t)
    n_cells = len(order)
    intensity = np.full((n_cells, grid.size), np.nan)
    for k, rows in enumerate(order.values()):
        intensity[k, np.searchsorted(grid, t[rows])] = y[rows]
    mask = np.isfinite(intensity)
    if not mask_missing and not mask.all():
        k, j = map(int, np.argwhere(~mask)[0])
        cid = list(order)[k]
        rows = order[cid]
        row = [r for r in rows if t[r] == grid[j]]
        where = _line(row[0]) if row else f"cell '{cid}'"
        raise DataError(
            path, f"cell '{cid}' has no intensity at time {grid[j]:g} {time_unit}.",
            "set mask_missing = true in the config's [data] section to leave missing frames out of "
            "the fit, or remove the cell.", where=where,
        )
    return ImagingTraces(
        time_min=grid * TIME_UNITS_TO_MIN[time_unit], intensity=intensity, mask=mask,
        cell_id=tuple(order), path=str(path),
    )


_FIJI_MEAN = re.compile(r"^Mean(\d+)$")


def read_fiji_wide(path, *, time_unit: str, frame_interval_min: float | None = None,
                   time_column: str | None = None, mask_missing: bool = False) -> ImagingTraces:
    """Read the wide export of ImageJ/FIJI "Multi Measure": one ``MeanN`` column per ROI.

    Rows are frames. Times come from ``time_column`` (in ``time_unit``) if given, else from
    ``frame_interval_min`` (the first row is time 0). Other measurement columns (``Area1``,
    ``IntDen1`` ...) are ignored; cells are named ``ROI1``, ``ROI2``, ... after the column number.

    Raises
    ------
    DataError
        No ``MeanN`` columns, a ROI column given twice, non-numeric or missing values (unless
        masked), time not increasing, or no way to know the frame times.
    """
    path = Path(path)
    if path.exists():
        header = path.read_text().splitlines()[0].split(",") if path.suffix.lower() == ".csv" else None
    else:
        header = None
    df = _read_table(path)
    cols = [c.strip() for c in (header if header is not None else list(df.columns))]
    seen: dict[str, int] = {}
    for j, c in enumerate(cols):
        if _FIJI_MEAN.match(c):
            if c in seen:
                raise DataError(
                    path, f"column '{c}' appears twice (columns {seen[c] + 1} and {j + 1}): duplicated cell id.",
                    "each ROI must have its own MeanN column; re-export or rename one.",
                )
            seen[c] = j
    if not seen:
        raise DataError(
            path, f"no 'MeanN' columns found (columns are {cols[:8]}...).",
            "export with Multi Measure and 'Mean gray value' on, or use the long format.",
        )
    n_rows = len(df)
    if time_column is not None:
        if time_column not in df.columns:
            raise DataError(path, f"time column '{time_column}' is missing.", "fix time_column in the config.")
        t, empty = _numeric(path, df[time_column], time_column, None)
        if empty.any():
            i = int(np.flatnonzero(empty)[0])
            raise DataError(path, f"missing time in column '{time_column}'.", "fill in the frame time.", where=_line(i))
        t_min = t * TIME_UNITS_TO_MIN[time_unit]
    elif frame_interval_min is not None:
        t_min = np.arange(n_rows) * frame_interval_min
    else:
        raise DataError(
            path, "a wide export has no time column and no frame interval is known.",
            "set frame_interval in the protocol file or time_column in the config's [data] section.",
        )
    back = np.flatnonzero(np.diff(t_min) <= 0)
    if back.size:
        raise DataError(
            path, f"time does not increase ({t_min[back[0]]:g} then {t_min[back[0] + 1]:g} min).",
            "sort the rows by time and remove repeated frames.", where=_line(int(back[0]) + 1),
        )
    names, rows = [], []
    for c, j in seen.items():
        y, empty = _numeric(path, df.iloc[:, j], c, None)
        if empty.any() and not mask_missing:
            i = int(np.flatnonzero(empty)[0])
            raise DataError(
                path, f"ROI column '{c}' has no value at frame {i + 1}.",
                "set mask_missing = true in the config's [data] section, or remove the ROI.", where=_line(i),
            )
        names.append("ROI" + _FIJI_MEAN.match(c).group(1))
        rows.append(y)
    intensity = np.vstack(rows)
    return ImagingTraces(
        time_min=t_min, intensity=intensity, mask=np.isfinite(intensity), cell_id=tuple(names), path=str(path)
    )


def validate_against_protocol(traces: ImagingTraces, protocol: Protocol,
                              min_calibration_frames: int = MIN_CALIBRATION_FRAMES) -> None:
    """Check traces and protocol together.

    Raises
    ------
    DataError
        Protocol times outside the recording, a calibration segment with too few frames, a cell
        without observations in a calibration segment, or a cell whose Fmax level is not above its
        Fmin level.
    """
    t = traces.time_min
    t_first, t_last = float(t[0]), float(t[-1])
    unit = protocol.time_unit
    to_unit = 1.0 / TIME_UNITS_TO_MIN[unit]
    if protocol.segments[0].start_min > t_first + 1e-12:
        raise DataError(
            protocol.path, f"the first segment starts at {protocol.segments[0].start_min * to_unit:g} {unit}, "
            f"after the first frame ({t_first * to_unit:g} {unit}).",
            "start the baseline segment at or before the first frame.", where="segment 1",
        )
    for i, s in enumerate(protocol.segments, start=1):
        if s.start_min >= t_last:
            raise DataError(
                protocol.path, f"segment {i} ({s.kind}) starts at {s.start_min * to_unit:g} {unit}, outside the "
                f"recording in {traces.path} ({t_first * to_unit:g} to {t_last * to_unit:g} {unit}).",
                "check the segment start times and time_unit against the traces.", where=f"segment {i}",
            )
    for kind in ("fmax", "fmin"):
        a, b = protocol.bounds(kind, t_last + 1e-12)
        sel = (t >= a) & (t < b) if kind != "fmin" else (t >= a) & (t <= b)
        n = int(sel.sum())
        if n < min_calibration_frames:
            raise DataError(
                protocol.path, f"the {kind} calibration segment holds {n} frame(s) of {traces.path}, fewer than "
                f"{min_calibration_frames}.",
                "record the calibration for longer (it must reach its plateau), or check segment times.",
            )
        late = sel & (t >= 0.5 * (a + min(b, t_last)))
        for k, cid in enumerate(traces.cell_id):
            if not traces.mask[k, late].any():
                raise DataError(
                    traces.path, f"cell '{cid}' has no observed frame in the second half of the {kind} calibration "
                    "segment, so its probe cannot be calibrated.",
                    "remove the cell (exclude_cells in the config's [data] section) or supply its calibration frames.",
                    where=f"cell '{cid}'",
                )
    fmin_a, fmin_b = protocol.bounds("fmin", t_last + 1e-12)
    fmax_a, fmax_b = protocol.bounds("fmax", t_last + 1e-12)

    def late_median(a, b):
        sel = (t >= 0.5 * (a + min(b, t_last))) & (t <= b)
        return np.nanmedian(np.where(traces.mask[:, sel], traces.intensity[:, sel], np.nan), axis=1)

    lo, hi = late_median(fmin_a, fmin_b), late_median(fmax_a, fmax_b)
    for k, cid in enumerate(traces.cell_id):
        if not hi[k] > lo[k]:
            raise DataError(
                traces.path, f"cell '{cid}': its Fmax level ({hi[k]:.4g}) is not above its Fmin level ({lo[k]:.4g}).",
                "the probe did not respond to the calibrations in this cell (dead cell or unloaded probe); "
                "remove it (exclude_cells in the config's [data] section).", where=f"cell '{cid}'",
            )
    if (lo <= 0).any():
        k = int(np.flatnonzero(lo <= 0)[0])
        raise DataError(
            traces.path, f"cell '{traces.cell_id[k]}': its Fmin level ({lo[k]:.4g}) is not positive.",
            "give raw intensities without background over-subtraction (the model needs F > 0).",
            where=f"cell '{traces.cell_id[k]}'",
        )


def load_imaging(traces_path, protocol_path, *, format: str = "auto", mask_missing: bool = False,
                 exclude_cells=(), cell_column="cell", time_column="time", intensity_column="intensity",
                 min_calibration_frames: int = MIN_CALIBRATION_FRAMES) -> ImagingDataset:
    """Read traces (long CSV/Parquet or FIJI wide) and protocol, validate both, return a dataset.

    ``format`` is ``"long"``, ``"fiji"`` or ``"auto"`` (FIJI if the header has ``Mean1``-style
    columns and no ``intensity_column``). Times are converted to minutes here and nowhere else.

    Raises
    ------
    DataError
        See :func:`read_protocol`, :func:`read_long`, :func:`read_fiji_wide`,
        :func:`validate_against_protocol`.
    """
    protocol = read_protocol(protocol_path)
    traces_path = Path(traces_path)
    if format == "auto":
        cols = list(_read_table(traces_path).columns)
        format = "fiji" if any(_FIJI_MEAN.match(str(c).strip()) for c in cols) and intensity_column not in cols else "long"
    if format == "long":
        traces = read_long(traces_path, time_unit=protocol.time_unit, cell_column=cell_column,
                           time_column=time_column, intensity_column=intensity_column, mask_missing=mask_missing)
    elif format == "fiji":
        traces = read_fiji_wide(traces_path, time_unit=protocol.time_unit, frame_interval_min=protocol.frame_interval_min,
                                time_column=time_column if time_column != "time" else None, mask_missing=mask_missing)
    else:
        raise DataError(traces_path, f"unknown format {format!r}.", "use 'long', 'fiji' or 'auto'.")
    exclude = [str(c) for c in exclude_cells]
    unknown = [c for c in exclude if c not in traces.cell_id]
    if unknown:
        raise DataError(traces_path, f"exclude_cells names unknown cell(s) {unknown}.", f"known cells: {list(traces.cell_id)[:20]}.")
    if exclude:
        keep = [k for k, c in enumerate(traces.cell_id) if c not in exclude]
        if not keep:
            raise DataError(traces_path, "every cell is excluded.", "keep at least one cell.")
        traces = ImagingTraces(traces.time_min, traces.intensity[keep], traces.mask[keep],
                               tuple(traces.cell_id[k] for k in keep), traces.path)
    validate_against_protocol(traces, protocol, min_calibration_frames)
    return ImagingDataset(traces=traces, protocol=protocol)


def write_long_csv(path, time, intensity, cell_id, *, time_column="time", cell_column="cell",
                   intensity_column="intensity") -> None:
    """Write traces as a long CSV (atomically: temp file, then rename)."""
    path = Path(path)
    n_cells, n_time = intensity.shape
    df = pd.DataFrame({
        cell_column: np.repeat(np.asarray(cell_id, dtype=object), n_time),
        time_column: np.tile(np.asarray(time), n_cells),
        intensity_column: np.asarray(intensity).reshape(-1),
    })
    tmp = path.with_name(path.name + ".tmp")
    df.to_csv(tmp, index=False, float_format="%.6g")
    tmp.replace(path)

"""Time-series tables for user-defined models: one time column, one column per observable."""

import dataclasses
import math
from pathlib import Path

import numpy as np
import pandas as pd

from ._errors import DataError


@dataclasses.dataclass(frozen=True)
class TimeSeries:
    """A validated time-series table, of one unit (wide table) or several (long table).

    Attributes
    ----------
    path : the file read.
    times : sorted, unique sampling times of all units, in the table's time unit, ``(n_time,)``.
    values : ``{column: (n_units, n_time) float array}``; NaN where the unit was not measured.
    units : unit labels (cells, samples, animals) in order of first appearance, or None for a
        table without a unit column (then ``n_units`` is 1).
    lines : file line of each (unit, time) entry (1-based, the header is line 1; 0 where none).
    """

    path: Path
    times: np.ndarray
    values: dict
    lines: np.ndarray
    units: tuple[str, ...] | None = None

    @property
    def num_units(self) -> int:
        return 1 if self.units is None else len(self.units)

    def observed(self, column: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(unit index, time index, value)`` of the non-empty cells of ``column``, unit-major."""
        v = self.values[column]
        unit, time = np.nonzero(~np.isnan(v))
        return unit, time, v[unit, time]


def read_timeseries(path, *, time_column: str, columns, positive=(), ignore_columns=(),
                    unit_column: str | None = None) -> TimeSeries:
    """Read a CSV (or Parquet) table of measurements over time.

    Parameters
    ----------
    path : ``.csv`` or ``.parquet`` file.
    time_column : name of the time column (exact, case-sensitive).
    columns : names the table may hold (the model's observables); at least one must be present.
    positive : columns whose values must be > 0 (observables with log-normal noise).
    ignore_columns : other columns to skip (notes, identifiers).
    unit_column : for a long table of several units (cells, samples): the column naming the
        unit of each row. Each unit's rows must have increasing times; units may be measured at
        different times. Without it the table is one unit with one row per time (wide table).

    An empty cell is a missing measurement (skipped by the likelihood).

    Raises
    ------
    DataError
        Missing file, unreadable table, missing time or unit column, no observable column, an
        unknown column, a non-numeric, infinite or NaN-text cell, an empty or negative time, an
        empty unit label, unsorted or duplicate times (within a unit), a non-positive value where
        the noise model needs positive data, a row or column with no value at all.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, "the data file does not exist.", "check the path in the config (relative to the config's folder).")
    try:
        if path.suffix.lower() == ".parquet":
            frame = pd.read_parquet(path).astype(str)
        else:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except Exception as e:  # pandas/pyarrow parse errors
        raise DataError(path, f"cannot be read as a table ({type(e).__name__}: {e}).",
                        "save it as comma-separated text with one header row.") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    if time_column not in frame.columns:
        raise DataError(path, f"no time column {time_column!r} (columns: {list(frame.columns)}).",
                        "name the time column in the config (time_column = ...) or rename the header.")
    if unit_column is not None and unit_column not in frame.columns:
        raise DataError(path, f"no unit column {unit_column!r} (columns: {list(frame.columns)}).",
                        "set unit_column in the config to the column naming the cell or sample of each row, or "
                        "remove unit_column for a table of one unit.")
    present = [c for c in frame.columns if c in columns]
    known = {time_column, unit_column}
    unknown = [c for c in frame.columns if c not in known and c not in columns and c not in ignore_columns]
    if unknown:
        raise DataError(path, f"columns {unknown} are not observables of the model (observables: {list(columns)}).",
                        "rename them to an observable, or list them under ignore_columns in the config.")
    if not present:
        raise DataError(path, f"no column holds an observable of the model ({list(columns)}).",
                        "name the measurement columns after the model's observables.")
    if frame.empty:
        raise DataError(path, "the table has no data rows.", "add the measurements below the header.")
    lines = np.arange(len(frame)) + 2

    def number(i, col, text, *, required):
        text = text.strip()
        if text == "":
            if required:
                raise DataError(path, "the time is empty.", "give every row a time.", where=f"line {lines[i]}, column {col!r}")
            return math.nan
        try:
            v = float(text)
        except ValueError:
            raise DataError(path, f"{text!r} is not a number.", "write a plain decimal number, or leave the cell empty "
                            "for a missing measurement.", where=f"line {lines[i]}, column {col!r}") from None
        if not math.isfinite(v):
            raise DataError(path, f"{text!r} is not a finite number.", "leave the cell empty for a missing measurement "
                            "instead of writing NaN or inf.", where=f"line {lines[i]}, column {col!r}")
        return v

    times = np.array([number(i, time_column, t, required=True) for i, t in enumerate(frame[time_column])])
    if (times < 0).any():
        i = int(np.argmax(times < 0))
        raise DataError(path, f"negative time {times[i]:g}.", "times count from the start of the experiment.",
                        where=f"line {lines[i]}, column {time_column!r}")
    if unit_column is None:
        labels = np.zeros(len(frame), dtype=int)
        units = None
    else:
        names = [str(u).strip() for u in frame[unit_column]]
        for i, u in enumerate(names):
            if u == "":
                raise DataError(path, "the unit label is empty.", "name the cell or sample of every row.",
                                where=f"line {lines[i]}, column {unit_column!r}")
        units = tuple(dict.fromkeys(names))
        index = {u: k for k, u in enumerate(units)}
        labels = np.array([index[u] for u in names])
    for k in range(1 if units is None else len(units)):
        rows = np.flatnonzero(labels == k)
        steps = np.diff(times[rows])
        if (steps <= 0).any():
            j = int(np.argmax(steps <= 0)) + 1
            i, prev = rows[j], rows[j - 1]
            what = "repeats" if steps[j - 1] == 0 else "is earlier than"
            of = "" if units is None else f" of unit {units[k]!r}"
            raise DataError(path, f"time {times[i]:g}{of} {what} the time on line {lines[prev]}.",
                            "sort the rows by time and merge replicate rows (one row per time"
                            + ("" if units is None else " and unit") + ").",
                            where=f"line {lines[i]}, column {time_column!r}")
    row_values = {}
    for col in present:
        v = np.array([number(i, col, t, required=False) for i, t in enumerate(frame[col])])
        if col in positive and (v <= 0).any():
            i = int(np.argmax(v <= 0))
            raise DataError(path, f"value {v[i]:g} is not positive, but {col!r} has log-normal noise.",
                            "check the value (or its units); zero or negative measurements need a normal or Student-t "
                            "noise model.", where=f"line {lines[i]}, column {col!r}")
        if np.isnan(v).all():
            raise DataError(path, f"column {col!r} has no values.", "fill it in or remove the column.")
        row_values[col] = v
    empty = np.all([np.isnan(row_values[c]) for c in present], axis=0)
    if empty.any():
        i = int(np.argmax(empty))
        raise DataError(path, "the row has a time but no measurement.", "remove the row or fill in a value.",
                        where=f"line {lines[i]}")
    grid = np.unique(times)
    col_of = np.searchsorted(grid, times)
    shape = (1 if units is None else len(units), grid.size)
    values = {}
    for col, v in row_values.items():
        table = np.full(shape, np.nan)
        table[labels, col_of] = v
        values[col] = table
    line_table = np.zeros(shape, dtype=int)
    line_table[labels, col_of] = lines
    return TimeSeries(path=path, times=grid, values=values, lines=line_table, units=units)

"""Time-series tables for user-defined models: one time column, one column per observable."""

import dataclasses
import math
from pathlib import Path

import numpy as np
import pandas as pd

from ._errors import DataError


@dataclasses.dataclass(frozen=True)
class TimeSeries:
    """A validated time-series table.

    Attributes
    ----------
    path : the file read.
    times : sorted, unique sampling times, in the table's time unit, shape ``(n_time,)``.
    values : ``{column: (n_time,) float array}``; NaN where the cell was empty (not observed).
    lines : file line of each time (1-based, the header is line 1).
    """

    path: Path
    times: np.ndarray
    values: dict
    lines: np.ndarray

    def observed(self, column: str) -> tuple[np.ndarray, np.ndarray]:
        """Indices into ``times`` and values of the non-empty cells of ``column``."""
        v = self.values[column]
        idx = np.flatnonzero(~np.isnan(v))
        return idx, v[idx]


def read_timeseries(path, *, time_column: str, columns, positive=(), ignore_columns=()) -> TimeSeries:
    """Read a wide CSV (or Parquet) table of measurements over time.

    Parameters
    ----------
    path : ``.csv`` or ``.parquet`` file.
    time_column : name of the time column (exact, case-sensitive).
    columns : names the table may hold (the model's observables); at least one must be present.
    positive : columns whose values must be > 0 (observables with log-normal noise).
    ignore_columns : other columns to skip (notes, identifiers).

    An empty cell is a missing measurement (skipped by the likelihood).

    Raises
    ------
    DataError
        Missing file, unreadable table, missing time column, no observable column, an unknown
        column, a non-numeric, infinite or NaN-text cell, an empty or negative time, unsorted or
        duplicate times, a non-positive value where the noise model needs positive data, a row or
        column with no value at all.
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
    present = [c for c in frame.columns if c in columns]
    unknown = [c for c in frame.columns if c != time_column and c not in columns and c not in ignore_columns]
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
    steps = np.diff(times)
    if (steps <= 0).any():
        i = int(np.argmax(steps <= 0)) + 1
        what = "repeats" if steps[i - 1] == 0 else "is earlier than"
        raise DataError(path, f"time {times[i]:g} {what} the time on line {lines[i - 1]}.",
                        "sort the rows by time and merge replicate rows (one row per time).",
                        where=f"line {lines[i]}, column {time_column!r}")
    values = {}
    for col in present:
        v = np.array([number(i, col, t, required=False) for i, t in enumerate(frame[col])])
        if col in positive and (v <= 0).any():
            i = int(np.argmax(v <= 0))
            raise DataError(path, f"value {v[i]:g} is not positive, but {col!r} has log-normal noise.",
                            "check the value (or its units); zero or negative measurements need a normal or Student-t "
                            "noise model.", where=f"line {lines[i]}, column {col!r}")
        if np.isnan(v).all():
            raise DataError(path, f"column {col!r} has no values.", "fill it in or remove the column.")
        values[col] = v
    empty = np.all([np.isnan(values[c]) for c in present], axis=0)
    if empty.any():
        i = int(np.argmax(empty))
        raise DataError(path, "the row has a time but no measurement.", "remove the row or fill in a value.",
                        where=f"line {lines[i]}")
    return TimeSeries(path=path, times=times, values=values, lines=lines)

"""Every validation error of the imaging data layer, fed a malformed file."""

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data import EXAMPLE_DIR, DataError, load_imaging, read_fiji_wide, read_long, read_protocol


PROTOCOL = (EXAMPLE_DIR / "protocol.toml").read_text()


@pytest.fixture
def example(tmp_path):
    """A writable copy of the bundled example: (traces path, protocol path)."""
    shutil.copy(EXAMPLE_DIR / "traces.csv", tmp_path / "traces.csv")
    shutil.copy(EXAMPLE_DIR / "protocol.toml", tmp_path / "protocol.toml")
    return tmp_path / "traces.csv", tmp_path / "protocol.toml"


def _edit_csv(path: Path, fn):
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df = fn(df)
    df.to_csv(path, index=False)


def _protocol(tmp_path, text):
    p = tmp_path / "protocol.toml"
    p.write_text(text)
    return p


def test_example_loads(example):
    ds = load_imaging(*example)
    tr = ds.traces
    assert tr.intensity.shape == (12, 121)
    assert tr.mask.all()
    np.testing.assert_allclose(tr.time_min[:3], [0.0, 0.25, 0.5])  # seconds converted to minutes
    assert ds.protocol.segments[2].zn_ext_uM == 30.0
    assert ds.segment_bounds("fmax") == (20.0, 25.0)


def test_non_numeric_intensity(example):
    traces, protocol = example
    _edit_csv(traces, lambda df: df.assign(intensity=df["intensity"].where(df.index != 7, "12,5a")))
    with pytest.raises(DataError, match=r"traces.csv, line 9: value '12,5a' in column 'intensity' \(cell 'cell001'\) is not a number"):
        load_imaging(traces, protocol)


def test_nan_intensity_is_an_error_unless_masked(example):
    traces, protocol = example
    _edit_csv(traces, lambda df: df.assign(intensity=df["intensity"].where(df.index != 130, "NaN")))
    with pytest.raises(DataError, match=r"line 132.*cell 'cell002' has no intensity at time 135 s.*mask_missing = true"):
        load_imaging(traces, protocol)
    ds = load_imaging(traces, protocol, mask_missing=True)
    assert (~ds.traces.mask).sum() == 1
    assert not ds.traces.mask[1, 9]


def test_missing_frame_in_long_table(example):
    traces, protocol = example
    _edit_csv(traces, lambda df: df.drop(index=5))
    with pytest.raises(DataError, match=r"cell 'cell001' has no intensity at time 75 s"):
        load_imaging(traces, protocol)


def test_time_not_increasing(example):
    traces, protocol = example
    def swap(df):
        df = df.copy()
        df.loc[[3, 4], "time"] = df.loc[[4, 3], "time"].to_numpy()
        return df
    _edit_csv(traces, swap)
    with pytest.raises(DataError, match=r"line 6: time does not increase for cell 'cell001' \(60 then 45\)"):
        load_imaging(traces, protocol)


def test_duplicated_cell_id(example):
    traces, protocol = example
    # a second recording whose cells were also numbered from cell001
    _edit_csv(traces, lambda df: pd.concat([df, df[df["cell"] == "cell001"]], ignore_index=True))
    with pytest.raises(DataError, match=r"cell id 'cell001' appears twice at time 0.*cell ids must be unique"):
        load_imaging(traces, protocol)


def test_duplicated_roi_in_fiji_export(tmp_path):
    p = tmp_path / "fiji.csv"
    p.write_text(" ,Mean1,Mean2,Mean1\n1,10,11,12\n2,10,11,12\n")
    with pytest.raises(DataError, match=r"column 'Mean1' appears twice \(columns 2 and 4\): duplicated cell id"):
        read_fiji_wide(p, time_unit="s", frame_interval_min=0.25)


def test_missing_time_unit(tmp_path):
    p = _protocol(tmp_path, PROTOCOL.replace('time_unit = "s"\n', ""))
    with pytest.raises(DataError, match=r"protocol.toml: time_unit is missing. Fix: add time_unit = one of"):
        read_protocol(p)


def test_unknown_time_unit(tmp_path):
    p = _protocol(tmp_path, PROTOCOL.replace('time_unit = "s"', 'time_unit = "sec"'))
    with pytest.raises(DataError, match=r"unknown time_unit 'sec'. Fix: use one of \['ms', 's', 'min', 'h'\]"):
        read_protocol(p)


def test_zinc_without_unit_and_with_two_units(tmp_path):
    p = _protocol(tmp_path, PROTOCOL.replace("zn_ext_uM = 30.0", "zn_ext = 30.0"))
    with pytest.raises(DataError, match=r"segment 3: 'zn_ext' has no unit"):
        read_protocol(p)
    p = _protocol(tmp_path, PROTOCOL.replace("zn_ext_uM = 30.0", "zn_ext_uM = 30.0\nzn_ext_nM = 30000.0"))
    with pytest.raises(DataError, match=r"segment 3: zn_ext is given in more than one unit"):
        read_protocol(p)
    p = _protocol(tmp_path, PROTOCOL.replace("zn_ext_uM = 30.0", "zn_ext_nM = 30000.0"))
    assert read_protocol(p).segments[2].zn_ext_uM == pytest.approx(30.0)


def test_protocol_time_outside_recording(example):
    traces, protocol = example
    # a segment that starts after the last frame (here: a typo in the Fmin start)
    protocol.write_text(PROTOCOL.replace("start = 1500", "start = 2500"))
    with pytest.raises(DataError, match=r"segment 5 \(fmin\) starts at 2500 s, outside the recording in .*traces.csv \(0 to 1800 s\)"):
        load_imaging(traces, protocol)


def test_traces_in_minutes_but_protocol_in_seconds(example):
    traces, protocol = example
    _edit_csv(traces, lambda df: df.assign(time=(df["time"].astype(float) / 60).map("{:g}".format)))
    with pytest.raises(DataError, match=r"outside the recording"):
        load_imaging(traces, protocol)


def test_missing_calibration_segment(tmp_path):
    text = PROTOCOL[: PROTOCOL.index("[[segment]]\nstart = 1500")]
    p = _protocol(tmp_path, text)
    with pytest.raises(DataError, match=r"no fmin calibration segment. Fix: add the Fmin \(TPEN\) segment"):
        read_protocol(p)


def test_calibration_segment_too_short(example):
    traces, protocol = example
    protocol.write_text(PROTOCOL.replace("start = 1500", "start = 1770"))
    with pytest.raises(DataError, match=r"the fmin calibration segment holds 3 frame\(s\).*fewer than 4"):
        load_imaging(traces, protocol)


def test_cell_missing_its_calibration(example):
    traces, protocol = example
    def drop_fmin(df):
        t = df["time"].astype(float)
        return df.assign(intensity=df["intensity"].where(~((df["cell"] == "cell004") & (t >= 1500)), ""))
    _edit_csv(traces, drop_fmin)
    with pytest.raises(DataError, match=r"cell 'cell004' has no observed frame in the second half of the fmin calibration"):
        load_imaging(traces, protocol, mask_missing=True)


def test_fmax_not_above_fmin(example):
    traces, protocol = example
    def flat(df):
        t = df["time"].astype(float)
        sel = (df["cell"] == "cell007") & (t >= 1200)
        return df.assign(intensity=df["intensity"].where(~sel, "100"))
    _edit_csv(traces, flat)
    with pytest.raises(DataError, match=r"cell 'cell007': its Fmax level \(100\) is not above its Fmin level \(100\).*exclude_cells"):
        load_imaging(traces, protocol)
    ds = load_imaging(traces, protocol, exclude_cells=["cell007"])
    assert "cell007" not in ds.traces.cell_id


def test_missing_column(example):
    traces, protocol = example
    _edit_csv(traces, lambda df: df.rename(columns={"intensity": "Mean"}))
    with pytest.raises(DataError, match=r"column 'intensity' is missing \(columns are \['cell', 'time', 'Mean'\]\)"):
        load_imaging(traces, protocol, format="long")


def test_fiji_wide_and_parquet_round_trip(example, tmp_path):
    traces, protocol = example
    long = read_long(traces, time_unit="s")
    wide = pd.DataFrame({f"Mean{i + 1}": long.intensity[i] for i in range(long.intensity.shape[0])})
    wide.insert(0, " ", np.arange(1, wide.shape[0] + 1))
    wide.to_csv(tmp_path / "fiji.csv", index=False)
    ds = load_imaging(tmp_path / "fiji.csv", protocol)  # auto-detected, times from frame_interval
    np.testing.assert_allclose(ds.traces.intensity, long.intensity)
    np.testing.assert_allclose(ds.traces.time_min, long.time_min)
    assert ds.traces.cell_id[:2] == ("ROI1", "ROI2")
    pd.read_csv(traces).to_parquet(tmp_path / "traces.parquet")
    pq = load_imaging(tmp_path / "traces.parquet", protocol)
    np.testing.assert_allclose(pq.traces.intensity, long.intensity)


def test_fiji_without_frame_interval(tmp_path):
    p = tmp_path / "fiji.csv"
    p.write_text(" ,Mean1\n1,10\n2,11\n")
    with pytest.raises(DataError, match=r"no time column and no frame interval.*set frame_interval in the protocol"):
        read_fiji_wide(p, time_unit="s", frame_interval_min=None)

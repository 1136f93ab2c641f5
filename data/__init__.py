"""Readers, validation and bundled data sets for zinckin."""

import os as _os


_os.environ.setdefault("EQX_ON_ERROR", "off")  # before equinox is imported; see models/__init__.py
from pathlib import Path

import numpyro as _numpyro  # noqa: E402, F401  (before its submodules; see models/__init__.py)

from ._errors import DataError as DataError
from ._genes import REFERENCE_GENES as REFERENCE_GENES, TARGET_GENES as TARGET_GENES, canonical_gene as canonical_gene
from ._imaging import (
    ImagingDataset as ImagingDataset,
    ImagingTraces as ImagingTraces,
    load_imaging as load_imaging,
    read_fiji_wide as read_fiji_wide,
    read_long as read_long,
    validate_against_protocol as validate_against_protocol,
    write_long_csv as write_long_csv,
)
from ._protocol import Protocol as Protocol, Segment as Segment, read_protocol as read_protocol
from ._qpcr import (
    CtTable as CtTable,
    FoldChangeTable as FoldChangeTable,
    livak_fold_change as livak_fold_change,
    read_ct as read_ct,
    read_fold_change as read_fold_change,
)
from ._timeseries import TimeSeries as TimeSeries, read_timeseries as read_timeseries


EXAMPLE_DIR: Path = Path(__file__).parent / "example"
"""Folder of the bundled example imaging data set (made by ``zinckin simulate``)."""

GLYCINATE_DIR: Path = Path(__file__).parent / "glycinate"
"""Folder of the bundled real qPCR fold-change tables from the seed document (see PROVENANCE.md there)."""

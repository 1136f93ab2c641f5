"""Readers and validation for transcript (qPCR) data: fold-change tables and raw Ct tables.

Line numbers count the header as line 1, so the first data row is line 2 (for Parquet files the
"line" is the row number + 1). Blank lines in a CSV are skipped but still counted.
"""

import dataclasses
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ._errors import DataError
from ._genes import REFERENCE_GENES, TARGET_GENES, canonical_gene


DOSE_UNITS: dict[str, tuple[str, ...]] = {
    "mg/kg": ("mg/kg", "ppm", "mg/kg diet", "mg Zn/kg", "mg Zn/kg diet"),
    "uM": ("uM", "µM", "μM", "umol/L", "µmol/L", "μmol/L"),
    "mM": ("mM", "mmol/L"),
    "nM": ("nM", "nmol/L"),
}
"""Canonical dose unit -> accepted spellings (matched case-insensitively). Units are never converted."""

_UNIT_LOOKUP = {" ".join(a.lower().split()): unit for unit, names in DOSE_UNITS.items() for a in names}
_UNITS_TEXT = "; ".join(f"{u} (also {', '.join(a for a in names if a != u)})" if len(names) > 1 else u
                        for u, names in DOSE_UNITS.items())

CENSORED_CT = ("undetermined", "undet", "no ct", "no cq", "n/a")
"""Ct cell texts (case-insensitive) meaning the well did not amplify by the end of the run."""

_FORM_ALIASES = {"znso4": "sulfate", "zn-gly": "glycinate", "glycine chelate": "glycinate"}

_FC_COLUMNS = ("gene", "tissue", "dose", "fold_change")
_FC_OPTIONAL = ("species", "form", "dose_unit", "sd", "sem", "n")
_CT_COLUMNS = ("gene", "sample", "tissue", "dose", "ct")
_CT_OPTIONAL = ("species", "form", "replicate", "dose_unit")
_COLUMN_ALIASES = {"fc": "fold_change", "cq": "ct"}

FOLD_CHANGE_COLUMNS = ("gene", "tissue", "species", "form", "dose", "fold_change", "sd", "sem", "n", "line")
CT_COLUMNS = ("gene", "sample", "tissue", "species", "form", "dose", "replicate", "ct", "censored", "is_reference", "line")


@dataclasses.dataclass(frozen=True, eq=False)
class FoldChangeTable:
    """Validated group-mean fold changes, one row per gene, tissue, species, form and dose.

    Attributes
    ----------
    frame : columns ``gene`` (canonical target gene), ``tissue``, ``species``, ``form`` (str),
        ``dose``, ``fold_change``, ``sd``, ``sem``, ``n`` (float; NaN where not given) and
        ``line`` (int, the row's line in the file).
    dose_unit : canonical dose unit, a key of ``DOSE_UNITS``.
    path : the source file.
    """

    frame: pd.DataFrame
    dose_unit: str
    path: str

    def __post_init__(self):
        if tuple(self.frame.columns) != FOLD_CHANGE_COLUMNS:
            raise ValueError(f"frame columns must be {FOLD_CHANGE_COLUMNS}, got {tuple(self.frame.columns)}.")


@dataclasses.dataclass(frozen=True, eq=False)
class CtTable:
    """Validated raw Ct values, one row per well.

    Attributes
    ----------
    frame : columns ``gene``, ``sample``, ``tissue``, ``species``, ``form`` (str), ``dose``
        (float), ``replicate`` (str), ``ct`` (float; NaN where censored), ``censored`` (bool: the
        well did not amplify or its Ct is above ``ct_cutoff``), ``is_reference`` (bool) and
        ``line`` (int, the well's line in the file).
    dose_unit : canonical dose unit, a key of ``DOSE_UNITS``.
    ct_cutoff : Ct above which a well counts as censored.
    reference_genes : the reference genes, as resolved by :func:`canonical_gene`.
    path : the source file.
    """

    frame: pd.DataFrame
    dose_unit: str
    ct_cutoff: float
    reference_genes: tuple[str, ...]
    path: str

    def __post_init__(self):
        if tuple(self.frame.columns) != CT_COLUMNS:
            raise ValueError(f"frame columns must be {CT_COLUMNS}, got {tuple(self.frame.columns)}.")

    @property
    def target_genes(self) -> tuple[str, ...]:
        """Target genes in order of first appearance."""
        return tuple(dict.fromkeys(self.frame.loc[~self.frame["is_reference"], "gene"].tolist()))

    @property
    def samples(self) -> tuple[str, ...]:
        """Sample names in order of first appearance."""
        return tuple(dict.fromkeys(self.frame["sample"].tolist()))


@dataclasses.dataclass
class _Rows:
    """Stripped text cells of the known columns, blank rows removed."""

    path: Path
    cells: dict[str, list[str]]
    header: dict[str, str]
    lines: list[int]

    def has(self, key: str) -> bool:
        return key in self.cells

    def where(self, i: int, key: str | None = None) -> str:
        return f"line {self.lines[i]}" + (f", column '{self.header[key]}'" if key else "")

    def error(self, i: int, key: str | None, problem: str, fix: str) -> DataError:
        return DataError(self.path, problem, fix, where=self.where(i, key))


def _column_key(name) -> str:
    return re.sub(r"[\s_-]+", "_", str(name).replace("\ufeff", "").strip().lower())


def _read_rows(path: Path, what: str, required: Sequence[str], optional: Sequence[str]) -> _Rows:
    if not path.exists():
        raise DataError(path, f"the {what} file does not exist.", "check the path in the config.")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            df = pd.read_parquet(path)
        else:
            df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True, skip_blank_lines=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, OSError, ValueError) as e:
        raise DataError(path, f"cannot be read as a table ({e}).", "export it as CSV with a header row, or as Parquet.") from None
    header: dict[str, str] = {}
    position: dict[str, int] = {}
    for j, name in enumerate(df.columns):
        key = _column_key(name)
        key = _COLUMN_ALIASES.get(key, key)
        if key in header and key in (*required, *optional):
            raise DataError(path, f"columns '{header[key]}' and '{str(name).strip()}' both give the {key}.", "keep only one of them.")
        header[key], position[key] = str(name).strip(), j
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(
            path, f"required column(s) {missing} missing (columns are {[str(c).strip() for c in df.columns]}).",
            f"add or rename the column(s); required: {list(required)}, optional: {list(optional)} (case-insensitive).",
        )
    text = [["" if pd.isna(v) else str(v).strip() for v in df.iloc[:, j].tolist()] for j in range(df.shape[1])]
    keep = [i for i in range(len(df)) if any(col[i] for col in text)]
    if not keep:
        raise DataError(path, f"the {what} has no data rows.", "add one row per measurement below the header.")
    cells = {key: [text[j][i] for i in keep] for key, j in position.items() if key in (*required, *optional)}
    return _Rows(path=path, cells=cells, header={k: header[k] for k in cells}, lines=[i + 2 for i in keep])


def _number(rows: _Rows, key: str, i: int, *, empty_fix: str | None) -> float:
    """Float of a cell; empty -> NaN if ``empty_fix`` is None, else a DataError with that fix."""
    text = rows.cells[key][i]
    if text == "":
        if empty_fix is None:
            return math.nan
        raise rows.error(i, key, f"the {key} is empty.", empty_fix)
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if math.isnan(value):
        raise rows.error(i, key, f"value {text!r} is not a number.", "write a plain number with a decimal point (e.g. 2.5).")
    if not math.isfinite(value):
        raise rows.error(i, key, f"value {text!r} is infinite.", "write a finite number.")
    return value


def _dose(rows: _Rows, i: int) -> float:
    dose = _number(rows, "dose", i, empty_fix="fill in the dose (0 for the control group).")
    if dose < 0:
        raise rows.error(i, "dose", f"the dose {dose:g} is negative.", "doses are amounts of added zinc: 0 (control) or more.")
    return dose


def _form(text: str) -> str:
    form = " ".join(text.lower().split())
    if form.startswith("zinc "):
        form = form[5:].strip()
    form = form.replace("sulphate", "sulfate")
    return _FORM_ALIASES.get(form, form)


def _labels(rows: _Rows, i: int, dose: float) -> tuple[str, str, str]:
    """(tissue, species, form) of a row; form is 'none' at dose 0 and 'unspecified' when not given."""
    tissue = " ".join(rows.cells["tissue"][i].lower().split())
    if not tissue:
        raise rows.error(i, "tissue", "the tissue is empty.", "name the tissue of every row (e.g. duodenum, liver).")
    species = " ".join(rows.cells["species"][i].lower().split()) if rows.has("species") else ""
    form = _form(rows.cells["form"][i]) if rows.has("form") else ""
    if dose == 0:
        form = "none"
    return tissue, species or "unspecified", form or "unspecified"


def _unit_name(text: str) -> str | None:
    return _UNIT_LOOKUP.get(" ".join(text.lower().split()))


def _dose_unit(rows: _Rows, dose_unit: str | None) -> str:
    """The one canonical dose unit of a table, from its dose_unit column and/or the config."""
    configured = None
    if dose_unit is not None:
        configured = _unit_name(dose_unit)
        if configured is None:
            raise DataError(rows.path, f"unknown dose unit {dose_unit!r} set in the config.", f"use one of: {_UNITS_TEXT}.")
    if not rows.has("dose_unit"):
        if configured is None:
            raise DataError(
                rows.path, "the dose unit is unknown: the table has no dose_unit column and the config sets none.",
                "add a dose_unit column or set dose_unit in the config.",
            )
        return configured
    first: tuple[str, int] | None = None
    for i, text in enumerate(rows.cells["dose_unit"]):
        if text == "":
            raise rows.error(i, "dose_unit", "the dose unit is empty.", f"fill in the unit; accepted: {_UNITS_TEXT}.")
        unit = _unit_name(text)
        if unit is None:
            raise rows.error(i, "dose_unit", f"unknown dose unit {text!r}.", f"use one of: {_UNITS_TEXT}.")
        if first is None:
            first = (unit, i)
        elif unit != first[0]:
            raise rows.error(
                i, "dose_unit", f"mixed dose units: '{unit}' here but '{first[0]}' on line {rows.lines[first[1]]}.",
                "convert all doses to one unit; zinckin does not convert between dose units.",
            )
    assert first is not None
    if configured is not None and configured != first[0]:
        raise rows.error(
            first[1], "dose_unit", f"the dose_unit column says '{first[0]}' but the config sets dose_unit = '{configured}'.",
            "correct the column, or remove dose_unit from the config.",
        )
    return first[0]


def read_fold_change(path, *, dose_unit: str | None = None) -> FoldChangeTable:
    """Read a long table of group-mean qPCR fold changes from CSV or Parquet.

    One row per gene, tissue, species, chemical form and dose. Column names are matched
    case-insensitively; required: ``gene``, ``tissue``, ``dose``, ``fold_change`` (or ``fold change``,
    ``fc``); optional: ``species``, ``form``, ``dose_unit``, ``sd``, ``sem``, ``n``; other columns
    are ignored. Fold changes are ratios to the dose-0 control group of the same gene, tissue and
    species (control = 1). Dose-0 rows get form ``none`` whatever the table says (a chemical form
    is meaningless without added zinc); a missing form is ``unspecified``, as is a missing species.

    Parameters
    ----------
    path : CSV (``.csv``) or Parquet (``.parquet``) file.
    dose_unit : dose unit when the table has no ``dose_unit`` column (if it has one, both must agree).

    Returns
    -------
    FoldChangeTable

    Raises
    ------
    DataError
        A missing column, no data rows, an unknown or reference gene, an empty tissue, a
        non-numeric, empty or negative dose, a non-numeric, empty or non-positive fold change, a
        non-positive sd / sem / n, an unknown, missing or mixed dose unit, a dose-0 fold change other
        than 1, or the same (gene, tissue, species, form, dose) twice.
    """
    path = Path(path)
    rows = _read_rows(path, "fold-change table", _FC_COLUMNS, _FC_OPTIONAL)
    unit = _dose_unit(rows, dose_unit)
    out: dict[str, list] = {c: [] for c in FOLD_CHANGE_COLUMNS}
    seen: dict[tuple, int] = {}
    for i in range(len(rows.lines)):
        text = rows.cells["gene"][i]
        gene = canonical_gene(text)
        if gene is None:
            raise rows.error(
                i, "gene", f"unknown gene {text!r}.",
                f"use one of the known target genes {list(TARGET_GENES)} (or an alias, e.g. SLC30A1 for ZnT1).",
            )
        if gene not in TARGET_GENES:
            raise rows.error(i, "gene", f"{text!r} is a reference gene: reference genes have no fold change.", "remove the row.")
        dose = _dose(rows, i)
        tissue, species, form = _labels(rows, i, dose)
        fc = _number(rows, "fold_change", i, empty_fix="fill in the fold change or remove the row.")
        if fc <= 0:
            raise rows.error(
                i, "fold_change", f"the fold change {fc:g} is not positive.",
                "fold changes are ratios > 0; if the table is log2 fold change convert with 2**x.",
            )
        if dose == 0 and abs(fc - 1.0) > 1e-6:
            raise rows.error(
                i, "fold_change", f"the dose-0 row has fold change {fc:g}, not 1.",
                "fold changes must be relative to the dose-0 control group of the same gene, tissue and species; "
                "divide the group's values by the control value.",
            )
        spread = {}
        for key in ("sd", "sem", "n"):
            spread[key] = _number(rows, key, i, empty_fix=None) if rows.has(key) else math.nan
            if spread[key] <= 0:
                raise rows.error(i, key, f"the {key} {spread[key]:g} is not positive.", f"give a positive {key}, or leave the cell empty.")
        group = (gene, tissue, species, form, dose)
        if group in seen:
            raise rows.error(
                i, None, f"{gene} in {tissue} ({species}, {form}, dose {dose:g} {unit}) is given twice "
                f"(line {rows.lines[seen[group]]} and line {rows.lines[i]}).",
                "keep one row per gene, tissue, species, form and dose (average duplicates or remove one).",
            )
        seen[group] = i
        for key, value in (("gene", gene), ("tissue", tissue), ("species", species), ("form", form), ("dose", dose),
                           ("fold_change", fc), *spread.items(), ("line", rows.lines[i])):
            out[key].append(value)
    frame = pd.DataFrame(out)
    frame = frame.astype({c: float for c in ("dose", "fold_change", "sd", "sem", "n")} | {"line": np.int64})
    return FoldChangeTable(frame=frame, dose_unit=unit, path=str(path))


def _resolve_reference(reference_genes: Sequence[str]) -> tuple[str, ...]:
    names = [reference_genes] if isinstance(reference_genes, str) else list(reference_genes)
    refs: list[str] = []
    for name in names:
        gene = canonical_gene(name, extra_reference=names)
        if gene is None:
            raise ValueError(f"reference_genes holds an empty name ({name!r}).")
        if gene in TARGET_GENES:
            raise ValueError(f"reference gene {name!r} is the target gene {gene}; name housekeeping genes such as {REFERENCE_GENES[:3]}.")
        if gene not in refs:
            refs.append(gene)
    if not refs:
        raise ValueError("reference_genes must name at least one reference gene.")
    return tuple(refs)


def _ct(rows: _Rows, i: int, ct_cutoff: float, lo: float, hi: float) -> tuple[float, bool]:
    """(Ct, censored) of a well; a censored well has Ct NaN."""
    text = rows.cells["ct"][i]
    if text == "":
        raise rows.error(i, "ct", "the Ct is empty.", "write Undetermined if the well did not cross the threshold, or delete the row.")
    if " ".join(text.lower().split()) in CENSORED_CT:
        return math.nan, True
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if math.isnan(value):
        raise rows.error(
            i, "ct", f"value {text!r} is not a Ct.",
            "write a number with a decimal point, or Undetermined if the well did not cross the threshold.",
        )
    if not lo <= value <= hi:
        raise rows.error(
            i, "ct", f"the Ct {value:g} is outside the plausible range {lo:g}-{hi:g}.",
            "check the well and the export; write Undetermined if the well did not amplify, or delete the row.",
        )
    if value > ct_cutoff:
        return math.nan, True
    return value, False


def _describe(labels: tuple) -> str:
    tissue, species, form, dose = labels
    return f"tissue={tissue}, species={species}, form={form}, dose={dose:g}"


def read_ct(path, *, reference_genes: Sequence[str], ct_cutoff: float = 40.0, ct_range: tuple[float, float] = (5.0, 50.0),
            dose_unit: str | None = None) -> CtTable:
    """Read raw qPCR Ct values (one row per well) from CSV or Parquet.

    Column names are matched case-insensitively; required: ``gene``, ``sample``, ``tissue``,
    ``dose``, ``ct`` (or ``cq``); optional: ``species``, ``form``, ``replicate``, ``dose_unit``;
    other columns are ignored. Without a ``replicate`` column the wells of each (gene, sample) are
    numbered 1, 2, ... in file order. Dose-0 rows get form ``none``; a missing form or species is
    ``unspecified``.

    Ct cells: ``Undetermined``, ``undet``, ``No Ct``, ``No Cq`` or ``N/A`` (any case) mean the well
    did not amplify by the end of the run, so its true Ct is above the cutoff: the well is censored
    (``censored=True``, ``ct`` NaN). A number above ``ct_cutoff`` (and within ``ct_range``) is
    censored the same way. An empty cell, other text, or a number outside ``ct_range`` is an error.

    Parameters
    ----------
    path : CSV (``.csv``) or Parquet (``.parquet``) file.
    reference_genes : the normalising genes (canonical names, aliases or the table's own names);
        every sample needs at least one amplified well of each.
    ct_cutoff : Ct above which a well counts as not amplified; ``ct_range[0] < ct_cutoff <= ct_range[1]``.
    ct_range : plausible Ct values; numbers outside are errors.
    dose_unit : dose unit when the table has no ``dose_unit`` column (if it has one, both must agree).

    Returns
    -------
    CtTable

    Raises
    ------
    ValueError
        Bad ``ct_cutoff`` / ``ct_range``, or ``reference_genes`` empty or naming a target gene.
    DataError
        A missing column, no data rows, an unknown gene (or a registry reference gene not in
        ``reference_genes``), an empty sample, tissue, replicate or Ct, a non-numeric, negative or
        implausible value, an unknown, missing or mixed dose unit, a (gene, sample, replicate) given
        twice, a sample with inconsistent tissue / species / form / dose, a sample without an
        amplified well of a reference gene, a (tissue, species) without dose-0 samples, or a table
        with no target gene.
    """
    path = Path(path)
    lo, hi = float(ct_range[0]), float(ct_range[1])
    ct_cutoff = float(ct_cutoff)
    if not lo < ct_cutoff <= hi:
        raise ValueError(f"need ct_range[0] < ct_cutoff <= ct_range[1], got ct_cutoff={ct_cutoff:g}, ct_range=({lo:g}, {hi:g}).")
    refs = _resolve_reference(reference_genes)
    rows = _read_rows(path, "Ct table", _CT_COLUMNS, _CT_OPTIONAL)
    unit = _dose_unit(rows, dose_unit)
    out: dict[str, list] = {c: [] for c in CT_COLUMNS}
    sample_labels: dict[str, tuple[tuple, int]] = {}
    wells: dict[tuple[str, str, str], int] = {}
    counter: dict[tuple[str, str], int] = {}
    for i in range(len(rows.lines)):
        text = rows.cells["gene"][i]
        gene = canonical_gene(text, extra_reference=refs)
        if gene is None:
            raise rows.error(
                i, "gene", f"unknown gene {text!r}.",
                f"use one of the known target genes {list(TARGET_GENES)} or the configured reference genes {list(refs)} "
                "(or an alias, e.g. SLC30A1 for ZnT1), or add the gene to reference_genes if it is a normaliser.",
            )
        if gene in REFERENCE_GENES and gene not in refs:
            raise rows.error(
                i, "gene", f"{text!r} is a reference gene but not one of reference_genes {list(refs)}.",
                "add it to reference_genes in the config, or delete its rows.",
            )
        sample = rows.cells["sample"][i]
        if not sample:
            raise rows.error(i, "sample", "the sample is empty.", "name the sample (animal or culture) of every well.")
        dose = _dose(rows, i)
        labels = (*_labels(rows, i, dose), dose)
        if sample in sample_labels and sample_labels[sample][0] != labels:
            first_labels, first = sample_labels[sample]
            raise rows.error(
                i, None, f"sample '{sample}' has {_describe(labels)} here but {_describe(first_labels)} on line {rows.lines[first]}.",
                "all wells of a sample must carry the same tissue, species, form and dose: correct the row, or give "
                "different samples different names.",
            )
        sample_labels.setdefault(sample, (labels, i))
        ct, censored = _ct(rows, i, ct_cutoff, lo, hi)
        if rows.has("replicate"):
            replicate = rows.cells["replicate"][i]
            if not replicate:
                raise rows.error(
                    i, "replicate", "the replicate is empty.",
                    "label every well, or remove the replicate column to number the wells in file order.",
                )
        else:
            counter[(gene, sample)] = counter.get((gene, sample), 0) + 1
            replicate = str(counter[(gene, sample)])
        key = (gene, sample, replicate)
        if key in wells:
            raise rows.error(
                i, None, f"gene {gene}, sample '{sample}', replicate '{replicate}' is given twice "
                f"(line {rows.lines[wells[key]]} and line {rows.lines[i]}).",
                "give each technical replicate its own replicate label, or remove the duplicated row.",
            )
        wells[key] = i
        for name, value in (("gene", gene), ("sample", sample), ("tissue", labels[0]), ("species", labels[1]),
                            ("form", labels[2]), ("dose", dose), ("replicate", replicate), ("ct", ct),
                            ("censored", censored), ("is_reference", gene in refs), ("line", rows.lines[i])):
            out[name].append(value)

    by_sample: dict[str, list[int]] = {}
    for i, (gene, sample) in enumerate(zip(out["gene"], out["sample"])):
        by_sample.setdefault(sample, []).append(i)
    for sample, idx in by_sample.items():
        for ref in refs:
            ref_idx = [i for i in idx if out["gene"][i] == ref]
            if not ref_idx:
                raise rows.error(
                    idx[0], None, f"sample '{sample}' has no {ref} well.",
                    "add the reference gene wells or drop the sample (every sample needs every gene of reference_genes).",
                )
            if all(out["censored"][i] for i in ref_idx):
                raise rows.error(
                    ref_idx[0], None, f"every {ref} well of sample '{sample}' is censored (Undetermined or Ct above {ct_cutoff:g}).",
                    "a reference gene must amplify in every sample: repeat the wells or drop the sample.",
                )
    groups: dict[tuple[str, str], list[int]] = {}
    for i, (tissue, species) in enumerate(zip(out["tissue"], out["species"])):
        groups.setdefault((tissue, species), []).append(i)
    for (tissue, species), idx in groups.items():
        if not any(out["dose"][i] == 0 for i in idx):
            raise rows.error(
                idx[0], None, f"no control group (dose 0) for tissue {tissue}, species {species}; the ddCt reference needs one.",
                "add the dose-0 samples of that tissue and species, or remove its rows.",
            )
    if all(out["is_reference"]):
        raise DataError(path, f"the table holds only reference gene wells {list(refs)}.", f"add wells of target genes {list(TARGET_GENES)}.")
    frame = pd.DataFrame(out).astype({"dose": float, "ct": float, "censored": bool, "is_reference": bool, "line": np.int64})
    return CtTable(frame=frame, dose_unit=unit, ct_cutoff=ct_cutoff, reference_genes=refs, path=str(path))


def livak_fold_change(table: CtTable) -> pd.DataFrame:
    """Classic 2^-ddCt fold changes (Livak & Schmittgen 2001), per gene and group.

    Per sample and gene the Ct is the mean over non-censored technical replicates; the sample's
    reference level is the arithmetic mean of its reference genes' Ct (the geometric mean of their
    quantities). ``dCt = Ct_target - Ct_reference``; per group (tissue, species, form, dose) dCt is
    averaged over samples, ``ddCt`` = group mean dCt - mean dCt of the dose-0 samples of the same
    gene, tissue and species, and ``fold_change = 2**-ddCt``. Samples whose wells of a gene are all
    censored are left out of that gene's group mean, which biases that group towards higher
    expression; the Bayesian model instead treats such wells as censored. A gene with no usable
    control sample gets NaN.

    Parameters
    ----------
    table : a validated Ct table.

    Returns
    -------
    pandas.DataFrame
        Columns ``gene``, ``tissue``, ``species``, ``form``, ``dose``, ``fold_change``, ``ddct``,
        ``n_samples`` (samples in the group mean), sorted by gene, tissue, species, dose, form.
    """
    columns = ["gene", "tissue", "species", "form", "dose", "fold_change", "ddct", "n_samples"]
    df = table.frame
    obs = df.loc[~df["censored"]]
    ref = obs.loc[obs["is_reference"]].groupby(["sample", "gene"])["ct"].mean().unstack("gene")
    ref_level = ref.reindex(columns=list(table.reference_genes)).mean(axis=1, skipna=False)
    tgt = obs.loc[~obs["is_reference"]].groupby(["sample", "gene"], as_index=False)["ct"].mean()
    if tgt.empty:  # every target well censored
        dtypes = {"dose": float, "fold_change": float, "ddct": float, "n_samples": np.int64}
        return pd.DataFrame({c: pd.Series(dtype=dtypes.get(c, str)) for c in columns})
    labels = df.drop_duplicates("sample").set_index("sample")[["tissue", "species", "form", "dose"]]
    tgt = tgt.assign(dct=tgt["ct"] - tgt["sample"].map(ref_level)).join(labels, on="sample").dropna(subset=["dct"])
    group = tgt.groupby(["gene", "tissue", "species", "form", "dose"], as_index=False).agg(dct=("dct", "mean"), n_samples=("sample", "size"))
    control = tgt.loc[tgt["dose"] == 0].groupby(["gene", "tissue", "species"])["dct"].mean().rename("control_dct")
    group = group.join(control, on=["gene", "tissue", "species"])
    ddct = group["dct"] - group["control_dct"]
    group = group.assign(ddct=ddct, fold_change=np.exp2(-ddct), n_samples=group["n_samples"].astype(np.int64))
    return group.sort_values(["gene", "tissue", "species", "dose", "form"]).reset_index(drop=True)[columns]

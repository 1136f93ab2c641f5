"""Transcript (qPCR) data: fold-change and Ct readers, every validation error, and 2^-ddCt."""

import math
import textwrap

import numpy as np
import pandas as pd
import pytest

from data import (
    GLYCINATE_DIR,
    REFERENCE_GENES,
    TARGET_GENES,
    DataError,
    canonical_gene,
    livak_fold_change,
    read_ct,
    read_fold_change,
)


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path


FC = """\
gene,tissue,species,form,dose,dose_unit,fold_change
MT1,duodenum,rat,none,0,mg/kg,1.0
MT1,duodenum,rat,glycinate,30,mg/kg,2.5
ZIP4,duodenum,rat,none,0,mg/kg,1.0
ZIP4,duodenum,rat,glycinate,30,mg/kg,0.8
"""


def _fc(tmp_path, text=FC, name="fc.csv"):
    return _write(tmp_path, name, text)


# Two control and two treated liver samples, two reference genes; line numbers are in the comments of the tests.
CT = """\
gene,sample,tissue,species,form,dose,dose_unit,ct
GAPDH,c1,liver,rat,none,0,mg/kg,20.0
ACTB,c1,liver,rat,none,0,mg/kg,22.0
MT1,c1,liver,rat,none,0,mg/kg,26.0
MT1,c1,liver,rat,none,0,mg/kg,26.2
GAPDH,c2,liver,rat,none,0,mg/kg,19.0
ACTB,c2,liver,rat,none,0,mg/kg,21.0
MT1,c2,liver,rat,none,0,mg/kg,24.9
GAPDH,t1,liver,rat,sulfate,60,mg/kg,20.5
ACTB,t1,liver,rat,sulfate,60,mg/kg,21.5
MT1,t1,liver,rat,sulfate,60,mg/kg,24.0
MT1,t1,liver,rat,sulfate,60,mg/kg,Undetermined
GAPDH,t2,liver,rat,sulfate,60,mg/kg,18.0
ACTB,t2,liver,rat,sulfate,60,mg/kg,20.0
MT1,t2,liver,rat,sulfate,60,mg/kg,22.2
MT1,t2,liver,rat,sulfate,60,mg/kg,21.8
"""
REFS = ("GAPDH", "ACTB")


def _ct(tmp_path, text=CT, name="ct.csv"):
    return _write(tmp_path, name, text)


def _replace_line(text, line, new):
    """Replace file line ``line`` (header = line 1) of a CSV text."""
    lines = text.splitlines()
    lines[line - 1] = new
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- genes


def test_canonical_gene_aliases_and_case():
    assert set(TARGET_GENES) == {"MT1", "MT2", "ZnT1", "ZnT2", "ZIP4", "ZIP5", "ZIP10"}
    assert "18S" in REFERENCE_GENES and "GAPDH" in REFERENCE_GENES
    cases = {
        "MT": "MT1", "mt-1": "MT1", "MT1a": "MT1", "MT-I": "MT1", "Mt1": "MT1",
        "mt-ii": "MT2", "MT2A": "MT2",
        "slc30a1": "ZnT1", "znt1": "ZnT1", "SLC30A2": "ZnT2",
        "Zip4": "ZIP4", " slc39a4 ": "ZIP4", "SLC39A5": "ZIP5", "slc39a10": "ZIP10",
        "Gapdh": "GAPDH", "beta-actin": "ACTB", "B-Actin": "ACTB", "actinb": "ACTB",
        "rn18s": "18S", "18S  rRNA": "18S",
    }
    for name, canonical in cases.items():
        assert canonical_gene(name) == canonical, name
    assert canonical_gene("Hprt") is None
    assert canonical_gene("hprt", extra_reference=["Hprt"]) == "Hprt"
    assert canonical_gene("gapdh", extra_reference=["Gapdh"]) == "GAPDH"
    assert canonical_gene("") is None
    assert canonical_gene("NOTAGENE") is None


# ---------------------------------------------------------------- fold-change tables


def test_bundled_glycinate_table_loads():
    t = read_fold_change(GLYCINATE_DIR / "fold_changes.csv")
    df = t.frame
    assert list(df.columns) == ["gene", "tissue", "species", "form", "dose", "fold_change", "sd", "sem", "n", "line"]
    assert len(df) == 28
    assert set(df["gene"]) == {"MT1", "ZIP4", "ZnT1", "ZIP5"}
    assert set(df["tissue"]) == {"duodenum", "jejunum", "liver"}
    assert set(df.loc[df["dose"] == 0, "form"]) == {"none"}
    liver = df.loc[df["tissue"] == "liver"]
    assert set(liver["gene"]) == {"MT1"} and set(liver["species"]) == {"broiler"}
    assert set(liver["form"]) == {"none", "sulfate", "glycinate"}
    assert t.dose_unit == "mg/kg"
    assert df["sd"].isna().all() and df["n"].isna().all()
    assert df["line"].tolist() == list(range(2, 30))
    assert df["dose"].dtype == float and df["fold_change"].dtype == float
    assert df.loc[df["line"] == 4, "fold_change"].item() == 4.0


def test_fold_change_aliases_forms_and_units(tmp_path):
    path = _fc(tmp_path, """\
        Gene , Tissue,Form,Dose,Dose Unit,FC,SEM,n,source_table
        slc30a1,Duodenum,Zinc Sulphate,0,ppm,1,,,1
        znt1,duodenum,ZnSO4,30,PPM,1.5,0.1,6,1
        MT-I,duodenum,zinc glycine chelate,30,mg/kg diet,2.0,0.2,6,1
        Zip4,duodenum,zn-gly,60,mg Zn/kg,0.5,,5,1
        """)
    df = read_fold_change(path).frame
    assert df["gene"].tolist() == ["ZnT1", "ZnT1", "MT1", "ZIP4"]
    assert df["form"].tolist() == ["none", "sulfate", "glycinate", "glycinate"]
    assert set(df["species"]) == {"unspecified"} and set(df["tissue"]) == {"duodenum"}
    np.testing.assert_array_equal(df["sem"].to_numpy(), [np.nan, 0.1, 0.2, np.nan])
    np.testing.assert_array_equal(df["n"].to_numpy(), [np.nan, 6, 6, 5])
    assert df["sd"].isna().all()
    assert read_fold_change(path).dose_unit == "mg/kg"


def test_fold_change_form_column_missing_is_unspecified_and_unit_from_argument(tmp_path):
    path = _fc(tmp_path, "gene,tissue,dose,fold change\nMT1,liver,0,1\nMT1,liver,10,2\n")
    t = read_fold_change(path, dose_unit="µM")
    assert t.dose_unit == "uM"
    assert t.frame["form"].tolist() == ["none", "unspecified"]
    assert read_fold_change(path, dose_unit="umol/l").dose_unit == "uM"


def test_fold_change_missing_column(tmp_path):
    path = _fc(tmp_path, "gene,tissue,dose_unit,fold_change\nMT1,liver,mg/kg,1\n")
    with pytest.raises(DataError, match=r"fc.csv: required column\(s\) \['dose'\] missing \(columns are \['gene', 'tissue', 'dose_unit', "
                                        r"'fold_change'\]\).*Fix: add or rename"):
        read_fold_change(path)


def test_fold_change_empty_table(tmp_path):
    path = _fc(tmp_path, "gene,tissue,dose,dose_unit,fold_change\n\n")
    with pytest.raises(DataError, match=r"fc.csv: the fold-change table has no data rows.*Fix: add one row"):
        read_fold_change(path)


def test_fold_change_non_numeric(tmp_path):
    path = _fc(tmp_path, _replace_line(FC, 3, "MT1,duodenum,rat,glycinate,thirty,mg/kg,2.5"))
    with pytest.raises(DataError, match=r"fc.csv, line 3, column 'dose': value 'thirty' is not a number.*Fix: write a plain number"):
        read_fold_change(path)
    path = _fc(tmp_path, _replace_line(FC, 4, "ZIP4,duodenum,rat,none,0,mg/kg,1.0a"))
    with pytest.raises(DataError, match=r"fc.csv, line 4, column 'fold_change': value '1.0a' is not a number"):
        read_fold_change(path)


def test_fold_change_empty_value(tmp_path):
    path = _fc(tmp_path, _replace_line(FC, 3, "MT1,duodenum,rat,glycinate,30,mg/kg,"))
    with pytest.raises(DataError, match=r"fc.csv, line 3, column 'fold_change': the fold_change is empty.*Fix: fill in the fold change"):
        read_fold_change(path)
    path = _fc(tmp_path, _replace_line(FC, 5, "ZIP4,duodenum,rat,glycinate,,mg/kg,0.8"))
    with pytest.raises(DataError, match=r"fc.csv, line 5, column 'dose': the dose is empty.*Fix: fill in the dose \(0 for the control"):
        read_fold_change(path)


def test_fold_change_not_positive(tmp_path):
    path = _fc(tmp_path, _replace_line(FC, 5, "ZIP4,duodenum,rat,glycinate,30,mg/kg,-0.32"))
    with pytest.raises(DataError) as e:
        read_fold_change(path)
    msg = str(e.value)
    assert "fc.csv, line 5, column 'fold_change'" in msg
    assert "-0.32 is not positive" in msg
    assert "Fix: fold changes are ratios > 0; if the table is log2 fold change convert with 2**x" in msg
    path = _fc(tmp_path, _replace_line(FC, 3, "MT1,duodenum,rat,glycinate,30,mg/kg,0"))
    with pytest.raises(DataError, match=r"line 3, column 'fold_change': the fold change 0 is not positive"):
        read_fold_change(path)


def test_fold_change_negative_dose(tmp_path):
    path = _fc(tmp_path, _replace_line(FC, 3, "MT1,duodenum,rat,glycinate,-30,mg/kg,2.5"))
    with pytest.raises(DataError, match=r"fc.csv, line 3, column 'dose': the dose -30 is negative.*Fix: doses are amounts of added zinc"):
        read_fold_change(path)


def test_fold_change_spread_not_positive(tmp_path):
    path = _fc(tmp_path, "gene,tissue,dose,dose_unit,fold_change,sd,n\nMT1,liver,0,mg/kg,1,0.1,5\nMT1,liver,5,mg/kg,2,0,5\n")
    with pytest.raises(DataError, match=r"fc.csv, line 3, column 'sd': the sd 0 is not positive.*Fix: give a positive sd"):
        read_fold_change(path)
    path = _fc(tmp_path, "gene,tissue,dose,dose_unit,fold_change,sd,n\nMT1,liver,0,mg/kg,1,0.1,-5\n")
    with pytest.raises(DataError, match=r"line 2, column 'n': the n -5 is not positive"):
        read_fold_change(path)


def test_fold_change_unknown_gene_lists_known_genes(tmp_path):
    path = _fc(tmp_path, _replace_line(FC, 4, "ZIP14,duodenum,rat,none,0,mg/kg,1.0"))
    with pytest.raises(DataError) as e:
        read_fold_change(path)
    msg = str(e.value)
    assert "fc.csv, line 4, column 'gene': unknown gene 'ZIP14'" in msg
    assert "Fix: use one of the known target genes ['MT1', 'MT2', 'ZnT1', 'ZnT2', 'ZIP4', 'ZIP5', 'ZIP10']" in msg


def test_fold_change_reference_gene_is_an_error(tmp_path):
    path = _fc(tmp_path, _replace_line(FC, 2, "gapdh,duodenum,rat,none,0,mg/kg,1.0"))
    with pytest.raises(DataError, match=r"fc.csv, line 2, column 'gene': 'gapdh' is a reference gene: reference genes have no fold change."
                                        r" Fix: remove the row."):
        read_fold_change(path)


def test_fold_change_duplicated_rows(tmp_path):
    # same group after normalisation: alias, case and form spelling differ
    text = FC + "znt1,duodenum,rat,glycinate,30,mg/kg,1.2\nSLC30A1,Duodenum,Rat,Zinc glycinate,30,mg/kg,1.3\n"
    path = _fc(tmp_path, text)
    with pytest.raises(DataError, match=r"fc.csv, line 7: ZnT1 in duodenum \(rat, glycinate, dose 30 mg/kg\) is given twice "
                                        r"\(line 6 and line 7\).*Fix: keep one row per gene"):
        read_fold_change(path)


def test_fold_change_mixed_dose_units(tmp_path):
    path = _fc(tmp_path, _replace_line(FC, 4, "ZIP4,duodenum,rat,none,0,uM,1.0"))
    with pytest.raises(DataError, match=r"fc.csv, line 4, column 'dose_unit': mixed dose units: 'uM' here but 'mg/kg' on line 2."
                                        r" Fix: convert all doses to one unit"):
        read_fold_change(path)


def test_fold_change_dose_unit_missing_unknown_or_disagreeing(tmp_path):
    path = _fc(tmp_path, "gene,tissue,dose,fold_change\nMT1,liver,0,1\n")
    with pytest.raises(DataError, match=r"fc.csv: the dose unit is unknown.*Fix: add a dose_unit column or set dose_unit in the config"):
        read_fold_change(path)
    with pytest.raises(DataError, match=r"fc.csv: unknown dose unit 'g/l' set in the config. Fix: use one of: mg/kg"):
        read_fold_change(path, dose_unit="g/l")
    path = _fc(tmp_path, FC)
    with pytest.raises(DataError, match=r"fc.csv, line 2, column 'dose_unit': the dose_unit column says 'mg/kg' but the config sets "
                                        r"dose_unit = 'uM'.*Fix: correct the column, or remove dose_unit"):
        read_fold_change(path, dose_unit="uM")
    assert read_fold_change(path, dose_unit="ppm").dose_unit == "mg/kg"
    path = _fc(tmp_path, _replace_line(FC, 3, "MT1,duodenum,rat,glycinate,30,mmol,2.5"))
    with pytest.raises(DataError, match=r"line 3, column 'dose_unit': unknown dose unit 'mmol'.*mg/kg \(also ppm"):
        read_fold_change(path)


def test_fold_change_dose_zero_must_be_one(tmp_path):
    path = _fc(tmp_path, _replace_line(FC, 4, "ZIP4,duodenum,rat,none,0,mg/kg,1.1"))
    with pytest.raises(DataError, match=r"fc.csv, line 4, column 'fold_change': the dose-0 row has fold change 1.1, not 1."
                                        r" Fix: fold changes must be relative to the dose-0 control group"):
        read_fold_change(path)
    read_fold_change(_fc(tmp_path, _replace_line(FC, 4, "ZIP4,duodenum,rat,none,0,mg/kg,1.0000001")))


def test_blank_lines_are_counted(tmp_path):
    path = _fc(tmp_path, FC.replace("MT1,duodenum,rat,glycinate,30", "\nMT1,duodenum,rat,glycinate,-30"))
    with pytest.raises(DataError, match=r"line 4, column 'dose': the dose -30 is negative"):
        read_fold_change(path)


# ---------------------------------------------------------------- Ct tables


def test_ct_table_reads(tmp_path):
    t = read_ct(_ct(tmp_path), reference_genes=["gapdh", "beta-actin"])
    df = t.frame
    assert list(df.columns) == ["gene", "sample", "tissue", "species", "form", "dose", "replicate", "ct", "censored",
                                "is_reference", "line"]
    assert t.reference_genes == ("GAPDH", "ACTB")
    assert t.target_genes == ("MT1",)
    assert t.samples == ("c1", "c2", "t1", "t2")
    assert t.dose_unit == "mg/kg" and t.ct_cutoff == 40.0
    assert df["replicate"].tolist()[:4] == ["1", "1", "1", "2"]
    assert df["line"].tolist() == list(range(2, 17))
    assert df["is_reference"].sum() == 8
    assert df["censored"].tolist() == [False] * 10 + [True] + [False] * 4
    assert df["ct"].dtype == float and df["censored"].dtype == bool and df["dose"].dtype == float


def test_ct_censoring_undetermined_and_above_cutoff(tmp_path):
    text = CT.replace("MT1,c2,liver,rat,none,0,mg/kg,24.9", "MT1,c2,liver,rat,none,0,mg/kg,41.5")
    text = text.replace("MT1,t2,liver,rat,sulfate,60,mg/kg,22.2", "MT1,t2,liver,rat,sulfate,60,mg/kg,No Ct")
    text = text.replace("MT1,t2,liver,rat,sulfate,60,mg/kg,21.8", "MT1,t2,liver,rat,sulfate,60,mg/kg,40")
    df = read_ct(_ct(tmp_path, text), reference_genes=REFS).frame
    by_line = df.set_index("line")
    for line in (8, 12, 15):  # 41.5 > cutoff 40, Undetermined, No Ct
        assert by_line.loc[line, "censored"] and math.isnan(by_line.loc[line, "ct"]), line
    assert not by_line.loc[16, "censored"] and by_line.loc[16, "ct"] == 40.0  # at the cutoff: observed
    assert df["censored"].sum() == 3
    df = read_ct(_ct(tmp_path, text), reference_genes=REFS, ct_cutoff=42.0).frame
    assert df.set_index("line").loc[8, "ct"] == 41.5


def test_ct_bad_cutoff_and_reference_arguments(tmp_path):
    path = _ct(tmp_path)
    with pytest.raises(ValueError, match="ct_range"):
        read_ct(path, reference_genes=REFS, ct_cutoff=55.0)
    with pytest.raises(ValueError, match="ct_range"):
        read_ct(path, reference_genes=REFS, ct_cutoff=40.0, ct_range=(40.0, 50.0))
    with pytest.raises(ValueError, match="at least one reference gene"):
        read_ct(path, reference_genes=[])
    with pytest.raises(ValueError, match="target gene MT1"):
        read_ct(path, reference_genes=["GAPDH", "mt-1"])


def test_ct_missing_column(tmp_path):
    path = _ct(tmp_path, "gene,tissue,dose,dose_unit,Cq\nGAPDH,liver,0,mg/kg,20\n")
    with pytest.raises(DataError, match=r"ct.csv: required column\(s\) \['sample'\] missing \(columns are \['gene', 'tissue', 'dose', "
                                        r"'dose_unit', 'Cq'\]\)\. Fix: add or rename"):
        read_ct(path, reference_genes=REFS)


def test_ct_cq_alias_and_user_reference_gene(tmp_path):
    text = CT.replace("ACTB,", "Hprt,").replace(",ct\n", ",Cq\n")
    t = read_ct(_ct(tmp_path, text), reference_genes=["GAPDH", "hprt"])
    assert t.reference_genes == ("GAPDH", "hprt")
    assert set(t.frame.loc[t.frame["is_reference"], "gene"]) == {"GAPDH", "hprt"}


def test_ct_non_numeric(tmp_path):
    path = _ct(tmp_path, _replace_line(CT, 4, "MT1,c1,liver,rat,none,0,mg/kg,26.0?"))
    with pytest.raises(DataError, match=r"ct.csv, line 4, column 'ct': value '26.0\?' is not a Ct\. Fix: write a number.*or Undetermined"):
        read_ct(path, reference_genes=REFS)
    path = _ct(tmp_path, _replace_line(CT, 4, "MT1,c1,liver,rat,none,0,mg/kg,nan"))
    with pytest.raises(DataError, match=r"line 4, column 'ct': value 'nan' is not a Ct"):
        read_ct(path, reference_genes=REFS)


def test_ct_outside_plausible_range(tmp_path):
    for line, value in ((3, "0.5"), (9, "55")):
        old = CT.splitlines()[line - 1]
        path = _ct(tmp_path, _replace_line(CT, line, old.rsplit(",", 1)[0] + "," + value))
        with pytest.raises(DataError, match=rf"ct.csv, line {line}, column 'ct': the Ct {value} is outside the plausible range 5-50\. "
                                            r"Fix: check the well.*write Undetermined"):
            read_ct(path, reference_genes=REFS)


def test_ct_empty_cell(tmp_path):
    path = _ct(tmp_path, _replace_line(CT, 7, "ACTB,c2,liver,rat,none,0,mg/kg,"))
    with pytest.raises(DataError, match=r"ct.csv, line 7, column 'ct': the Ct is empty\. "
                                        r"Fix: write Undetermined if the well did not cross the threshold, or delete the row"):
        read_ct(path, reference_genes=REFS)


def test_ct_reference_gene_missing_for_a_sample(tmp_path):
    lines = CT.splitlines()
    text = "\n".join(lines[:5] + lines[6:]) + "\n"  # drop GAPDH of c2 (was line 6)
    path = _ct(tmp_path, text)
    with pytest.raises(DataError, match=r"ct.csv, line 6: sample 'c2' has no GAPDH well\. Fix: add the reference gene wells or drop the sample"):
        read_ct(path, reference_genes=REFS)


def test_ct_reference_gene_all_censored(tmp_path):
    path = _ct(tmp_path, _replace_line(CT, 10, "ACTB,t1,liver,rat,sulfate,60,mg/kg,Undetermined"))
    with pytest.raises(DataError, match=r"ct.csv, line 10: every ACTB well of sample 't1' is censored.*Fix: a reference gene must amplify"):
        read_ct(path, reference_genes=REFS)


def test_ct_control_group_missing(tmp_path):
    text = CT + "GAPDH,k1,kidney,rat,sulfate,60,mg/kg,20\nACTB,k1,kidney,rat,sulfate,60,mg/kg,21\nMT1,k1,kidney,rat,sulfate,60,mg/kg,25\n"
    path = _ct(tmp_path, text)
    with pytest.raises(DataError, match=r"ct.csv, line 17: no control group \(dose 0\) for tissue kidney, species rat; the ddCt reference "
                                        r"needs one\. Fix: add the dose-0 samples"):
        read_ct(path, reference_genes=REFS)


def test_ct_duplicated_wells(tmp_path):
    text = CT.replace(",dose_unit,ct\n", ",dose_unit,ct,replicate\n")
    lines = text.splitlines()
    lines[1:] = [f"{row},{k}" for k, row in enumerate(lines[1:])]
    ok = read_ct(_ct(tmp_path, "\n".join(lines) + "\n", "ok.csv"), reference_genes=REFS)
    assert ok.frame["replicate"].tolist()[:4] == ["0", "1", "2", "3"]
    lines[4] = lines[4].rsplit(",", 1)[0] + ",a"  # MT1 of c1 (lines 4 and 5): replicates a and a
    lines[3] = lines[3].rsplit(",", 1)[0] + ",a"
    path = _ct(tmp_path, "\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"ct.csv, line 5: gene MT1, sample 'c1', replicate 'a' is given twice \(line 4 and line 5\)\. "
                                        r"Fix: give each technical replicate its own replicate label"):
        read_ct(path, reference_genes=REFS)


def test_ct_unknown_gene_lists_known_genes(tmp_path):
    path = _ct(tmp_path, _replace_line(CT, 4, "Mt3,c1,liver,rat,none,0,mg/kg,26.2"))
    with pytest.raises(DataError) as e:
        read_ct(path, reference_genes=REFS)
    msg = str(e.value)
    assert "ct.csv, line 4, column 'gene': unknown gene 'Mt3'" in msg
    assert "known target genes ['MT1', 'MT2', 'ZnT1', 'ZnT2', 'ZIP4', 'ZIP5', 'ZIP10']" in msg
    assert "configured reference genes ['GAPDH', 'ACTB']" in msg


def test_ct_registry_reference_gene_not_configured(tmp_path):
    path = _ct(tmp_path)
    with pytest.raises(DataError, match=r"ct.csv, line 3, column 'gene': 'ACTB' is a reference gene but not one of reference_genes "
                                        r"\['GAPDH'\]\. Fix: add it to reference_genes"):
        read_ct(path, reference_genes=["GAPDH"])


def test_ct_mixed_dose_units(tmp_path):
    path = _ct(tmp_path, _replace_line(CT, 9, "GAPDH,t1,liver,rat,sulfate,60,uM,20.5"))
    with pytest.raises(DataError, match=r"ct.csv, line 9, column 'dose_unit': mixed dose units: 'uM' here but 'mg/kg' on line 2\. "
                                        r"Fix: convert all doses to one unit"):
        read_ct(path, reference_genes=REFS)


def test_ct_sample_with_inconsistent_labels(tmp_path):
    path = _ct(tmp_path, _replace_line(CT, 11, "MT1,t1,liver,rat,glycinate,60,mg/kg,24.0"))
    with pytest.raises(DataError, match=r"ct.csv, line 11: sample 't1' has tissue=liver, species=rat, form=glycinate, dose=60 here but "
                                        r"tissue=liver, species=rat, form=sulfate, dose=60 on line 9\. Fix: all wells of a sample"):
        read_ct(path, reference_genes=REFS)


def test_ct_parquet_round_trip(tmp_path):
    csv = _ct(tmp_path)
    raw = pd.read_csv(csv, dtype=str, keep_default_na=False)
    raw.to_parquet(tmp_path / "ct.parquet", index=False)
    a = read_ct(csv, reference_genes=REFS)
    b = read_ct(tmp_path / "ct.parquet", reference_genes=REFS)
    pd.testing.assert_frame_equal(a.frame, b.frame)
    assert b.dose_unit == a.dose_unit and b.reference_genes == a.reference_genes


# ---------------------------------------------------------------- 2^-ddCt


def test_livak_fold_change_by_hand(tmp_path):
    text = CT + (
        "ZIP4,c1,liver,rat,none,0,mg/kg,28.0\n"
        "ZIP4,c2,liver,rat,none,0,mg/kg,27.0\n"
        "ZIP4,t1,liver,rat,sulfate,60,mg/kg,Undetermined\n"
        "ZIP4,t2,liver,rat,sulfate,60,mg/kg,29.0\n"
    )
    out = livak_fold_change(read_ct(_ct(tmp_path, text), reference_genes=REFS))
    assert list(out.columns) == ["gene", "tissue", "species", "form", "dose", "fold_change", "ddct", "n_samples"]
    # reference level = mean of GAPDH and ACTB Ct: c1 21, c2 20, t1 21, t2 19
    # MT1 dCt: c1 (26.0 + 26.2)/2 - 21 = 5.1, c2 24.9 - 20 = 4.9 -> control 5.0
    #          t1 24.0 - 21 = 3.0 (the Undetermined replicate is left out), t2 (22.2 + 21.8)/2 - 19 = 3.0 -> 3.0
    # ZIP4 dCt: c1 7, c2 7 -> 7; t1 all censored (left out), t2 29 - 19 = 10 -> ddCt 3
    assert out[["gene", "form", "dose"]].values.tolist() == [["MT1", "none", 0.0], ["MT1", "sulfate", 60.0],
                                                             ["ZIP4", "none", 0.0], ["ZIP4", "sulfate", 60.0]]
    np.testing.assert_allclose(out["ddct"], [0.0, 3.0 - 5.0, 0.0, 10.0 - 7.0], atol=1e-12)
    np.testing.assert_allclose(out["fold_change"], [1.0, 4.0, 1.0, 0.125], rtol=1e-12)
    assert out["n_samples"].tolist() == [2, 2, 2, 1]
    assert set(out["tissue"]) == {"liver"} and set(out["species"]) == {"rat"}


def test_livak_control_all_censored_gives_nan(tmp_path):
    text = CT + "ZIP5,c1,liver,rat,none,0,mg/kg,Undetermined\nZIP5,c2,liver,rat,none,0,mg/kg,45\nZIP5,t1,liver,rat,sulfate,60,mg/kg,30\n"
    out = livak_fold_change(read_ct(_ct(tmp_path, text), reference_genes=REFS)).set_index("gene")
    assert math.isnan(out.loc["ZIP5", "fold_change"]) and out.loc["ZIP5", "n_samples"] == 1
    assert out.loc["ZIP5", "form"] == "sulfate"

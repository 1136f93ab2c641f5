"""Canonical gene names: the target genes the models know and the usual qPCR reference genes.

Gene names are a data concern: readers map whatever a table says (``SLC30A1``, ``znt1``,
``MT-I``) to one canonical spelling, and the models refer to genes by that spelling only.
"""

from collections.abc import Sequence


TARGET_GENES: dict[str, str] = {
    "MT1": "metallothionein 1, MTF-1 target (also the single chicken metallothionein 'MT')",
    "MT2": "metallothionein 2, MTF-1 target",
    "ZnT1": "SLC30A1, plasma-membrane zinc exporter, induced by MTF-1",
    "ZnT2": "SLC30A2, vesicular zinc exporter, induced by MTF-1",
    "ZIP4": "SLC39A4, apical zinc importer of enterocytes, repressed at high zinc",
    "ZIP5": "SLC39A5, basolateral zinc importer of enterocytes",
    "ZIP10": "SLC39A10, zinc importer, repressed by MTF-1",
}
"""Canonical target gene name -> one-line description."""

REFERENCE_GENES: tuple[str, ...] = ("GAPDH", "ACTB", "B2M", "HPRT1", "RPL13A", "TBP", "YWHAZ", "PPIA", "18S")
"""Canonical names of the common qPCR reference (housekeeping) genes."""

ALIASES: dict[str, str] = {
    "MT": "MT1",
    "MT-1": "MT1",
    "MT1A": "MT1",
    "MT-I": "MT1",
    "MT-2": "MT2",
    "MT2A": "MT2",
    "MT-II": "MT2",
    "SLC30A1": "ZnT1",
    "SLC30A2": "ZnT2",
    "SLC39A4": "ZIP4",
    "SLC39A5": "ZIP5",
    "SLC39A10": "ZIP10",
    "BETA-ACTIN": "ACTB",
    "B-ACTIN": "ACTB",
    "ACTINB": "ACTB",
    "RN18S": "18S",
    "18S RRNA": "18S",
}
"""Upper-cased alias -> canonical gene name."""

_CANONICAL: dict[str, str] = {name.upper(): name for name in (*TARGET_GENES, *REFERENCE_GENES)}


def _key(name: str) -> str:
    return " ".join(str(name).split()).upper()


def canonical_gene(name: str, extra_reference: Sequence[str] = ()) -> str | None:
    """Canonical spelling of a gene name, or None if the name is unknown.

    Parameters
    ----------
    name : gene name as written in a table; surrounding blanks are ignored and case does not matter.
    extra_reference : user-named reference genes (e.g. from the config); a name that is neither a
        canonical name nor an alias but matches one of these (case-insensitively) is returned as
        spelled in ``extra_reference``.

    Returns
    -------
    str or None
        The canonical name (a key of ``TARGET_GENES``, an entry of ``REFERENCE_GENES`` or of
        ``extra_reference``), or None.
    """
    key = _key(name)
    if not key:
        return None
    if key in _CANONICAL:
        return _CANONICAL[key]
    if key in ALIASES:
        return ALIASES[key]
    for ref in extra_reference:
        if _key(ref) == key:
            return " ".join(str(ref).split())
    return None

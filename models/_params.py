"""Parameters of the zinc flux model: a named pytree with units in the field names, and priors."""

import dataclasses
import math

import equinox as eqx
import numpyro.distributions as dist
from jaxtyping import ArrayLike


class ZincFluxParams(eqx.Module):
    r"""Kinetic constants of the zinc flux model (model A), one scalar per field.

    Every field may also be an array with a leading batch axis (for example one value per cell);
    the model is then ``vmap``-ed over it. Concentrations of cytosolic species are per litre of
    cytosol (nM), extracellular zinc is in uM, time in minutes. See
    :class:`models.ZincFluxRapidEquilibrium` for the equations and ``docs/models.md`` for the
    priors and their sources.

    Attributes
    ----------
    zc_rest_nM : resting free cytosolic zinc $Z_c^*$ (nM).
    zip_vmax_nM_per_min : ZIP maximal influx $V_{zip}$ (nM/min of total cytosolic zinc).
    zip_km_uM : ZIP half-saturation constant in extracellular zinc $K_{zip}$ (uM).
    znt_km_nM : ZnT efflux half-saturation constant in cytosolic zinc $K_{znt}$ (nM).
    seq_vmax_nM_per_min : maximal sequestration into stores $V_{seq}$ (nM/min).
    seq_km_nM : sequestration half-saturation constant $K_{seq}$ (nM).
    store_rest_nM : resting store zinc $Z_s^*$ (nM, per cytosol volume).
    release_stim_per_min : stimulus-triggered store release rate constant $k_{stim}$ (1/min).
    stim_decay_min : decay time of the stimulus drive $\tau_s$ (min).
    mt_sites_nM : metallothionein zinc-site capacity $S_{MT}$ (nM).
    mt_kd_nM : dissociation constant of the exchangeable MT sites $K_{MT}$ (nM).
    probe_total_nM : intracellular probe concentration $P$ (nM).
    probe_kd_nM : probe-zinc dissociation constant $K_P$ (nM).
    iono_perm_per_min : ionophore exchange rate constant $p_{ion}$ (1/min).
    tpen_rate_per_min : TPEN chelation rate constant $k_{tpen}$ (1/min).
    """

    zc_rest_nM: ArrayLike
    zip_vmax_nM_per_min: ArrayLike
    zip_km_uM: ArrayLike
    znt_km_nM: ArrayLike
    seq_vmax_nM_per_min: ArrayLike
    seq_km_nM: ArrayLike
    store_rest_nM: ArrayLike
    release_stim_per_min: ArrayLike
    stim_decay_min: ArrayLike
    mt_sites_nM: ArrayLike
    mt_kd_nM: ArrayLike
    probe_total_nM: ArrayLike
    probe_kd_nM: ArrayLike
    iono_perm_per_min: ArrayLike
    tpen_rate_per_min: ArrayLike


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """Documentation and default prior of one kinetic constant.

    The default prior is ``LogNormal(log(median), log_sd)``; ``source`` says where the median
    and width come from.
    """

    name: str
    unit: str
    median: float
    log_sd: float
    meaning: str
    source: str

    def prior(self) -> dist.Distribution:
        """The default prior as a numpyro distribution."""
        return dist.LogNormal(math.log(self.median), self.log_sd)


PARAM_SPECS: dict[str, ParamSpec] = {
    s.name: s
    for s in [
        ParamSpec(
            "zc_rest_nM", "nM", 0.5, 1.0, "resting free cytosolic zinc",
            "Lo et al. 2020 (eLife 9:e61050) report 80-210 pM in replete medium with a FRET sensor; "
            "FluoZin-3 studies report 0.1-1 nM. Median 0.5 nM, one log unit covers 0.06-4 nM at 95%.",
        ),
        ParamSpec(
            "zip_vmax_nM_per_min", "nM/min", 200.0, 1.0, "ZIP maximal influx",
            "Poorly established for mammalian ZIPs. Chosen so that a 10-30 uM ZnCl2 step raises free "
            "zinc by tens of nM over minutes against ~1 uM of buffer sites (order of magnitude).",
        ),
        ParamSpec(
            "zip_km_uM", "uM", 3.0, 0.7, "ZIP half saturation in extracellular zinc",
            "ZIP2 ~3 uM (Gaither & Eide 2000), ZIP4 ~3 uM (Mao et al. 2007), ZIP8 0.3-0.6 uM.",
        ),
        ParamSpec(
            "znt_km_nM", "nM", 50.0, 1.0, "ZnT efflux half saturation in cytosolic zinc",
            "Not measured for ZnT1 in cells; bacterial YiiP works in the uM range. Wide prior.",
        ),
        ParamSpec(
            "seq_vmax_nM_per_min", "nM/min", 100.0, 1.0, "maximal sequestration into stores",
            "Order of magnitude only: vesicular ZnT and ER uptake refill stores over minutes.",
        ),
        ParamSpec(
            "seq_km_nM", "nM", 50.0, 1.0, "sequestration half saturation",
            "As for znt_km_nM; no direct measurement.",
        ),
        ParamSpec(
            "store_rest_nM", "nM", 5000.0, 1.0, "resting store zinc (per cytosol volume)",
            "Total cellular zinc is ~200 uM, mostly protein bound; the releasable pool is taken as "
            "a few uM per cytosol volume (order of magnitude).",
        ),
        ParamSpec(
            "release_stim_per_min", "1/min", 0.2, 1.0, "stimulus-triggered store release",
            "LPS / anti-CD3/CD28 zinc waves peak within ~1 min (Yu et al. 2011, JEM 208:775).",
        ),
        ParamSpec(
            "stim_decay_min", "min", 2.0, 0.7, "decay time of the stimulus drive",
            "Zinc waves decay over minutes (Yu et al. 2011; Haase et al. 2008).",
        ),
        ParamSpec(
            "mt_sites_nM", "nM", 2000.0, 0.7, "exchangeable MT zinc-site capacity",
            "MT is low-uM in most cells with 7 zinc sites; only the weaker sites exchange in the "
            "labile range (Krezel & Maret 2007, JACS 129:10911).",
        ),
        ParamSpec(
            "mt_kd_nM", "nM", 20.0, 1.0, "Kd of exchangeable MT sites",
            "Weakest MT site log K 7.7 (Kd ~20 nM), Krezel & Maret 2007.",
        ),
        ParamSpec(
            "probe_total_nM", "nM", 500.0, 0.5, "intracellular probe concentration",
            "AM loading at 1-5 uM gives sub-uM to uM intracellular dye; the scale of all fluxes is "
            "only identifiable relative to this buffer (see docs/models.md).",
        ),
        ParamSpec(
            "probe_kd_nM", "nM", 15.0, 0.3, "probe-zinc Kd",
            "Default FluoZin-3, 8.9-15 nM in the literature; the fit centres it on the Kd given in "
            "the protocol file and keeps log sd 0.3 for the spread of literature values.",
        ),
        ParamSpec(
            "iono_perm_per_min", "1/min", 1.0, 1.0, "ionophore exchange rate constant",
            "Pyrithione with saturating ZnCl2 saturates the probe within tens of seconds in published "
            "calibrations, so the ionophore flux p (1000 Zo - Zc) must dwarf ZnT efflux (~5 uM/min); "
            "a smaller p makes the Fmax plateau a knife-edge balance of influx against efflux.",
        ),
        ParamSpec(
            "tpen_rate_per_min", "1/min", 100.0, 1.0, "TPEN chelation rate constant",
            "TPEN quenches the probe within 1-3 min despite ~100-fold buffering by MT and probe.",
        ),
    ]
}

assert tuple(PARAM_SPECS) == tuple(f.name for f in dataclasses.fields(ZincFluxParams))


def default_params(**overrides: float) -> ZincFluxParams:
    """Parameters at the prior medians, with optional overrides by field name."""
    values = {name: spec.median for name, spec in PARAM_SPECS.items()}
    unknown = set(overrides) - set(values)
    if unknown:
        raise ValueError(f"Unknown parameter(s) {sorted(unknown)}; known: {list(values)}.")
    values.update(overrides)
    return ZincFluxParams(**values)


def default_priors(*, probe_kd_nM: float | None = None) -> dict[str, dist.Distribution]:
    """Default prior for every kinetic constant, keyed by field name.

    Parameters
    ----------
    probe_kd_nM
        If given (the Kd named in the protocol file), the probe Kd prior is centred there.
    """
    priors = {name: spec.prior() for name, spec in PARAM_SPECS.items()}
    if probe_kd_nM is not None:
        priors["probe_kd_nM"] = dist.LogNormal(math.log(probe_kd_nM), PARAM_SPECS["probe_kd_nM"].log_sd)
    return priors

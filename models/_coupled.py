r"""Model C: the coupled homeostasis loop, fast zinc fluxes and slow MTF-1 feedback in one cell.

Built with the public model API (:class:`models.ODEModel`): no private path. Time in minutes.

States
------
$u = \ln(Z_c/\mathrm{nM})$ (free cytosolic zinc), $Z_s$ (store zinc, nM), and for each gene
$g \in \{\mathrm{MT1}, \mathrm{ZnT1}, \mathrm{ZIP4}\}$ the log mRNA $\ell_g$ and log protein $\pi_g$,
both relative to their steady state in the reference medium ($Z_o = z_\text{ref}$).

Equations
---------
Protein scales the capacities of model A: MT buffer sites $S_{MT}(t) = S_{MT}^{ref} e^{\pi_{MT1}}$,
efflux $V_{znt}(t) = V_{znt}^{ref} e^{\pi_{ZnT1}}$, influx $V_{zip}(t) = V_{zip}^{ref} e^{\pi_{ZIP4}}$.
With the fluxes of model A (no stimulus, ionophore or TPEN),

$$\frac{du}{dt} = \frac{J_{zip} - J_{znt} - J_{seq} + J_{rel} - \dot S_{MT}\,\frac{Z_c}{K_{MT} + Z_c}}{Z_c\,\beta(Z_c, S_{MT})},\qquad
\frac{dZ_s}{dt} = J_{seq} - J_{rel},$$

where the $\dot S_{MT}$ term is the zinc that newly made apo-MT takes from the free pool (rapid
equilibrium, total exchangeable zinc conserved by binding), and $\beta$ is model A's buffering
factor with $S_{MT}(t)$. Transcription follows model B's MTF-1 regulation
($a = Z_c^n/(K_M^n + Z_c^n)$; MT1 and ZnT1 induced $s_g = 1 + A_g a$, ZIP4 repressed
$s_g = 1/(1 + A_g a)$); translation is first order:

$$\frac{d\ell_g}{dt} = \delta_g\Big(\frac{s_g(Z_c)}{s_g(Z^*)}e^{-\ell_g} - 1\Big),\qquad
\frac{d\pi_g}{dt} = \kappa_g\big(e^{\ell_g - \pi_g} - 1\big).$$

$V_{znt}^{ref}$ and the store leak are fixed, as in model A, by the resting steady state in the
reference medium: $(Z_c, Z_s, \ell, \pi) = (Z^*, Z_s^*, 0, 0)$ at $Z_o = z_\text{ref}$.

Inputs and start
----------------
Medium zinc is $Z_o = z_\text{before}$ for $t < t_\text{switch}$ and $z_\text{after}$ after (data-set
constants ``zo_before_uM``, ``zo_after_uM``, ``t_switch_min``). Every solve starts
pre-equilibrated: at the steady state of its own parameters in the medium it was cultured in
($z_\text{before}$), found by Newton with an integration fallback and differentiated implicitly.
Cells cultured in the reference medium start exactly at the reference state; cells cultured
zinc-deficient start with more ZIP4 and less MT and ZnT1.

Two time scales
---------------
Free zinc relaxes in minutes (transport against ~1 uM of buffer sites), mRNA in hours
($t_{1/2}$ 3-6 h), protein in about half a day: the Jacobian's eigenvalues span 2-3 orders of
magnitude. The solver default is Kvaerno5 (implicit): over a 24 h time course an explicit solver
is held to minute-sized steps by stability, not accuracy (see ``docs/models.md`` for the step
counts and the comparison with a tight SciPy Radau solve).

Observables
-----------
``zc_nM`` (calibrated free zinc, log-normal noise ``sigma_zc``) and ``MT1_fc``, ``ZnT1_fc``,
``ZIP4_fc`` (mRNA fold change relative to the reference medium, log-normal noise ``sigma_fc``).

References: model A and model B (``docs/models.md``) for every flux and regulation term and
their priors; protein half-lives are order-of-magnitude (MT protein hours to a day, Klaassen et
al. 1999, Annu Rev Pharmacol Toxicol 39:267; ZIP4 protein is removed within hours of zinc
repletion, Kim et al. 2004, J Biol Chem 279:4523).
"""

import math

import jax
import jax.numpy as jnp
import numpyro.distributions as dist

from ._custom import LogNormal, Observable, ODEModel, ODESolver, Parameter, PreEquilibrated, State
from ._params import PARAM_SPECS, ParamSpec
from ._steady import SteadyStateConfig
from ._transcription import GENE_SPECS, TRANSCRIPTION_SPECS


COUPLED_GENES = ("MT1", "ZnT1", "ZIP4")
"""Genes of model C and the capacity each sets: MT buffer sites, ZnT efflux, ZIP influx."""

FLUX_PARAMS = ("zc_rest_nM", "zip_vmax_nM_per_min", "zip_km_uM", "znt_km_nM", "seq_vmax_nM_per_min", "seq_km_nM",
               "store_rest_nM", "mt_sites_nM", "mt_kd_nM", "probe_total_nM", "probe_kd_nM")

COUPLED_SPECS: dict[str, ParamSpec] = {
    s.name: s
    for s in [
        ParamSpec("zo_ref_uM", "uM", 2.0, 0.5, "medium zinc of the reference state (all expression levels 1)",
                  "serum-supplemented media hold about 1-5 uM zinc; fixed by default (a choice of reference)"),
        *[ParamSpec(f"protein_half_life_h_{g}", "h", 12.0, 1.0, f"{g} protein half-life",
                    "order of magnitude: MT protein hours to a day (Klaassen et al. 1999), ZIP4 protein removed within "
                    "hours of zinc repletion (Kim et al. 2004); wide") for g in COUPLED_GENES],
        ParamSpec("sigma_zc", "1 (log scale)", 0.1, 1.0, "noise of calibrated free-zinc measurements",
                  "calibrated probe traces scatter by about 5-20%"),
        ParamSpec("sigma_fc", "1 (log scale)", 0.2, 1.0, "noise of qPCR fold changes (log scale)",
                  "biological plus technical qPCR scatter of 10-40%"),
    ]
}
"""Parameters of model C beyond those of models A and B."""

COUPLED_DEFAULT_FIXED = ("seq_vmax_nM_per_min", "seq_km_nM", "store_rest_nM", "mt_kd_nM", "probe_total_nM",
                         "probe_kd_nM", "zo_ref_uM")
"""Fixed at their prior medians by default (not identifiable from free zinc and fold changes; see model A)."""


def _spec(name: str) -> ParamSpec:
    for table in (PARAM_SPECS, TRANSCRIPTION_SPECS, COUPLED_SPECS):
        if name in table:
            return table[name]
    raise KeyError(name)


def _mm(vmax, km, x):
    return vmax * x / (km + x)


def _log_drive(zc, p):
    """Ln s_g(Zc) for MT1, ZnT1 (induced) and ZIP4 (repressed), as in model B."""
    log_a = jax.nn.log_sigmoid(p["mtf1_hill"] * (jnp.log(zc) - jnp.log(p["mtf1_k_nM"])))
    a = jnp.exp(log_a)
    return (jnp.log1p(p["amplitude_MT1"] * a), jnp.log1p(p["amplitude_ZnT1"] * a), -jnp.log1p(p["amplitude_ZIP4"] * a))


def medium_zinc_uM(t, p):
    """Medium zinc: ``zo_before_uM`` before ``t_switch_min``, ``zo_after_uM`` from then on."""
    return jnp.where(t < p["t_switch_min"], p["zo_before_uM"], p["zo_after_uM"])


def coupled_vector_field(t, y, p):
    """Right-hand side of model C (minutes); see the module docstring for the equations."""
    zr = p["zc_rest_nM"]
    zc = jnp.exp(jnp.clip(y["log_zc"], -40.0, 25.0))
    prot = {g: jnp.exp(jnp.clip(y[f"prot_{g}"], -30.0, 30.0)) for g in COUPLED_GENES}
    # reference-state rates (model A's derived_rates at the reference medium)
    j_zip_ref = _mm(p["zip_vmax_nM_per_min"], p["zip_km_uM"], p["zo_ref_uM"])
    znt_vmax_ref = j_zip_ref * (p["znt_km_nM"] + zr) / zr
    leak = _mm(p["seq_vmax_nM_per_min"], p["seq_km_nM"], zr) / p["store_rest_nM"]
    zo = medium_zinc_uM(t, p)
    j_zip = _mm(p["zip_vmax_nM_per_min"] * prot["ZIP4"], p["zip_km_uM"], zo)
    j_znt = _mm(znt_vmax_ref * prot["ZnT1"], p["znt_km_nM"], zc)
    j_seq = _mm(p["seq_vmax_nM_per_min"], p["seq_km_nM"], zc)
    j_rel = leak * y["zs_nM"]
    # transcription (relative to the reference state) and translation
    drive = _log_drive(zc, p)
    drive_ref = _log_drive(jnp.asarray(zr, dtype=zc.dtype), p)
    out = {}
    for g, d, d_ref in zip(COUPLED_GENES, drive, drive_ref):
        ell = jnp.clip(y[f"mrna_{g}"], -30.0, 30.0)
        delta = math.log(2.0) / (GENE_SPECS[g].half_life_h * 60.0)
        kappa = math.log(2.0) / (p[f"protein_half_life_h_{g}"] * 60.0)
        out[f"mrna_{g}"] = delta * (jnp.exp(d - d_ref - ell) - 1.0)
        out[f"prot_{g}"] = kappa * (jnp.exp(ell - y[f"prot_{g}"]) - 1.0)
    s_mt = p["mt_sites_nM"] * prot["MT1"]
    ds_mt = s_mt * out["prot_MT1"]
    beta = 1.0 + s_mt * p["mt_kd_nM"] / (p["mt_kd_nM"] + zc) ** 2 + p["probe_total_nM"] * p["probe_kd_nM"] / (p["probe_kd_nM"] + zc) ** 2
    out["log_zc"] = (j_zip - j_znt - j_seq + j_rel - ds_mt * zc / (p["mt_kd_nM"] + zc)) / (zc * beta)
    out["zs_nM"] = j_seq - j_rel
    return out


def coupled_model(*, fixed=COUPLED_DEFAULT_FIXED, solver: ODESolver | None = None,
                  steady: SteadyStateConfig | None = None) -> ODEModel:
    """Model C as an :class:`ODEModel` (time in minutes), ready for ``zinckin fit``.

    Parameters
    ----------
    fixed : names fixed at their prior medians (default :data:`COUPLED_DEFAULT_FIXED`).
    solver : ODE settings (default Kvaerno5, rtol 1e-8, atol 1e-10).
    steady : settings of the pre-equilibration (default: tol 1e-9, fallback horizon 1e6 min).
    """
    names = [*FLUX_PARAMS, "mtf1_k_nM", "mtf1_hill", "zo_ref_uM",
             *[f"protein_half_life_h_{g}" for g in COUPLED_GENES], "sigma_zc", "sigma_fc"]
    params = []
    for n in names:
        s = _spec(n)
        params.append(Parameter(n, s.unit, s.median if n in fixed else dist.LogNormal(math.log(s.median), s.log_sd), s.meaning))
    for g in COUPLED_GENES:
        s = GENE_SPECS[g]
        n = f"amplitude_{g}"
        prior = s.amplitude_median if n in fixed else dist.LogNormal(math.log(s.amplitude_median), s.amplitude_log_sd)
        params.append(Parameter(n, "1", prior, f"MTF-1 amplitude of {g} ({s.regulation})"))
    params += [Parameter("zo_before_uM", "uM", 2.0, "medium zinc before the switch (culture medium; data-set constant)"),
               Parameter("zo_after_uM", "uM", 2.0, "medium zinc from t_switch_min on (data-set constant)"),
               Parameter("t_switch_min", "min", 0.0, "time of the medium change (data-set constant)")]
    states = [State("log_zc", "ln nM", description="ln free cytosolic zinc"), State("zs_nM", "nM", description="store zinc")]
    states += [State(f"mrna_{g}", "ln fold", initial=0.0, description=f"ln {g} mRNA / reference") for g in COUPLED_GENES]
    states += [State(f"prot_{g}", "ln fold", initial=0.0, description=f"ln {g} protein / reference") for g in COUPLED_GENES]

    def guess(p):
        return {"log_zc": jnp.log(p["zc_rest_nM"]), "zs_nM": p["store_rest_nM"],
                **{f"mrna_{g}": 0.0 for g in COUPLED_GENES}, **{f"prot_{g}": 0.0 for g in COUPLED_GENES}}

    observables = [Observable("zc_nM", lambda t, y, p: jnp.exp(y["log_zc"]), LogNormal("sigma_zc"), "nM")]
    observables += [Observable(f"{g}_fc", lambda t, y, p, g=g: jnp.exp(y[f"mrna_{g}"]), LogNormal("sigma_fc"), "1")
                    for g in COUPLED_GENES]
    return ODEModel(
        name="coupled_homeostasis", time_unit="min", states=states, parameters=params,
        vector_field=coupled_vector_field, observables=observables,
        initial=PreEquilibrated(guess=guess, time=-math.inf, config=steady or SteadyStateConfig(t_max=1e6, max_steps=65_536)),
        solver=solver or ODESolver("kvaerno5", rtol=1e-8, atol=1e-10),
        description="Model C: zinc fluxes (model A) with MTF-1 driven MT1, ZnT1, ZIP4 expression (model B) feeding back.",
    )

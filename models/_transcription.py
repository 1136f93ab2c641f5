r"""Model B: MTF-1-driven transcription of zinc homeostasis genes against dietary zinc (hours).

Names of genes are the canonical ones of ``data.TARGET_GENES`` (``MT1``, ``ZnT1``, ``ZIP4`` ...).
"""

import dataclasses
import math

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from jaxtyping import Array, ArrayLike, Bool, Float

from ._custom import LogNormal, Observable, ODEModel, Parameter, PreEquilibrated, State
from ._params import ParamSpec
from ._steady import SteadyState, SteadyStateConfig, steady_state


REGULATION_KINDS = ("induced", "repressed", "biphasic")
STATE_CLIP = 50.0  # bound on |ln| of relative zinc and mRNA levels inside the vector field


@dataclasses.dataclass(frozen=True)
class GeneSpec:
    r"""How a gene responds to MTF-1, its default prior and its mRNA half-life.

    ``amplitude_median``/``amplitude_log_sd`` give the log-normal prior of the gene's MTF-1
    amplitude $A_g$; ``half_life_h`` sets $\delta_g = \ln 2 / t_{1/2}$, which only shapes time
    courses (steady-state fold changes do not depend on it).
    """

    name: str
    regulation: str
    amplitude_median: float
    amplitude_log_sd: float
    half_life_h: float
    meaning: str
    source: str


GENE_SPECS: dict[str, GeneSpec] = {
    g.name: g
    for g in [
        GeneSpec("MT1", "induced", 10.0, 1.0, 3.0, "metallothionein 1, the classic MTF-1 target",
                 "MT mRNA rises 5-50 fold with zinc in cells and tissues (Andrews 2000, Biochem Pharmacol 59:95); wide"),
        GeneSpec("MT2", "induced", 10.0, 1.0, 3.0, "metallothionein 2, MTF-1 target like MT1", "as MT1"),
        GeneSpec("ZnT1", "induced", 2.0, 1.0, 6.0, "zinc exporter ZnT1 (SLC30A1), MTF-1 target",
                 "ZnT1 mRNA rises about 2-fold with zinc (Langmade et al. 2000, J Biol Chem 275:34803); wide"),
        GeneSpec("ZnT2", "induced", 2.0, 1.0, 6.0, "zinc exporter ZnT2 (SLC30A2), MTF-1 target", "as ZnT1"),
        GeneSpec("ZIP4", "repressed", 5.0, 1.0, 6.0, "zinc importer ZIP4 (SLC39A4), falls with zinc",
                 "intestinal ZIP4 falls several-fold on zinc-adequate diets (Dufner-Beattie et al. 2003, J Biol Chem 278:33474); wide"),
        GeneSpec("ZIP10", "repressed", 3.0, 1.0, 6.0, "zinc importer ZIP10 (SLC39A10), repressed by MTF-1",
                 "Lichten et al. 2011, J Nutr 141:1234; wide"),
        GeneSpec("ZIP5", "induced", 1.0, 1.0, 6.0, "zinc importer ZIP5 (SLC39A5)",
                 "no established MTF-1 response of ZIP5 mRNA (its protein is regulated by zinc; Dufner-Beattie "
                 "et al. 2004, J Biol Chem 279:49082): monotone by default with an amplitude that may be near 0; "
                 "'biphasic' is the non-monotone alternative (docs/models.md)"),
    ]
}
"""Default regulation and prior of each gene the model knows."""


TRANSCRIPTION_SPECS: dict[str, ParamSpec] = {
    s.name: s
    for s in [
        ParamSpec("mtf1_k_nM", "nM", 1.0, 1.5, "free cytosolic zinc at half-maximal MTF-1 activation $K_{M}$",
                  "MTF-1 senses free zinc in the low-nM range, close to resting free zinc (Krezel & Maret 2006, "
                  "J Biol Inorg Chem 11:1049; Laity & Andrews 2007, Arch Biochem Biophys 463:201); very wide"),
        ParamSpec("mtf1_hill", "1", 2.0, 0.4, "Hill coefficient of MTF-1 activation $n$",
                  "cooperative zinc-finger sensing; Hill coefficients 1-4 cover reported MT induction curves"),
        ParamSpec("zc_rest_nM", "nM", 0.5, 1.0, "free cytosolic zinc on the control diet $Z^*$",
                  "0.1-1 nM in mammalian cells (Krezel & Maret 2006); fixed by default: only $Z^*/K_M$ enters fold changes"),
        ParamSpec("absorption_km_mgkg", "mg/kg", 60.0, 1.0, "effective dietary zinc at half-saturated absorption $K_{abs}$",
                  "zinc absorption saturates over tens to hundreds of mg Zn/kg diet; wide"),
        ParamSpec("uptake_gain", "1", 10.0, 1.5, "maximal fold increase of the tissue's zinc supply by dietary zinc $G$",
                  "not measured; wide"),
        ParamSpec("bioavailability", "1", 1.0, 0.5, "absorption of a chemical form relative to the reference form $F$",
                  "a priori no difference (exp(+-0.5): 0.6-1.65 at one sd); the reference form is fixed at 1"),
        ParamSpec("zn_turnover_per_h", "1/h", 6.0, 1.0, "turnover rate of cytosolic labile zinc $k_{zn}$",
                  "minutes-scale exchange (model A); fixed: it shapes time courses only"),
        ParamSpec("repress_k_nM", "nM", 3.0, 1.5, "free zinc at half-maximal second repression (biphasic genes) $K_2$",
                  "hypothetical second, zinc-dependent repression; wide"),
        ParamSpec("repress_hill", "1", 4.0, 0.5, "Hill coefficient of the second repression $n_2$",
                  "steep enough to turn a rise into a fall within one dose step; wide"),
    ]
}
"""Scalar parameters of model B with default log-normal priors (per-gene amplitudes are in GENE_SPECS)."""


class TranscriptionParams(eqx.Module):
    r"""Parameters of :class:`MTF1Transcription` for one tissue.

    Scalars, or arrays with leading batch axes (the model is ``vmap``-ed over them). Per-gene
    fields have a trailing axis aligned with ``MTF1Transcription.genes``.

    Attributes
    ----------
    mtf1_k_nM : free zinc at half-maximal MTF-1 activation $K_M$ (nM).
    mtf1_hill : Hill coefficient $n$ of MTF-1 activation.
    zc_rest_nM : free cytosolic zinc on the control diet $Z^*$ (nM).
    absorption_km_mgkg : effective dose at half-saturated absorption $K_{abs}$ (mg Zn/kg diet).
    uptake_gain : maximal fold increase $G$ of the tissue's zinc supply.
    zn_turnover_per_h : turnover rate $k_{zn}$ of cytosolic labile zinc (1/h).
    amplitude : per gene, MTF-1 amplitude $A_g$ (fold change at full activation, roughly).
    repress_k_nM : per gene, $K_{2,g}$ of the second repression (nM; biphasic genes only).
    repress_hill : per gene, $n_{2,g}$ (biphasic genes only).
    mrna_decay_per_h : per gene, mRNA decay rate $\delta_g$ (1/h).
    """

    mtf1_k_nM: ArrayLike
    mtf1_hill: ArrayLike
    zc_rest_nM: ArrayLike
    absorption_km_mgkg: ArrayLike
    uptake_gain: ArrayLike
    zn_turnover_per_h: ArrayLike
    amplitude: Float[ArrayLike, "... gene"]
    repress_k_nM: Float[ArrayLike, "... gene"]
    repress_hill: Float[ArrayLike, "... gene"]
    mrna_decay_per_h: Float[ArrayLike, "... gene"]


class MTF1Transcription(eqx.Module):
    r"""MTF-1 transcription model of one tissue at a dietary zinc dose (model B; hours).

    State $y = (x, \ell_1, \dots, \ell_G)$ with $x = \ln(Z_c / Z^*)$ the log of free cytosolic
    zinc relative to the control diet and $\ell_g = \ln m_g$ the log of gene $g$'s mRNA relative
    to its control-diet steady state. Effective dose $u = F_f D$ (mg Zn/kg diet, as the
    reference form) for dose $D$ of chemical form $f$.

    $$\frac{dZ_c}{dt} = k_{zn}\Big[Z^*\big(1 + G\,\varphi(u)\,m_{ZIP4}^{\beta}\big) - m_{ZnT1}^{\beta} Z_c\Big],
      \qquad \varphi(u) = \frac{u}{K_{abs} + u}$$

    $$\frac{dm_g}{dt} = \delta_g\big(q_g(Z_c) - m_g\big), \qquad
      a(Z_c) = \frac{Z_c^n}{K_M^n + Z_c^n}$$

    with $q_g = s_g(Z_c)/s_g(Z^*)$ and

    - induced (MT1, MT2, ZnT1, ZnT2): $s_g = 1 + A_g a$;
    - repressed (ZIP4, ZIP10): $s_g = 1/(1 + A_g a)$;
    - biphasic (opt-in, e.g. for ZIP5): $s_g = (1 + A_g a) / (1 + (Z_c/K_{2,g})^{n_{2,g}})$, MTF-1
      induction at moderate zinc and a second, zinc-dependent repression at high zinc.

    $\beta = 1$ with ``feedback=True`` (transporter protein proportional to its mRNA: more ZnT1
    exports more, less ZIP4 imports less of the dietary zinc) and $\beta = 0$ without feedback.
    MT binding changes how fast free zinc moves but not where it settles, so MT1 is a read-out.
    The basal supply (the $1$ in the bracket) is what the control diet and the body deliver.

    On the control diet ($u = 0$) the steady state is $y = 0$ exactly, so the steady state at
    dose $u$ gives the fold changes directly: $FC_g(u) = e^{\ell_g^*(u)}$. The steady state is
    unique: with $z = Z_c/Z^*$ it solves $z\,q_{ZnT1}^\beta(z) = 1 + G\varphi\,q_{ZIP4}^\beta(z)$,
    whose left side increases and right side decreases in $z$ (for induced ZnT1 and
    repressed ZIP4), and it lies in $[1, 1 + G\varphi]$.

    References
    ----------
    Andrews GK (2000) Biochem Pharmacol 59:95-104 (MTF-1 and MT induction); Langmade SJ et al.
    (2000) J Biol Chem 275:34803 (ZnT1 is an MTF-1 target); Dufner-Beattie J et al. (2003)
    J Biol Chem 278:33474 (ZIP4 and dietary zinc); Krezel A & Maret W (2006) J Biol Inorg Chem
    11:1049 (resting free zinc).
    """

    genes: tuple[str, ...] = eqx.field(static=True)
    regulation: tuple[str, ...] = eqx.field(static=True)
    feedback: bool = eqx.field(static=True, default=True)

    def __check_init__(self):
        if len(self.genes) != len(self.regulation):
            raise ValueError("genes and regulation must have the same length.")
        if len(set(self.genes)) != len(self.genes):
            raise ValueError(f"genes must be unique, got {self.genes}.")
        bad = [r for r in self.regulation if r not in REGULATION_KINDS]
        if bad:
            raise ValueError(f"unknown regulation {bad}; use one of {REGULATION_KINDS}.")
        if self.feedback:
            for g, r in (("ZnT1", "induced"), ("ZIP4", "repressed")):
                if g not in self.genes:
                    raise ValueError(f"feedback=True needs {g} among the genes (it sets transport).")
                if self.regulation[self.genes.index(g)] != r:
                    raise ValueError(f"feedback=True needs {g} to be {r}.")

    @classmethod
    def for_genes(cls, genes, *, feedback: bool = True, regulation: dict[str, str] | None = None) -> "MTF1Transcription":
        """Model over ``genes`` (plus ZnT1 and ZIP4 if feedback needs them), default regulation."""
        regulation = dict(regulation or {})
        genes = list(dict.fromkeys(genes))
        if feedback:
            genes += [g for g in ("ZnT1", "ZIP4") if g not in genes]
        unknown = [g for g in genes if g not in GENE_SPECS]
        if unknown:
            raise ValueError(f"unknown gene(s) {unknown}; the model knows {list(GENE_SPECS)}.")
        reg = tuple(regulation.get(g, GENE_SPECS[g].regulation) for g in genes)
        return cls(genes=tuple(genes), regulation=reg, feedback=feedback)

    @property
    def n_state(self) -> int:
        return 1 + len(self.genes)

    def log_synthesis(self, zc_nM, p: TranscriptionParams) -> Float[Array, " gene"]:
        r"""$\ln s_g(Z_c)$ for every gene (unnormalised)."""
        log_a = jax.nn.log_sigmoid(p.mtf1_hill * (jnp.log(zc_nM) - jnp.log(p.mtf1_k_nM)))
        a = jnp.exp(log_a)
        amp = jnp.asarray(p.amplitude)
        induced = jnp.log1p(amp * a)
        out = []
        for i, r in enumerate(self.regulation):
            if r == "induced":
                out.append(induced[..., i])
            elif r == "repressed":
                out.append(-induced[..., i])
            else:
                k2 = jnp.asarray(p.repress_k_nM)[..., i]
                n2 = jnp.asarray(p.repress_hill)[..., i]
                # ln(1 + (Zc/K2)^n2) = softplus(n2 ln(Zc/K2))
                out.append(induced[..., i] - jax.nn.softplus(n2 * (jnp.log(zc_nM) - jnp.log(k2))))
        return jnp.stack(out, axis=-1)

    def log_target(self, x, p: TranscriptionParams) -> Float[Array, " gene"]:
        r"""$\ln q_g$ at $x = \ln(Z_c/Z^*)$: the steady-state log mRNA for that zinc level."""
        zc = p.zc_rest_nM * jnp.exp(x)
        return self.log_synthesis(zc, p) - self.log_synthesis(jnp.asarray(p.zc_rest_nM, dtype=jnp.result_type(x)), p)

    def vector_field(self, t, y, args):
        """Right-hand side in log-states; ``args = (params, effective_dose_mgkg)``."""
        del t
        p, u = args
        # Clipping keeps exp() finite at wild trial points of a solver; steady states lie far inside.
        y = jnp.clip(y, -STATE_CLIP, STATE_CLIP)
        x, ell = y[0], y[1:]
        phi = u / (p.absorption_km_mgkg + u)
        if self.feedback:
            l_znt1 = ell[self.genes.index("ZnT1")]
            l_zip4 = ell[self.genes.index("ZIP4")]
            dx = p.zn_turnover_per_h * ((1.0 + p.uptake_gain * phi * jnp.exp(l_zip4)) * jnp.exp(-x) - jnp.exp(l_znt1))
        else:
            dx = p.zn_turnover_per_h * ((1.0 + p.uptake_gain * phi) * jnp.exp(-x) - 1.0)
        dl = jnp.asarray(p.mrna_decay_per_h) * (jnp.exp(self.log_target(x, p) - ell) - 1.0)
        return jnp.concatenate([dx[None], dl])

    def steady_state(self, p: TranscriptionParams, effective_dose_mgkg, config: SteadyStateConfig = SteadyStateConfig()) -> SteadyState:
        """Steady state at an effective dose (mg Zn/kg diet as the reference form), from the control state."""
        dtype = jnp.result_type(float)
        y0 = jnp.zeros(self.n_state, dtype=dtype)
        return steady_state(self.vector_field, y0, (p, jnp.asarray(effective_dose_mgkg, dtype=dtype)), config)

    def fold_change(self, p: TranscriptionParams, effective_dose_mgkg,
                    config: SteadyStateConfig = SteadyStateConfig()) -> tuple[Float[Array, " gene"], Bool[Array, ""]]:
        """Steady-state fold change of every gene against the control diet, and the solve's success."""
        ss = self.steady_state(p, effective_dose_mgkg, config)
        return jnp.exp(ss.y[1:]), ss.success

    def time_course(self, p: TranscriptionParams, effective_dose_mgkg, ts_h: Float[ArrayLike, " n_time"], *,
                    rtol: float = 1e-8, atol: float = 1e-10, max_steps: int = 16_384):
        """Fold changes after switching from the control diet to the dose at ``t = 0`` (hours).

        Returns ``(zc_fold (n_time,), mrna_fold (n_time, gene), success)``; Kvaerno5 (zinc turns
        over in minutes, mRNA in hours: the system is stiff).
        """
        ts = jnp.asarray(ts_h, dtype=jnp.result_type(float))
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(self.vector_field), diffrax.Kvaerno5(), t0=0.0, t1=ts[-1], dt0=None,
            y0=jnp.zeros(self.n_state, dtype=ts.dtype), args=(p, jnp.asarray(effective_dose_mgkg, dtype=ts.dtype)),
            saveat=diffrax.SaveAt(ts=ts), stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
            max_steps=max_steps, throw=False,
        )
        return jnp.exp(sol.ys[:, 0]), jnp.exp(sol.ys[:, 1:]), diffrax.is_successful(sol.result)


def default_transcription_params(model: MTF1Transcription, **overrides) -> TranscriptionParams:
    """Prior medians of every parameter for ``model``'s genes; keyword arguments override fields."""
    s = TRANSCRIPTION_SPECS
    genes = model.genes
    values = dict(
        mtf1_k_nM=s["mtf1_k_nM"].median,
        mtf1_hill=s["mtf1_hill"].median,
        zc_rest_nM=s["zc_rest_nM"].median,
        absorption_km_mgkg=s["absorption_km_mgkg"].median,
        uptake_gain=s["uptake_gain"].median,
        zn_turnover_per_h=s["zn_turnover_per_h"].median,
        amplitude=jnp.array([GENE_SPECS[g].amplitude_median for g in genes]),
        repress_k_nM=jnp.full(len(genes), s["repress_k_nM"].median),
        repress_hill=jnp.full(len(genes), s["repress_hill"].median),
        mrna_decay_per_h=jnp.array([math.log(2.0) / GENE_SPECS[g].half_life_h for g in genes]),
    )
    values.update(overrides)
    dtype = jnp.result_type(float)
    return TranscriptionParams(**{k: jnp.asarray(v, dtype=dtype) for k, v in values.items()})


SCALAR_FIELDS = ("mtf1_k_nM", "mtf1_hill", "zc_rest_nM", "absorption_km_mgkg", "uptake_gain", "zn_turnover_per_h")
GENE_FIELDS = ("amplitude", "repress_k_nM", "repress_hill", "mrna_decay_per_h")


def transcription_model(model: MTF1Transcription, *, steady: SteadyStateConfig = SteadyStateConfig()) -> ODEModel:
    r"""Model B (hours) for ``model``'s genes as a :class:`models.ODEModel`, written with the public API.

    States ``log_zc_fold`` ($x = \ln Z_c/Z^*$) and ``mrna_<gene>`` ($\ell_g$); the vector field is
    :meth:`MTF1Transcription.vector_field`. Every solve starts pre-equilibrated at the dose
    (``effective_dose_mgkg``, a per-row constant): the state at ``t0`` is the dose's steady state,
    so the observables ``<gene>_fc`` $= e^{\ell_g}$ at ``t0`` are the steady-state fold changes
    (log-normal noise ``sigma_fc``). Per-gene fields of :class:`TranscriptionParams` become
    scalar parameters ``<field>_<gene>`` (``amplitude_MT1``, ...). Priors: the defaults of
    :data:`TRANSCRIPTION_SPECS` and :data:`GENE_SPECS`; ``mrna_decay_per_h_<gene>`` and
    ``zn_turnover_per_h`` are fixed (they shape time courses only). The built-in transcript fits
    evaluate their (tissue, form, dose) grid with this model's
    :meth:`~models.ODEModel.initial_states`.
    """
    genes = model.genes

    def params_of(p) -> TranscriptionParams:
        return TranscriptionParams(**{f: p[f] for f in SCALAR_FIELDS},
                                   **{f: jnp.stack([p[f"{f}_{g}"] for g in genes]) for f in GENE_FIELDS})

    def vector_field(t, y, p):
        dy = model.vector_field(t, jnp.stack([y[n] for n in names]), (params_of(p), p["effective_dose_mgkg"]))
        return dict(zip(names, dy))

    names = ["log_zc_fold", *[f"mrna_{g}" for g in genes]]
    spec = TRANSCRIPTION_SPECS
    params = []
    for f in SCALAR_FIELDS:
        prior = spec[f].median if f == "zn_turnover_per_h" else dist.LogNormal(math.log(spec[f].median), spec[f].log_sd)
        params.append(Parameter(f, spec[f].unit, prior, spec[f].meaning))
    for g in genes:
        params.append(Parameter(f"amplitude_{g}", "1", dist.LogNormal(math.log(GENE_SPECS[g].amplitude_median),
                                                                      GENE_SPECS[g].amplitude_log_sd), f"MTF-1 amplitude of {g}"))
        for f in ("repress_k_nM", "repress_hill"):
            params.append(Parameter(f"{f}_{g}", spec[f].unit, dist.LogNormal(math.log(spec[f].median), spec[f].log_sd),
                                    f"{spec[f].meaning} ({g})"))
        params.append(Parameter(f"mrna_decay_per_h_{g}", "1/h", math.log(2.0) / GENE_SPECS[g].half_life_h, f"{g} mRNA decay rate"))
    params += [Parameter("sigma_fc", "1 (log scale)", dist.LogNormal(math.log(0.2), 1.0), "noise of log fold changes"),
               Parameter("effective_dose_mgkg", "mg/kg", 0.0, "dose as the reference form (bioavailability x dose)")]
    return ODEModel(
        name="mtf1_transcription", time_unit="h", vector_field=vector_field,
        states=[State(n, "ln fold", initial=0.0) for n in names], parameters=params,
        observables=[Observable(f"{g}_fc", lambda t, y, p, g=g: jnp.exp(y[f"mrna_{g}"]), LogNormal("sigma_fc"), "1")
                     for g in genes],
        initial=PreEquilibrated(config=steady),
        description="Model B: MTF-1 transcription at a dietary zinc dose (MTF1Transcription).",
    )


__all__ = [
    "GENE_SPECS", "GeneSpec", "MTF1Transcription", "REGULATION_KINDS", "TRANSCRIPTION_SPECS",
    "TranscriptionParams", "default_transcription_params", "transcription_model",
]

r"""Transcript (qPCR) data: likelihoods for fold-change tables and raw Ct, and NUTS fits.

Two models of the fold change $FC_{g,k}$ of target gene $g$ in group $k$ (tissue, chemical form,
dose) against the dose-0 control group of the same tissue:

- ``"mtf1"``: the steady state of :class:`models.MTF1Transcription` (model B), with parameters
  shared across tissues except those named per tissue;
- ``"groupwise"``: one free $\ln FC_{g,k} \sim N(0, 5^2)$ per gene and group (nearly flat), the Bayesian
  version of the classic $2^{-\Delta\Delta C_t}$ reduction (no kinetic model).

Likelihoods:

- fold-change tables: $\ln \widehat{FC}_i \sim N(\ln FC_{g,k}, s_i^2)$, with $s_i$ the given
  standard error of the log ($\mathrm{sem}/FC$, or $\mathrm{sd}/(FC\sqrt n)$, or $\mathrm{sd}/FC$
  without $n$) and otherwise one unknown $s \sim$ HalfNormal(``noise_scale``). Dose-0 rows are
  1 by definition and are not observations.
- raw Ct, well $w$ of gene $g$ in biological sample $s$ of tissue $\tau$:
  $C_w \sim N\big(\alpha_{g\tau} - (\ln FC_{g,k(s)} + b_s + e_{gs}) / \ln E_g,\ \sigma_{tech}^2\big)$,
  right-censored at the cutoff for "Undetermined" wells and Ct above the cutoff. $b_s$ is the
  sample's RNA input (free, $N(0, 3^2)$), $e_{gs} \sim N(0, \sigma_{bio}^2)$ the sample-level random
  effect of each gene (non-centred), $E_g$ the amplification factor per cycle (2 by default,
  Pfaffl efficiency correction when given), $FC = 1$ for reference genes and control samples.
  The first reference gene's $\alpha$ is fixed at its control mean so that $b_s$ is identified.
"""

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pandas as pd
import xarray as xr
from arviz_base import from_dict
from jaxtyping import Array, Bool, Float, Int
from numpyro.infer import NUTS, Predictive, log_likelihood

from data import CtTable, FoldChangeTable
from models import (
    GENE_SPECS,
    TRANSCRIPTION_SPECS,
    MTF1Transcription,
    SteadyStateConfig,
    TranscriptionParams,
    transcription_model,
)

from ._approx import SVISettings, approximate
from ._fit import EXTRA_FIELDS, LAPLACE_STEP_SIZE, SamplerConfig, chain_starts, find_map, sample_stats
from ._sampling import chain_layout, sample_nuts


TISSUE_PARAMS = ("mtf1_k_nM", "mtf1_hill", "zc_rest_nM", "absorption_km_mgkg", "uptake_gain")
"""Scalar model-B parameters that may be shared or per tissue."""
DEFAULT_PER_TISSUE = ("uptake_gain",)
DEFAULT_TRANSCRIPT_FIXED = ("zc_rest_nM", "zn_turnover_per_h")
GROUPWISE_LOG_FC_SD = 5.0
SAMPLE_LOAD_SD = 3.0


@dataclasses.dataclass(frozen=True)
class TranscriptPlan:
    r"""What is sampled, fixed, shared or per tissue in a transcript fit.

    Attributes
    ----------
    model : ``"mtf1"`` or ``"groupwise"``.
    priors : prior of each sampled scalar parameter (name in ``models.TRANSCRIPTION_SPECS`` or
        ``amplitude_<gene>``); names in ``per_tissue`` get that prior independently per tissue.
    fixed : fixed values of scalar parameters.
    per_tissue : scalar parameters with one value per tissue (the rest are shared).
    reference_form : chemical form whose bioavailability is 1 (if the data have a single form,
        that form is the reference whatever its name).
    feedback : ZnT1/ZIP4 feedback on zinc transport (see :class:`models.MTF1Transcription`).
    regulation : per-gene overrides of the default regulation (``induced``/``repressed``/``biphasic``).
    noise_scale : scale of the half-normal prior on the log fold-change noise (fold-change tables
        without sd/sem).
    """

    model: str = "mtf1"
    priors: dict = dataclasses.field(default_factory=dict)
    fixed: dict = dataclasses.field(default_factory=dict)
    per_tissue: tuple[str, ...] = DEFAULT_PER_TISSUE
    reference_form: str = "sulfate"
    feedback: bool = False
    regulation: dict = dataclasses.field(default_factory=dict)
    noise_scale: float = 0.5

    def __post_init__(self):
        if self.model not in ("mtf1", "groupwise"):
            raise ValueError(f"model must be 'mtf1' or 'groupwise', got {self.model!r}.")
        bad = [n for n in self.per_tissue if n not in TISSUE_PARAMS]
        if bad:
            raise ValueError(f"per_tissue: {bad} cannot vary per tissue; choose from {list(TISSUE_PARAMS)}.")
        fixed_pt = [n for n in self.per_tissue if n in self.fixed]
        if fixed_pt:
            raise ValueError(f"per-tissue parameter(s) {fixed_pt} cannot be fixed.")
        both = set(self.priors) & set(self.fixed)
        if both:
            raise ValueError(f"parameter(s) {sorted(both)} are both fixed and given a prior.")

    def prior(self, name: str) -> dist.Distribution:
        """The prior of scalar parameter ``name`` (config override or default)."""
        if name in self.priors:
            return self.priors[name]
        if name.startswith("amplitude_"):
            g = GENE_SPECS[name.removeprefix("amplitude_")]
            return dist.LogNormal(math.log(g.amplitude_median), g.amplitude_log_sd)
        return TRANSCRIPTION_SPECS[name].prior()


def default_transcript_plan(**overrides) -> TranscriptPlan:
    """The default plan: ``zc_rest_nM`` and ``zn_turnover_per_h`` fixed, uptake gain per tissue."""
    fixed = {n: TRANSCRIPTION_SPECS[n].median for n in DEFAULT_TRANSCRIPT_FIXED}
    fixed.update(overrides.pop("fixed", {}))
    for n in overrides.get("priors", {}):
        fixed.pop(n, None)
    for n in overrides.get("per_tissue", ()):
        fixed.pop(n, None)
    return TranscriptPlan(fixed=fixed, **overrides)


class TranscriptProblem(eqx.Module):
    """A transcript data set as the arrays the likelihood needs (built by :func:`build_transcript_problem`).

    Groups are the (target gene, tissue, form, dose > 0) combinations that have data; the grid
    is every (tissue, form, dose) combination, on which model B's fold changes are reported.
    """

    kind: str = eqx.field(static=True)
    model: MTF1Transcription | None
    tissues: tuple[str, ...] = eqx.field(static=True)
    species: tuple[str, ...] = eqx.field(static=True)
    forms: tuple[str, ...] = eqx.field(static=True)
    reference_form: str = eqx.field(static=True)
    genes: tuple[str, ...] = eqx.field(static=True)
    dose_unit: str = eqx.field(static=True)
    doses: Float[Array, " dose"]
    group_gene: Int[Array, " group"]
    group_tissue: Int[Array, " group"]
    group_form: Int[Array, " group"]
    group_dose: Int[Array, " group"]
    # fold-change tables
    obs_group: Int[Array, " obs"]
    obs_log_fc: Float[Array, " obs"]
    obs_se_log: Float[Array, " obs"]
    # raw Ct
    ct_genes: tuple[str, ...] = eqx.field(static=True)
    well_gene: Int[Array, " well"]
    well_sample: Int[Array, " well"]
    well_group: Int[Array, " well"]
    well_alpha: Int[Array, " well"]
    well_effect: Int[Array, " well"]
    ct: Float[Array, " well"]
    censored: Bool[Array, " well"]
    alpha_center: Float[Array, " alpha"]
    alpha_fixed: Bool[Array, " alpha"]
    num_samples: int = eqx.field(static=True)
    num_effects: int = eqx.field(static=True)
    ln_efficiency: Float[Array, " ct_gene"]
    unknown_noise: bool = eqx.field(static=True, default=True)
    steady: SteadyStateConfig = eqx.field(static=True, default=SteadyStateConfig())

    @property
    def num_groups(self) -> int:
        return self.group_gene.shape[0]


def _tissue_labels(frame: pd.DataFrame):
    pairs = list(dict.fromkeys(zip(frame["tissue"], frame["species"])))
    names = [t for t, _ in pairs]
    labels = [t if names.count(t) == 1 else f"{t} ({s})" for t, s in pairs]
    return pairs, labels


def _forms(frame: pd.DataFrame, reference_form: str):
    forms = sorted({f for f in frame["form"] if f != "none"})
    if not forms:
        forms = [reference_form]
    if len(forms) == 1:
        ref = forms[0]
    else:
        ref = reference_form
    forms = [ref] + [f for f in forms if f != ref] if ref in forms else forms
    return tuple(forms), ref


def _model_for(genes, plan: TranscriptPlan):
    if plan.model != "mtf1":
        return None
    return MTF1Transcription.for_genes(genes, feedback=plan.feedback, regulation=plan.regulation)


def build_transcript_problem(table: FoldChangeTable | CtTable, plan: TranscriptPlan, *,
                             efficiency: dict | None = None,
                             steady: SteadyStateConfig = SteadyStateConfig()) -> TranscriptProblem:
    """Index a validated fold-change or Ct table into a :class:`TranscriptProblem`."""
    frame = table.frame
    pairs, tissues = _tissue_labels(frame)
    tissue_index = {p: i for i, p in enumerate(pairs)}
    forms, ref = _forms(frame, plan.reference_form)
    form_index = {f: i for i, f in enumerate(forms)}
    doses = np.array(sorted(set(frame["dose"].astype(float)) | {0.0}))
    dose_index = {d: i for i, d in enumerate(doses)}
    is_ct = isinstance(table, CtTable)
    targets = frame.loc[~frame["is_reference"], "gene"] if is_ct else frame["gene"]
    genes = tuple(dict.fromkeys(targets))
    gene_index = {g: i for i, g in enumerate(genes)}

    groups: dict[tuple, int] = {}

    def group_of(gene, tissue, species, form, dose):
        if dose == 0:
            return -1
        key = (gene_index[gene], tissue_index[(tissue, species)], form_index[form], dose_index[dose])
        return groups.setdefault(key, len(groups))

    empty_i = jnp.zeros(0, dtype=int)
    empty_f = jnp.zeros(0)
    common = dict(kind="ct" if is_ct else "fold_change", model=_model_for(genes, plan), tissues=tuple(tissues),
                  species=tuple(s for _, s in pairs), forms=forms, reference_form=ref, genes=genes,
                  dose_unit=table.dose_unit, doses=jnp.asarray(doses), steady=steady)
    if not is_ct:
        obs = frame[frame["dose"] > 0]
        obs_group = [group_of(*r) for r in obs[["gene", "tissue", "species", "form", "dose"]].itertuples(index=False)]
        fc = obs["fold_change"].to_numpy(float)
        sem = obs["sem"].to_numpy(float)
        sd = obs["sd"].to_numpy(float)
        n = obs["n"].to_numpy(float)
        se = np.where(np.isfinite(sem), sem, np.where(np.isfinite(n), sd / np.sqrt(n), sd)) / fc
        ct_part = dict(ct_genes=(), well_gene=empty_i, well_sample=empty_i, well_group=empty_i, well_alpha=empty_i,
                       well_effect=empty_i, ct=empty_f, censored=jnp.zeros(0, dtype=bool), alpha_center=empty_f,
                       alpha_fixed=jnp.zeros(0, dtype=bool), num_samples=0, num_effects=0, ln_efficiency=empty_f)
        fc_part = dict(obs_group=jnp.asarray(obs_group, dtype=int), obs_log_fc=jnp.asarray(np.log(fc)),
                       obs_se_log=jnp.asarray(se), unknown_noise=bool(np.any(~np.isfinite(se))))
    else:
        refs = tuple(table.reference_genes)
        ct_genes = genes + refs
        ct_gene_index = {g: i for i, g in enumerate(ct_genes)}
        samples = list(table.samples)
        sample_index = {s: i for i, s in enumerate(samples)}
        well_group = [
            -1 if ref_gene else group_of(g, t, sp, f, d)
            for g, t, sp, f, d, ref_gene in frame[["gene", "tissue", "species", "form", "dose", "is_reference"]].itertuples(index=False)
        ]
        # alpha: one baseline Ct per (gene, tissue); centred on the control mean of observed wells
        alpha_keys: dict[tuple, int] = {}
        well_alpha = []
        for g, t, sp in frame[["gene", "tissue", "species"]].itertuples(index=False):
            well_alpha.append(alpha_keys.setdefault((g, (t, sp)), len(alpha_keys)))
        well_alpha = np.array(well_alpha)
        ct_vals = frame["ct"].to_numpy(float)
        cens = frame["censored"].to_numpy(bool)
        control = frame["dose"].to_numpy(float) == 0
        centers, fixed = [], []
        for (g, _), a in alpha_keys.items():
            sel = (well_alpha == a) & ~cens
            sel_c = sel & control
            use = sel_c if sel_c.any() else sel
            centers.append(float(np.mean(ct_vals[use])) if use.any() else table.ct_cutoff)
            fixed.append(g == refs[0])
        # sample-level effects e_{g,s}: every (gene, sample) pair except the first reference gene
        effect_keys: dict[tuple, int] = {}
        well_effect = []
        for g, s in frame[["gene", "sample"]].itertuples(index=False):
            well_effect.append(-1 if g == refs[0] else effect_keys.setdefault((g, s), len(effect_keys)))
        eff = dict(efficiency or {})
        ln_e = [math.log(eff.get(g, 2.0)) for g in ct_genes]
        ct_part = dict(
            ct_genes=ct_genes,
            well_gene=jnp.asarray([ct_gene_index[g] for g in frame["gene"]], dtype=int),
            well_sample=jnp.asarray([sample_index[s] for s in frame["sample"]], dtype=int),
            well_group=jnp.asarray(well_group, dtype=int), well_alpha=jnp.asarray(well_alpha, dtype=int),
            well_effect=jnp.asarray(well_effect, dtype=int),
            ct=jnp.asarray(np.where(cens, table.ct_cutoff, ct_vals)), censored=jnp.asarray(cens),
            alpha_center=jnp.asarray(centers), alpha_fixed=jnp.asarray(fixed, dtype=bool),
            num_samples=len(samples), num_effects=len(effect_keys), ln_efficiency=jnp.asarray(ln_e),
        )
        fc_part = dict(obs_group=empty_i, obs_log_fc=empty_f, obs_se_log=empty_f)
    keys = list(groups)
    garr = np.array(keys, dtype=int).reshape(-1, 4)
    return TranscriptProblem(
        group_gene=jnp.asarray(garr[:, 0]), group_tissue=jnp.asarray(garr[:, 1]),
        group_form=jnp.asarray(garr[:, 2]), group_dose=jnp.asarray(garr[:, 3]),
        **common, **fc_part, **ct_part,
    )


def sampled_names(problem: TranscriptProblem, plan: TranscriptPlan) -> list[str]:
    """Names of the population-level posterior variables (the summary table rows)."""
    names = []
    if plan.model == "mtf1":
        model = problem.model
        names += [n for n in TISSUE_PARAMS if n not in plan.fixed]
        if len(problem.forms) > 1:
            names.append("bioavailability")
        names.append("amplitude")
        if "biphasic" in model.regulation:
            names += [n for n in ("repress_k_nM", "repress_hill") if n not in plan.fixed]
    else:
        names.append("log_fc")
    if problem.kind == "fold_change":
        if problem.unknown_noise:
            names.append("sigma_log_fc")
    else:
        names += ["sigma_tech_ct", "sigma_bio"]
    return names


def _mtf1_params(problem: TranscriptProblem, plan: TranscriptPlan):
    """Sample model-B parameters; returns (params batched over tissue, bioavailability per form)."""
    model = problem.model
    n_t = len(problem.tissues)
    values = {}
    for name in TISSUE_PARAMS + ("zn_turnover_per_h",):
        if name in plan.fixed:
            values[name] = jnp.full((n_t,), float(plan.fixed[name]))
        elif name in plan.per_tissue:
            with numpyro.plate("tissue", n_t):
                values[name] = numpyro.sample(name, plan.prior(name))
        else:
            values[name] = jnp.broadcast_to(numpyro.sample(name, plan.prior(name)), (n_t,))
    genes = model.genes
    amp_priors = [plan.prior(f"amplitude_{g}") for g in genes]
    loc = jnp.array([d.base_dist.loc if hasattr(d, "base_dist") else d.loc for d in amp_priors])
    scale = jnp.array([d.base_dist.scale if hasattr(d, "base_dist") else d.scale for d in amp_priors])
    with numpyro.plate("model_gene", len(genes)):
        amplitude = numpyro.sample("amplitude", dist.LogNormal(loc, scale))
    biphasic = [i for i, r in enumerate(model.regulation) if r == "biphasic"]
    k2 = jnp.ones(len(genes))
    n2 = jnp.ones(len(genes))
    if biphasic:
        idx = jnp.asarray(biphasic)
        for name in ("repress_k_nM", "repress_hill"):
            if name in plan.fixed:
                v = jnp.full(len(biphasic), float(plan.fixed[name]))
            else:
                with numpyro.plate("biphasic_gene", len(biphasic)):
                    v = numpyro.sample(name, plan.prior(name))
            if name == "repress_k_nM":
                k2 = k2.at[idx].set(v)
            else:
                n2 = n2.at[idx].set(v)
    decay = jnp.array([math.log(2.0) / GENE_SPECS[g].half_life_h for g in genes])
    params = TranscriptionParams(
        **values,
        amplitude=jnp.broadcast_to(amplitude, (n_t, len(genes))),
        repress_k_nM=jnp.broadcast_to(k2, (n_t, len(genes))),
        repress_hill=jnp.broadcast_to(n2, (n_t, len(genes))),
        mrna_decay_per_h=jnp.broadcast_to(decay, (n_t, len(genes))),
    )
    n_f = len(problem.forms)
    if n_f > 1:
        with numpyro.plate("other_form", n_f - 1):
            other = numpyro.sample("bioavailability", plan.prior("bioavailability"))
        bio = jnp.concatenate([jnp.ones(1), other])
    else:
        bio = jnp.ones(1)
    return params, bio


def grid_fold_change(problem: TranscriptProblem, params: TranscriptionParams, bioavailability):
    """Model-B steady states on the (tissue, form, dose) grid.

    Returns ``(log_fc (tissue, form, dose, model_gene), log_zc_fold (tissue, form, dose), success)``.
    """
    model = problem.model
    n_t, n_f, n_d = len(problem.tissues), len(problem.forms), problem.doses.shape[0]
    t_idx, f_idx, d_idx = (a.ravel() for a in jnp.meshgrid(jnp.arange(n_t), jnp.arange(n_f), jnp.arange(n_d), indexing="ij"))
    p = jax.tree.map(lambda v: v[t_idx], params)
    u = bioavailability[f_idx] * problem.doses[d_idx]
    # model B through the public API: each grid point is a row pre-equilibrated at its dose
    ode = transcription_model(model, steady=problem.steady)
    values = {}
    for field in dataclasses.fields(p):  # scalar fields by name, per-gene fields as <field>_<gene>
        v = getattr(p, field.name)
        if field.name in ode.param_names:
            values[field.name] = v
        else:
            values.update({f"{field.name}_{g}": v[:, i] for i, g in enumerate(model.genes)})
    values.update(effective_dose_mgkg=u, sigma_fc=jnp.ones_like(u))
    y, ok = ode.initial_states(jnp.zeros_like(u), values, u.dtype)
    y = y.reshape(n_t, n_f, n_d, model.n_state)
    return y[..., 1:], y[..., 0], ok.reshape(n_t, n_f, n_d)


def transcript_model(problem: TranscriptProblem, plan: TranscriptPlan, *, predictive: bool = False):
    """Numpyro model of a transcript data set (see the module docstring for the equations)."""
    if plan.model == "mtf1":
        params, bio = _mtf1_params(problem, plan)
        log_fc, log_zc, ok = grid_fold_change(problem, params, bio)
        numpyro.deterministic("fold_change", jnp.exp(log_fc))
        numpyro.deterministic("zc_fold", jnp.exp(log_zc))
        failures = numpyro.deterministic("solver_failures", jnp.sum(~ok))
        numpyro.factor("solver_ok", jnp.where(failures > 0, -jnp.inf, 0.0))
        model_gene = jnp.asarray([problem.model.genes.index(g) for g in problem.genes], dtype=int)
        group_log_fc = log_fc[problem.group_tissue, problem.group_form, problem.group_dose, model_gene[problem.group_gene]]
    else:
        numpyro.deterministic("solver_failures", jnp.asarray(0))
        with numpyro.plate("group", problem.num_groups):
            group_log_fc = numpyro.sample("log_fc", dist.Normal(0.0, GROUPWISE_LOG_FC_SD))
        numpyro.deterministic("group_fold_change", jnp.exp(group_log_fc))
    if problem.kind == "fold_change":
        se = problem.obs_se_log
        if problem.unknown_noise:
            sigma = numpyro.sample("sigma_log_fc", dist.HalfNormal(plan.noise_scale))
            se = jnp.where(jnp.isfinite(se), se, sigma)
        with numpyro.plate("obs", problem.obs_group.shape[0]):
            mean = group_log_fc[problem.obs_group]
            numpyro.sample("log_fold_change", dist.Normal(mean, se), obs=None if predictive else problem.obs_log_fc)
        return
    # raw Ct
    n_alpha = problem.alpha_center.shape[0]
    with numpyro.plate("alpha", n_alpha):
        alpha_free = numpyro.sample("alpha_ct", dist.Normal(problem.alpha_center, 5.0))
    alpha = jnp.where(problem.alpha_fixed, problem.alpha_center, alpha_free)
    with numpyro.plate("sample", problem.num_samples):
        load = numpyro.sample("sample_load", dist.Normal(0.0, SAMPLE_LOAD_SD))
    sigma_bio = numpyro.sample("sigma_bio", dist.HalfNormal(1.0))
    with numpyro.plate("effect", problem.num_effects):
        z = numpyro.sample("effect_z", dist.Normal(0.0, 1.0))
    effect = jnp.concatenate([sigma_bio * z, jnp.zeros(1)])[problem.well_effect]  # index -1 -> 0
    sigma_tech = numpyro.sample("sigma_tech_ct", dist.HalfNormal(0.5))
    theta = jnp.concatenate([group_log_fc, jnp.zeros(1)])[problem.well_group]
    mean = alpha[problem.well_alpha] - (theta + load[problem.well_sample] + effect) / problem.ln_efficiency[problem.well_gene]
    with numpyro.plate("well", problem.ct.shape[0]):
        if predictive:
            numpyro.sample("ct", dist.Normal(mean, sigma_tech))
        else:
            numpyro.sample("ct", dist.RightCensoredDistribution(dist.Normal(mean, sigma_tech), problem.censored), obs=problem.ct)


@dataclasses.dataclass
class TranscriptFit:
    """A finished transcript fit."""

    tree: xr.DataTree
    plan: TranscriptPlan
    problem: TranscriptProblem
    laplace: object = None
    approximation: object = None


@chain_layout
def run_transcript_nuts(problem: TranscriptProblem, plan: TranscriptPlan, config: SamplerConfig, *, key,
                        progress_bar: bool = True, table=None, checkpoint=None, method: str = "nuts",
                        map_starts: int = 1, approx_draws: int = 2000, svi: SVISettings = SVISettings()) -> TranscriptFit:
    """MAP + Laplace start, then NUTS with the Laplace metric; returns the DataTree (see :func:`transcript_tree`).

    ``method="map"`` / ``"svi"``: the Laplace or SVI approximation instead of NUTS
    (:func:`inference._fit.run_nuts` says how).
    """
    k_init, k_jitter, k_mcmc, k_ppc = jax.random.split(key, 4)
    # one jitted search for a single start, as before the imaging fit moved to the host loop: the
    # host loop's MAP is the same point (0.008 sd apart on the bundled glycinate fit), but the
    # chains it starts are other realisations, and the bundled fit's gate is marginal (with the
    # host loop: 1 divergence in 2 of 3 seeds at target 0.9; ESS short in 1 of 2 seeds at 0.95)
    laplace = find_map(transcript_model, (problem, plan), key=k_init, num_starts=map_starts, batch_hessian=False,
                       host_loop=False)
    if method != "nuts":
        approx = approximate(transcript_model, (problem, plan), laplace, method=method, key=k_mcmc,
                             num_draws=approx_draws, svi=svi, progress_bar=progress_bar, parallel=False)
        tree = transcript_tree(problem, plan, approx.samples, None, key=k_ppc, max_tree_depth=0, table=table)
        tree.attrs["method"] = approx.method
        return TranscriptFit(tree=tree, plan=plan, problem=problem, laplace=laplace, approximation=approx)
    init = chain_starts(laplace, config.num_chains, key=k_jitter, potential_model=(transcript_model, problem, plan))
    kernel = NUTS(transcript_model, target_accept_prob=config.target_accept_prob, max_tree_depth=config.max_tree_depth,
                  dense_mass=True, inverse_mass_matrix=laplace.inverse_mass_matrix,
                  adapt_mass_matrix=config.adapt_mass_matrix, step_size=LAPLACE_STEP_SIZE)
    samples, extra = sample_nuts(kernel, config, key=k_mcmc, model_args=(problem, plan), init_params=init,
                                 extra_fields=EXTRA_FIELDS, progress_bar=progress_bar, checkpoint=checkpoint)
    tree = transcript_tree(problem, plan, samples, extra, key=k_ppc, max_tree_depth=config.max_tree_depth, table=table)
    tree.attrs["method"] = "nuts"
    return TranscriptFit(tree=tree, plan=plan, problem=problem, laplace=laplace)


def _group_coords(problem: TranscriptProblem, prefix: str, index) -> dict:
    doses = np.asarray(problem.doses)
    return {
        f"{prefix}_gene": [problem.genes[g] for g in np.asarray(problem.group_gene)[index]],
        f"{prefix}_tissue": [problem.tissues[t] for t in np.asarray(problem.group_tissue)[index]],
        f"{prefix}_form": [problem.forms[f] for f in np.asarray(problem.group_form)[index]],
        f"{prefix}_dose": doses[np.asarray(problem.group_dose)[index]],
    }


def transcript_tree(problem: TranscriptProblem, plan: TranscriptPlan, samples: dict, extra: dict | None, *, key,
                    max_tree_depth: int, table=None) -> xr.DataTree:
    """Assemble the DataTree: posterior, posterior_predictive, log_likelihood, sample_stats,
    observed_data, constant_data; dims ``tissue``, ``form``, ``dose``, ``gene`` (grid),
    ``group`` (gene x condition with data), ``obs`` (fold-change rows) or ``well`` (Ct).
    """
    samples = {k: np.asarray(v) for k, v in samples.items()}
    num_chains, num_draws = next(iter(samples.values())).shape[:2]
    flat = {k: jnp.asarray(v.reshape((-1,) + v.shape[2:])) for k, v in samples.items()
            if k not in ("solver_failures", "fold_change", "zc_fold", "group_fold_change")}
    site = "log_fold_change" if problem.kind == "fold_change" else "ct"
    # parallel=False maps over draws with lax.map instead of vmap: under vmap the steady-state
    # solver's "integrate only if Newton failed" branch would become a select and always run.
    ll = log_likelihood(transcript_model, flat, problem, plan, parallel=False)[site]
    ppc = Predictive(transcript_model, posterior_samples=flat, return_sites=[site], parallel=False)(
        key, problem, plan, predictive=True)[site]

    def by_chain(a):
        a = np.asarray(a)
        return a.reshape((num_chains, num_draws) + a.shape[1:])

    posterior = {k: v for k, v in samples.items() if k != "solver_failures"}
    coords = {"tissue": list(problem.tissues), "form": list(problem.forms), "dose": np.asarray(problem.doses),
              "group": np.arange(problem.num_groups)}
    dims = {"zc_fold": ["tissue", "form", "dose"], "log_fc": ["group"], "group_fold_change": ["group"]}
    if plan.model == "mtf1":
        coords["gene"] = list(problem.model.genes)
        dims.update({"fold_change": ["tissue", "form", "dose", "gene"], "amplitude": ["gene"]})
        for name in TISSUE_PARAMS:
            if name in plan.per_tissue:
                dims[name] = ["tissue"]
        if "bioavailability" in posterior:
            coords["other_form"] = list(problem.forms[1:])
            dims["bioavailability"] = ["other_form"]
        biphasic = [g for g, r in zip(problem.model.genes, problem.model.regulation) if r == "biphasic"]
        if biphasic:
            coords["biphasic_gene"] = biphasic
            dims.update({"repress_k_nM": ["biphasic_gene"], "repress_hill": ["biphasic_gene"]})
    stats = sample_stats(extra, samples["solver_failures"], max_tree_depth)
    constant = {"tissue_species": np.asarray(problem.species)}
    dims["tissue_species"] = ["tissue"]
    if problem.kind == "fold_change":
        n_obs = problem.obs_group.shape[0]
        coords["obs"] = np.arange(n_obs)
        coords.update({k: ("obs", v) for k, v in _group_coords(problem, "obs", np.asarray(problem.obs_group)).items()})
        obs_name = "fold_change_obs"
        observed = {obs_name: np.exp(np.asarray(problem.obs_log_fc))}
        pp = {obs_name: np.exp(by_chain(ppc))}
        lls = {obs_name: by_chain(ll)}
        dims[obs_name] = ["obs"]
        constant["se_log"] = np.asarray(problem.obs_se_log)
        dims["se_log"] = ["obs"]
    else:
        n_w = problem.ct.shape[0]
        coords["well"] = np.arange(n_w)
        frame = table.frame if table is not None else None
        if frame is not None:
            coords.update({"well_gene": ("well", frame["gene"].tolist()), "well_sample": ("well", frame["sample"].tolist()),
                           "well_dose": ("well", frame["dose"].to_numpy(float))})
        observed = {"ct": np.where(np.asarray(problem.censored), np.nan, np.asarray(problem.ct))}
        pp = {"ct": by_chain(ppc)}
        lls = {"ct": by_chain(ll)}
        dims["ct"] = ["well"]
        constant["censored"] = np.asarray(problem.censored)
        constant["ct_cutoff_or_value"] = np.asarray(problem.ct)
        dims.update({"censored": ["well"], "ct_cutoff_or_value": ["well"]})
        # arviz reserves "sample" for stacked chain x draw
        dims["sample_load"] = ["bio_sample"]
        if frame is not None:
            coords["bio_sample"] = list(table.samples)
    coords.update({k: ("group", v) for k, v in _group_coords(problem, "group", np.arange(problem.num_groups)).items()})
    tree = from_dict(
        {"posterior": posterior, "posterior_predictive": pp, "log_likelihood": lls, "sample_stats": stats,
         "observed_data": observed, "constant_data": constant},
        coords={k: v for k, v in coords.items() if not isinstance(v, tuple)},
        dims=dims,
    )
    aux = {k: v for k, v in coords.items() if isinstance(v, tuple)}
    for group in ("posterior", "posterior_predictive", "log_likelihood", "observed_data", "constant_data"):
        ds = tree[group].to_dataset()
        add = {k: v for k, v in aux.items() if v[0] in ds.dims}
        if add:
            tree[group] = xr.DataTree(ds.assign_coords(add))
    tree.attrs.update({"model": "MTF1Transcription" if plan.model == "mtf1" else "groupwise",
                       "data_kind": problem.kind, "dose_unit": problem.dose_unit,
                       "reference_form": problem.reference_form, "time_unit": "h"})
    return tree


def bioavailability_summary(tree: xr.DataTree, prob: float = 0.9) -> list[dict]:
    """Posterior median and equal-tailed interval of each form's bioavailability vs the reference form."""
    post = tree["posterior"]
    if "bioavailability" not in post:
        return []
    da = post["bioavailability"]
    out = []
    for form in da["other_form"].values:
        x = da.sel(other_form=form).values.ravel()
        lo, med, hi = np.quantile(x, [(1 - prob) / 2, 0.5, (1 + prob) / 2])
        out.append({"form": str(form), "reference": tree.attrs["reference_form"], "median": float(med),
                    f"q{(1 - prob) / 2:.2f}": float(lo), f"q{(1 + prob) / 2:.2f}": float(hi),
                    "p_greater_than_1": float(np.mean(x > 1))})
    return out


def ppc_coverage(tree: xr.DataTree, prob: float = 0.9) -> pd.DataFrame:
    """For each fold-change observation: observed value, predictive interval and whether it covers."""
    if "fold_change_obs" not in tree["observed_data"]:
        raise ValueError("ppc_coverage needs a fold-change fit.")
    obs = tree["observed_data"]["fold_change_obs"]
    pp = tree["posterior_predictive"]["fold_change_obs"].stack(s=("chain", "draw")).transpose("obs", "s").values
    lo, med, hi = np.quantile(pp, [(1 - prob) / 2, 0.5, (1 + prob) / 2], axis=1)
    return pd.DataFrame({
        "gene": obs["obs_gene"].values, "tissue": obs["obs_tissue"].values, "form": obs["obs_form"].values,
        "dose": obs["obs_dose"].values, "observed": obs.values, "pred_median": med, "pred_lo": lo, "pred_hi": hi,
        "covered": (obs.values >= lo) & (obs.values <= hi),
    })


__all__ = [
    "TranscriptPlan", "TranscriptProblem", "TranscriptFit", "build_transcript_problem", "default_transcript_plan",
    "transcript_model", "run_transcript_nuts", "transcript_tree", "bioavailability_summary", "ppc_coverage",
    "sampled_names", "grid_fold_change",
]

"""Transcript (qPCR) inference: likelihoods, gradients, Livak agreement, the seed fit through the CLI."""

import json

import arviz_stats as azs
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from jax.flatten_util import ravel_pytree
from numpyro.infer import init_to_median
from numpyro.infer.util import initialize_model, log_likelihood
from scipy.stats import norm

from data import GLYCINATE_DIR, livak_fold_change, read_ct, read_fold_change
from inference import SamplerConfig
from inference._cli import main
from inference._simulate import simulate_ct
from inference._transcripts import (
    build_transcript_problem,
    default_transcript_plan,
    run_transcript_nuts,
    transcript_model,
)


DESIGN = pd.DataFrame(
    [
        ("MT1", "duodenum", "rat", "none", 0, 1.0), ("MT1", "duodenum", "rat", "glycinate", 60, 4.0),
        ("MT1", "duodenum", "rat", "glycinate", 180, 9.0),
        ("ZIP4", "duodenum", "rat", "none", 0, 1.0), ("ZIP4", "duodenum", "rat", "glycinate", 60, 0.4),
        ("ZIP4", "duodenum", "rat", "glycinate", 180, 0.12),
    ],
    columns=["gene", "tissue", "species", "form", "dose", "fold_change"],
)


@pytest.fixture(scope="module")
def ct_table(tmp_path_factory):
    """Synthetic raw Ct (seed 0): ZIP4 near the detection limit, so some of its wells are Undetermined."""
    path = tmp_path_factory.mktemp("ct") / "ct.csv"
    simulate_ct(DESIGN, baseline_ct={"ZIP4": 36.5}, seed=0).to_csv(path, index=False)
    return read_ct(path, reference_genes=["GAPDH"])


def _potential(problem, plan):
    info, potential_fn, _, _ = initialize_model(jax.random.key(0), transcript_model, model_args=(problem, plan),
                                                init_strategy=init_to_median(num_samples=15))
    flat, unravel = ravel_pytree(info.z)
    return jax.jit(lambda x: potential_fn(unravel(x))), flat


@pytest.mark.parametrize("kind", ["fold_change_mtf1", "ct_mtf1", "ct_groupwise"])
def test_log_density_gradient_matches_finite_differences(kind, ct_table):
    if kind == "fold_change_mtf1":
        table, plan = read_fold_change(GLYCINATE_DIR / "fold_changes.csv"), default_transcript_plan()
    else:
        table, plan = ct_table, default_transcript_plan(model=kind.removeprefix("ct_"))
    problem = build_transcript_problem(table, plan)
    f, x0 = _potential(problem, plan)
    x0 = x0 + 0.1 * jax.random.normal(jax.random.key(1), x0.shape)
    grad = np.asarray(jax.jit(jax.grad(f))(x0))
    idx = np.linspace(0, x0.size - 1, min(12, x0.size)).astype(int)
    h = 1e-5
    fd = np.array([(float(f(x0.at[i].add(h))) - float(f(x0.at[i].add(-h)))) / (2 * h) for i in idx])
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(grad[idx], fd, rtol=1e-4, atol=1e-5 * np.max(np.abs(fd)))


def test_censored_well_contributes_the_normal_survival_probability(ct_table):
    """An Undetermined well adds log P(Ct > cutoff), not a density at the cutoff and not nothing."""
    plan = default_transcript_plan(model="groupwise")
    problem = build_transcript_problem(ct_table, plan)
    assert int(problem.censored.sum()) > 0
    info, *_ = initialize_model(jax.random.key(0), transcript_model, model_args=(problem, plan),
                                init_strategy=init_to_median(num_samples=15))
    from numpyro.infer.util import constrain_fn

    values = constrain_fn(transcript_model, (problem, plan), {}, info.z)
    values = {k: v[None] for k, v in values.items()}
    ll = np.asarray(log_likelihood(transcript_model, values, problem, plan)["ct"])[0]
    # rebuild the mean of each well from the same draw, independently of the model code
    alpha = np.where(np.asarray(problem.alpha_fixed), np.asarray(problem.alpha_center), np.asarray(values["alpha_ct"][0]))
    effect = np.concatenate([float(values["sigma_bio"][0]) * np.asarray(values["effect_z"][0]), [0.0]])
    theta = np.concatenate([np.asarray(values["log_fc"][0]), [0.0]])
    mean = (alpha[problem.well_alpha] - (theta[problem.well_group] + np.asarray(values["sample_load"][0])[problem.well_sample]
            + effect[problem.well_effect]) / np.asarray(problem.ln_efficiency)[problem.well_gene])
    sd = float(values["sigma_tech_ct"][0])
    cens = np.asarray(problem.censored)
    ct = np.asarray(problem.ct)
    expected = np.where(cens, norm.logsf(ct, mean, sd), norm.logpdf(ct, mean, sd))
    np.testing.assert_allclose(ll, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.slow
def test_groupwise_ct_fit_agrees_with_livak_and_covers_the_truth(ct_table):
    """Synthetic raw Ct with known fold changes: the posterior median fold change agrees with the
    classic 2^-ddCt estimate within its Monte Carlo error (groups without censored wells), and the
    true fold change lies in the 90% interval (all groups, censored ones included)."""
    plan = default_transcript_plan(model="groupwise")
    problem = build_transcript_problem(ct_table, plan)
    fit = run_transcript_nuts(problem, plan, SamplerConfig(num_warmup=300, num_samples=700, adapt_mass_matrix=True),
                              key=jax.random.key(0), progress_bar=False, table=ct_table)
    post = fit.tree["posterior"]
    assert int(fit.tree["sample_stats"]["diverging"].sum()) == 0
    rhat = azs.rhat(post.to_dataset()[["log_fc", "sigma_bio", "sigma_tech_ct"]])
    assert max(float(rhat[v].max()) for v in rhat.data_vars) < 1.05
    log_fc = post["log_fc"]
    median = log_fc.median(("chain", "draw")).values
    mcse = azs.mcse(post.to_dataset()[["log_fc"]], method="median")["log_fc"].values
    lo, hi = log_fc.quantile([0.05, 0.95], ("chain", "draw")).values
    livak = livak_fold_change(ct_table).set_index(["gene", "dose"])["fold_change"]
    frame = ct_table.frame
    truth = DESIGN.set_index(["gene", "dose"])["fold_change"]
    compared = 0
    for i, (gene, dose) in enumerate(zip(post["group_gene"].values, post["group_dose"].values)):
        true = np.log(truth[(gene, dose)])
        assert lo[i] <= true <= hi[i], (gene, dose, np.exp([lo[i], hi[i]]), truth[(gene, dose)])
        censored = frame[(frame["gene"] == gene) & (frame["dose"].isin([0.0, dose]))]["censored"].any()
        if not censored:
            compared += 1
            assert abs(median[i] - np.log(livak[(gene, dose)])) <= 3 * mcse[i], (gene, dose, median[i], livak[(gene, dose)], mcse[i])
    assert compared == 3  # ZIP4 at 180 mg/kg has Undetermined wells; the other three groups have none


def _write_config(tmp_path, **sampler):
    text = (GLYCINATE_DIR / "fit.toml").read_text().replace('"fold_changes.csv"', f'"{GLYCINATE_DIR / "fold_changes.csv"}"')
    for key, value in sampler.items():
        text = text.replace(f"{key} = ", f"{key} = {value}  # was ", 1)
    path = tmp_path / "fit.toml"
    path.write_text(text)
    return path


@pytest.mark.slow
def test_seed_tables_fit_through_the_cli(tmp_path, capsys):
    """The bundled config on the seed's real tables: converges, covers the duodenum MT1/ZIP4/ZnT1 and
    jejunum ZIP4 observations with 90% predictive intervals, prints the bioavailability of glycinate."""
    out = tmp_path / "run"
    assert main(["fit", str(GLYCINATE_DIR / "fit.toml"), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "bioavailability of glycinate relative to sulfate: median" in printed
    run = json.loads((out / "run.json").read_text())
    diag = run["diagnostics"]
    assert diag["max_r_hat"] < 1.01 and diag["divergences"] == 0 and diag["draws_with_solver_failures"] == 0
    assert run["bioavailability"][0]["form"] == "glycinate"
    cov = pd.read_csv(out / "ppc_coverage.csv")
    must = cov[((cov["tissue"] == "duodenum") & cov["gene"].isin(["MT1", "ZIP4", "ZnT1"]))
               | ((cov["tissue"] == "jejunum") & (cov["gene"] == "ZIP4"))]
    assert len(must) == 16 and bool(must["covered"].all()), must
    for name in ("posterior.nc", "summary.csv", "dose_response.png", "rank.png", "trace.png"):
        assert (out / name).stat().st_size > 0


def test_transcript_check_reports_the_data_and_plan(capsys):
    assert main(["check", str(GLYCINATE_DIR / "fit.toml")]) == 0
    printed = capsys.readouterr().out
    assert "forms sulfate, glycinate (reference sulfate)" in printed
    assert "per tissue: uptake_gain" in printed


@pytest.mark.parametrize(
    "body, message",
    [
        ('[transcripts]\nfold_change = "a.csv"\nct = "b.csv"\n', "exactly one of 'fold_change'"),
        ('[transcripts]\nct = "b.csv"\n', "need 'reference_genes'"),
        ('[transcripts]\nfold_change = "a.csv"\n[model]\nregulation = {MT9 = "induced"}\n', "unknown gene"),
        ('[transcripts]\nfold_change = "a.csv"\n[model]\nper_tissue = ["bioavailability"]\n', "cannot vary per tissue"),
        ('[transcripts]\nfold_change = "a.csv"\n[priors]\nzip_km_uM = {median = 1, log_sd = 1}\n', "unknown parameter"),
    ],
)
def test_bad_transcript_configs_are_reported(tmp_path, capsys, body, message):
    path = tmp_path / "bad.toml"
    path.write_text(body)
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err


def test_missing_transcript_file_names_the_file(tmp_path, capsys):
    path = tmp_path / "cfg.toml"
    path.write_text('[transcripts]\nfold_change = "missing.csv"\n')
    assert main(["check", str(path)]) == 2
    assert "missing.csv" in capsys.readouterr().err


def test_mtf1_grid_fold_changes_match_the_model(ct_table):
    """The posterior's `fold_change` grid is model B's steady state at each (tissue, form, dose)."""
    import models as m
    from inference._transcripts import grid_fold_change

    table = read_fold_change(GLYCINATE_DIR / "fold_changes.csv")
    plan = default_transcript_plan()
    problem = build_transcript_problem(table, plan)
    model = problem.model
    p = m.default_transcription_params(model)
    params = jax.tree.map(lambda v: jnp.broadcast_to(v, (3,) + jnp.shape(v)), p)
    bio = jnp.array([1.0, 1.7])
    log_fc, _, ok = jax.jit(grid_fold_change)(problem, params, bio)
    assert bool(ok.all())
    direct = jax.jit(jax.vmap(lambda u: model.fold_change(p, u)[0]))
    for f, form_bio in enumerate([1.0, 1.7]):
        fc = direct(form_bio * problem.doses)
        np.testing.assert_allclose(np.exp(np.asarray(log_fc[0, f])), np.asarray(fc), rtol=1e-10)


def _simulated_fold_changes(tmp_path):
    """Model B fold changes (two forms, four doses, known sem 8%) from known parameters."""
    import models as m

    model = m.MTF1Transcription.for_genes(["MT1", "ZnT1", "ZIP4"], feedback=False)
    truth = m.default_transcription_params(model, mtf1_k_nM=1.5, mtf1_hill=2.5, absorption_km_mgkg=80.0, uptake_gain=12.0,
                                           amplitude=jnp.array([15.0, 2.5, 6.0]))
    f_gly, se_log = 1.6, 0.08
    fold = jax.jit(jax.vmap(lambda u: model.fold_change(truth, u)[0]))
    rng = np.random.default_rng(3)
    rows, true_fc = [], {}
    for form, f in (("sulfate", 1.0), ("glycinate", f_gly)):
        doses = np.array([25.0, 50.0, 100.0, 200.0])
        fc = np.asarray(fold(jnp.asarray(f * doses)))
        for d, row in zip(doses, fc):
            for g, v in zip(model.genes, row):
                true_fc[(g, form, d)] = v
                obs = v * np.exp(rng.normal(0.0, se_log))
                rows.append((g, "duodenum", "rat", form, d, "mg/kg", obs, se_log * obs))
    rows += [(g, "duodenum", "rat", "none", 0.0, "mg/kg", 1.0, np.nan) for g in model.genes]
    path = tmp_path / "fc.csv"
    pd.DataFrame(rows, columns=["gene", "tissue", "species", "form", "dose", "dose_unit", "fold_change", "sem"]).to_csv(path, index=False)
    table = read_fold_change(path)
    plan = default_transcript_plan()
    problem = build_transcript_problem(table, plan)
    assert not problem.unknown_noise
    return problem, plan, f_gly, true_fc


def _covers_bioavailability_and_fold_changes(post, f_gly, true_fc):
    lo, hi = post["bioavailability"].sel(other_form="glycinate").quantile([0.05, 0.95]).values
    assert lo <= f_gly <= hi, (lo, hi)
    alpha = 0.1 / len(true_fc)
    fc = post["fold_change"]
    for (g, form, d), v in true_fc.items():
        draws = fc.sel(tissue="duodenum", form=form, dose=d, gene=g).values.ravel()
        q = np.quantile(draws, [alpha / 2, 1 - alpha / 2])
        assert q[0] <= v <= q[1], (g, form, d, v, q)


@pytest.mark.slow
def test_mtf1_fit_recovers_bioavailability_and_fold_changes(tmp_path):
    """Model B on a simulated fold-change table (two forms, four doses, known sem): the 90%
    interval of glycinate's bioavailability covers the truth, and so do simultaneous 90%
    (Bonferroni) intervals of every noise-free fold change."""
    problem, plan, f_gly, true_fc = _simulated_fold_changes(tmp_path)
    # Known, small noise leaves a curved ridge: below the absorption half-saturation only
    # uptake_gain / absorption_km_mgkg is determined, and mtf1_k_nM / mtf1_hill trade off with
    # both. Measured: 2 of 1400 draws diverge at target 0.95 (seed 0); at 0.8, 10 and 11 (seeds 0
    # and 1), and 80 in a run whose warmup began at numpyro's default step size. A handful is
    # tolerated here; a reparameterisation (initial slope G / K_abs) is the fix (open item).
    sampler = SamplerConfig(num_warmup=300, num_samples=700, adapt_mass_matrix=True, target_accept_prob=0.95)
    fit = run_transcript_nuts(problem, plan, sampler,
                              key=jax.random.key(0), progress_bar=False)
    post = fit.tree["posterior"]
    assert int(fit.tree["sample_stats"]["diverging"].sum()) <= 14
    rhat = azs.rhat(post.to_dataset()[["bioavailability", "amplitude", "mtf1_hill"]])
    assert max(float(rhat[v].max()) for v in rhat.data_vars) < 1.05
    _covers_bioavailability_and_fold_changes(post, f_gly, true_fc)


@pytest.mark.long  # ~2.5 min for both; out of CI for its time budget (map/svi are covered there by
@pytest.mark.parametrize("method", ["map", "svi"])  # test_approx.py and the CLI fits in test_custom_model.py)
def test_mtf1_approximations_recover_bioavailability_and_fold_changes(tmp_path, method):
    """The same simulated table fitted by ``method="map"`` (Laplace) and ``"svi"``: the same
    coverage checks as the NUTS fit, no draw with a failed solve."""
    problem, plan, f_gly, true_fc = _simulated_fold_changes(tmp_path)
    fit = run_transcript_nuts(problem, plan, SamplerConfig(), key=jax.random.key(0), progress_bar=False,
                              method=method, approx_draws=2000)
    assert fit.tree.attrs["method"] == {"map": "laplace", "svi": "svi"}[method]
    print(fit.approximation.info)
    _covers_bioavailability_and_fold_changes(fit.tree["posterior"], f_gly, true_fc)
    assert int(fit.tree["sample_stats"]["solver_failures"].sum()) == 0


def test_raw_ct_fit_through_the_cli_writes_every_output(tmp_path, capsys):
    """Short groupwise fit of simulated raw Ct via `zinckin fit`: the plumbing, not the statistics.
    40 + 40 draws cannot pass the diagnostics gate: every output is written and the exit status
    says 'ran, not converged' (3)."""
    simulate_ct(DESIGN, baseline_ct={"ZIP4": 36.5}, seed=0).to_csv(tmp_path / "ct.csv", index=False)
    (tmp_path / "fit.toml").write_text(
        '[transcripts]\nct = "ct.csv"\nreference_genes = ["Gapdh"]\nefficiency = { Gapdh = 1.98 }\n'
        '[model]\nname = "groupwise"\n[sampler]\nnum_warmup = 40\nnum_samples = 40\n'
    )
    out = tmp_path / "run"
    assert main(["fit", str(tmp_path / "fit.toml"), "--out", str(out), "--no-progress"]) == 3
    printed = capsys.readouterr().out
    assert "log_fc[MT1 duodenum glycinate 60]" in printed and "NOT CONVERGED" in printed
    for name in ("posterior.nc", "summary.csv", "livak.csv", "run.json", "dose_response.png", "rank.png", "trace.png"):
        assert (out / name).stat().st_size > 0, name
    # the report of a transcript run: dose response per gene instead of trace panels
    assert main(["report", str(out)]) == 0
    page = (out / "report" / "report.html").read_text()
    assert 'data-file="dose_response.png"' in page and 'data-file="loo_pit.png"' in page
    assert "Gate verdict: not converged" in page and "ppc_page1.png" not in page
    import xarray as xr

    tree = xr.open_datatree(out / "posterior.nc", engine="h5netcdf")
    assert set(tree.children) >= {"posterior", "posterior_predictive", "log_likelihood", "sample_stats", "observed_data"}
    assert tree["log_likelihood"]["ct"].sizes["well"] == len(read_ct(tmp_path / "ct.csv", reference_genes=["GAPDH"]).frame)
    # a second fit into the same folder is refused, the first one is kept
    assert main(["fit", str(tmp_path / "fit.toml"), "--out", str(out), "--no-progress"]) == 2

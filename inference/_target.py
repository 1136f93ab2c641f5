"""What a fit fits: its numpyro model, the model's arguments and its population variables.

Rebuilt from a config (``zinckin ppc --prior``) or from a finished run directory (``zinckin
report``, ``profile``), so that the review tools see exactly the model the fit sampled: same data,
same priors, same solver, for imaging, transcript and user-model fits alike.
"""

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import xarray as xr


@dataclasses.dataclass
class Target:
    """One fit's model and data.

    Attributes
    ----------
    kind : ``"imaging"``, ``"transcripts"`` or ``"custom"`` (a user model, including joint fits).
    config : the parsed config.
    model, args : the numpyro model and its positional arguments; ``model(*args, predictive=True)``
        samples the observation sites instead of conditioning on them.
    names : population-level posterior variables (the summary table rows, the gate's variables).
    obs_sites : the observation sites (names in ``log_likelihood`` / ``posterior_predictive``).
    build_tree : ``build_tree(samples, key)`` makes the fit's DataTree from draws grouped by chain
        (``{name: (chains, draws, ...)}``, including ``solver_failures``), with its predictive,
        log-likelihood, observed and constant groups, exactly as a fit writes it.
    """

    kind: str
    config: object
    model: Callable
    args: tuple
    names: list[str]
    obs_sites: list[str]
    build_tree: Callable[..., xr.DataTree]


def target_from_config(config, base: Path) -> Target:
    """The :class:`Target` of a parsed config whose relative paths resolve against ``base``."""
    from ._cli import _load_config
    from ._config import CustomFitConfig, TranscriptFitConfig

    loaded = _load_config(config, base)
    if isinstance(config, TranscriptFitConfig):
        from ._transcripts import sampled_names, transcript_model, transcript_tree

        _, table, plan, problem = loaded
        site = "log_fold_change" if problem.kind == "fold_change" else "ct"
        return Target("transcripts", config, transcript_model, (problem, plan), sampled_names(problem, plan), [site],
                      lambda samples, key: transcript_tree(problem, plan, samples, None, key=key, max_tree_depth=0,
                                                           table=table))
    if isinstance(config, CustomFitConfig):
        from ._custom import custom_model, custom_tree

        problem = loaded[1]
        return Target("custom", config, custom_model, (problem,), problem.summary_names(),
                      [s for s, _, _ in problem.sites()],
                      lambda samples, key: custom_tree(problem, samples, None, key=key, max_tree_depth=0))
    from ._fit import assemble_tree, build_problem, population_var_names
    from ._model import imaging_model

    _, dataset, plan = loaded
    problem = build_problem(dataset, config.solver_config())
    cell_id = dataset.traces.cell_id
    return Target("imaging", config, imaging_model, (problem, plan), population_var_names(plan), ["intensity"],
                  lambda samples, key: assemble_tree(problem, plan, samples, None, key=key, cell_id=cell_id,
                                                     max_tree_depth=0,
                                                     predictive_cells=config.output.predictive_cells))


def target_from_run(run_dir: Path) -> Target:
    """The :class:`Target` of a finished run, from its stored ``config.toml`` and input files
    (checked against the hashes in ``run.json``; a changed input is a clear error).
    """
    from ._config import parse_config
    from ._provenance import rerun_inputs

    config_path, base = rerun_inputs(Path(run_dir))
    return target_from_config(parse_config(config_path.read_text(), config_path), base)


def flat_draws(post: xr.DataTree | xr.Dataset, names, max_draws: int | None = None, seed: int = 0) -> dict:
    """``{name: (draws, ...)}`` over chains and draws, optionally a random subset of ``max_draws``."""
    out = {n: np.asarray(post[n]).reshape((-1,) + post[n].shape[2:]) for n in names}
    total = next(iter(out.values())).shape[0]
    if max_draws is not None and total > max_draws:
        pick = np.sort(np.random.default_rng(seed).choice(total, size=max_draws, replace=False))
        out = {k: v[pick] for k, v in out.items()}
    return out

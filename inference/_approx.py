"""Quick approximate posteriors: the Laplace approximation at the MAP and SVI (numpyro autoguide).

Both are Gaussians in numpyro's unconstrained space, mapped through the model's constraints:

- ``"map"``: mean at the MAP (multi-start L-BFGS, :func:`inference._laplace.laplace_init`),
  covariance the inverse Hessian of the potential there.
- ``"svi"``: a full-rank Gaussian (:class:`numpyro.infer.autoguide.AutoMultivariateNormal`) fitted by
  maximising the ELBO with optax's Adam, started at the Laplace approximation. Where the posterior
  is skewed in the unconstrained space, the ELBO moves the Gaussian off the MAP toward the mass;
  its variances are typically too small (the reverse KL under-disperses), never a substitute for NUTS
  when intervals matter.

Failed ODE solves make a particle's log density -inf: that ELBO step is skipped
(``stable_update``), counted and reported (``nonfinite_steps``).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoMultivariateNormal
from numpyro.infer.util import constrain_fn
from numpyro.optim import optax_to_numpyro

from ._laplace import LaplaceInit


APPROX_METHODS = ("map", "svi")


@dataclasses.dataclass(frozen=True)
class SVISettings:
    """ELBO optimisation of :func:`fit_svi`.

    Attributes
    ----------
    num_steps : Adam steps.
    learning_rate : peak Adam step (in unconstrained units); cosine-decayed to 1% over the run.
    num_particles : Monte Carlo draws per ELBO gradient (vectorised).
    """

    num_steps: int = 2000
    learning_rate: float = 0.01
    num_particles: int = 4

    def __post_init__(self):
        if self.num_steps < 1 or self.num_particles < 1 or not self.learning_rate > 0:
            raise ValueError(f"invalid SVI settings: {self}")


@dataclasses.dataclass
class Approximation:
    """A Gaussian approximation in unconstrained space and its constrained draws.

    Attributes
    ----------
    method : ``"laplace"`` or ``"svi"``.
    samples : constrained draws of every latent and deterministic site, leading shape
        ``(1, num_draws)`` (one pseudo-chain).
    loc, scale_tril : the Gaussian's mean and Cholesky factor in unconstrained space
        (``scale_tril`` None for the Laplace approximation with the block-arrow metric, whose
        covariance is never formed: ``info["metric"]`` says which).
    info : figures for the run summary (MAP gradient norm, ELBO, skipped steps, ...).
    """

    method: str
    samples: dict
    loc: np.ndarray
    scale_tril: np.ndarray | None
    info: dict


def gaussian_draws(model, model_args, z_like: dict, loc, scale_tril, *, key, num_draws: int,
                   parallel: bool = True, deterministic: bool = True) -> dict:
    """``num_draws`` draws of N(loc, L L^T) in unconstrained space, constrained, with deterministic sites.

    ``scale_tril`` is ``L`` (a matrix) or a whitening factor with ``apply(u) = L u``
    (:mod:`inference._metric`). Returns arrays with a leading ``(1, num_draws)``.
    ``parallel=False`` maps over draws with ``lax.map`` (models that branch on solver success,
    where ``vmap`` would run both branches). ``deterministic=False``: the latent sites only, no
    model solve (the imaging fit computes its deterministic sites in its own pass over the
    draws, keeping the per-frame ones for the cells it keeps).
    """
    _, unravel = ravel_pytree(z_like)
    eps = jax.random.normal(key, (num_draws, loc.shape[0]), dtype=loc.dtype)
    flats = loc + (jax.vmap(scale_tril.apply)(eps) if hasattr(scale_tril, "apply") else eps @ scale_tril.T)

    def one(f):
        return constrain_fn(model, model_args, {}, unravel(f), return_deterministic=deterministic)

    draws = jax.jit(jax.vmap(one) if parallel else (lambda fs: jax.lax.map(one, fs)))(flats)
    return {k: np.asarray(v)[None] for k, v in draws.items()}


def laplace_approximation(model, model_args, laplace: LaplaceInit, *, key, num_draws: int = 2000,
                          parallel: bool = True, deterministic: bool = True) -> Approximation:
    """Draws of the Laplace approximation at ``laplace``'s MAP."""
    dim = laplace.flat_map.shape[0]
    if laplace.inverse_mass_matrix is None:  # the block-arrow metric: draws through its whitening
        samples = gaussian_draws(model, model_args, laplace.z_map, laplace.flat_map, laplace.factor, key=key,
                                 num_draws=num_draws, parallel=parallel, deterministic=deterministic)
        return Approximation(method="laplace", samples=samples, loc=np.asarray(laplace.flat_map), scale_tril=None,
                             info=_map_info(laplace))
    chol = jnp.linalg.cholesky(laplace.inverse_mass_matrix + 1e-12 * jnp.eye(dim))
    samples = gaussian_draws(model, model_args, laplace.z_map, laplace.flat_map, chol, key=key, num_draws=num_draws,
                             parallel=parallel, deterministic=deterministic)
    return Approximation(method="laplace", samples=samples, loc=np.asarray(laplace.flat_map), scale_tril=np.asarray(chol),
                         info=_map_info(laplace))


def fit_svi(model, model_args, laplace: LaplaceInit, *, key, settings: SVISettings = SVISettings(),
            num_draws: int = 2000, progress_bar: bool = False, parallel: bool = True,
            deterministic: bool = True) -> Approximation:
    """Full-rank Gaussian SVI started at the Laplace approximation; see the module docstring.

    The guide's initial mean is the MAP and its initial Cholesky factor the Laplace covariance's,
    so the optimisation starts from the better of the two cheap answers and only refines it.
    """
    if laplace.inverse_mass_matrix is None:
        raise ValueError("method = 'svi' fits a full-rank Gaussian (dim x dim) and starts from the dense Laplace "
                         "covariance; this MAP has the block-arrow metric. Fix: set [sampler] metric = \"dense\" "
                         "(memory grows as the square of the number of cells), or use method = 'map' or 'nuts'.")
    k_svi, k_draw = jax.random.split(key)
    dim = laplace.flat_map.shape[0]
    guide = AutoMultivariateNormal(model)
    schedule = optax.cosine_decay_schedule(settings.learning_rate, settings.num_steps, alpha=0.01)
    optim = optax_to_numpyro(optax.chain(optax.clip_by_global_norm(10.0), optax.adam(schedule)))
    elbo = Trace_ELBO(num_particles=settings.num_particles, vectorize_particles=True)
    svi = SVI(model, guide, optim, elbo)
    svi.init(k_svi, *model_args)  # sets up the guide's layout, needed below
    # The guide packs sites in the model's trace order; laplace.flat_map in ravel_pytree's (sorted
    # names) order. order[i] = the guide's index of sorted position i.
    order = np.asarray(ravel_pytree(guide._unpack_latent(jnp.arange(dim, dtype=laplace.flat_map.dtype)))[0]).astype(int)
    to_guide = np.argsort(order)
    cov = laplace.inverse_mass_matrix
    init = {"auto_loc": laplace.flat_map[to_guide],
            "auto_scale_tril": jnp.linalg.cholesky(cov[to_guide][:, to_guide] + 1e-12 * jnp.eye(dim))}
    result = svi.run(k_svi, settings.num_steps, *model_args, progress_bar=progress_bar, stable_update=True,
                     init_params=init)
    loc = result.params["auto_loc"][order]
    cov_fit = result.params["auto_scale_tril"] @ result.params["auto_scale_tril"].T
    scale_tril = jnp.linalg.cholesky(cov_fit[order][:, order])
    losses = np.asarray(result.losses)
    finite = np.isfinite(losses)
    tail = losses[-max(1, settings.num_steps // 10):]
    info = {**_map_info(laplace), "svi_steps": settings.num_steps, "svi_learning_rate": settings.learning_rate,
            "svi_particles": settings.num_particles,
            "elbo_final": float(-np.mean(tail[np.isfinite(tail)])) if np.isfinite(tail).any() else float("nan"),
            "elbo_initial": float(-losses[0]) if finite[0] else float("nan"),
            "nonfinite_steps": int((~finite).sum())}
    samples = gaussian_draws(model, model_args, laplace.z_map, loc, scale_tril, key=k_draw, num_draws=num_draws,
                             parallel=parallel, deterministic=deterministic)
    return Approximation(method="svi", samples=samples, loc=np.asarray(loc), scale_tril=np.asarray(scale_tril),
                         info=info)


def approximate(model, model_args, laplace: LaplaceInit, *, method: str, key, num_draws: int = 2000,
                svi: SVISettings = SVISettings(), progress_bar: bool = False, parallel: bool = True,
                deterministic: bool = True) -> Approximation:
    """``method`` ``"map"`` (Laplace) or ``"svi"``: see :func:`laplace_approximation`, :func:`fit_svi`.
    ``deterministic``: whether the draws include the model's deterministic sites (:func:`gaussian_draws`).
    """
    if method == "map":
        return laplace_approximation(model, model_args, laplace, key=key, num_draws=num_draws, parallel=parallel,
                                     deterministic=deterministic)
    if method == "svi":
        return fit_svi(model, model_args, laplace, key=key, settings=svi, num_draws=num_draws,
                       progress_bar=progress_bar, parallel=parallel, deterministic=deterministic)
    raise ValueError(f"method must be one of {APPROX_METHODS}, got {method!r}.")


def _map_info(laplace: LaplaceInit) -> dict:
    return {"map_potential": float(laplace.potential), "map_grad_norm": float(laplace.grad_norm), "metric": laplace.metric,
            "map_iterations": int(laplace.num_iter),
            "map_start_potentials": [float(v) for v in np.asarray(laplace.start_potentials)]}

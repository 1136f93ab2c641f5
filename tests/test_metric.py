"""inference/_metric.py: the block-arrow Laplace metric against dense matrices, and NUTS in its whitened coordinates."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from jax.flatten_util import ravel_pytree
from numpyro.infer import NUTS, init_to_median
from numpyro.infer.util import constrain_fn, initialize_model, potential_energy

from inference._fit import SamplerConfig, chain_starts
from inference._laplace import laplace_init
from inference._metric import (
    WHITENED_SITE,
    BlockLayout,
    Whitened,
    arrow_matvec,
    block_factor,
    block_hessian,
    block_layout,
)
from inference._sampling import sample_nuts


def _random_arrow(rng, n=5, k=3, p=2):
    """A block-arrow matrix on a shuffled layout (cells' coordinates interleaved with the population's)."""
    dim = n * k + p
    perm = rng.permutation(dim)
    layout = BlockLayout(cell_index=perm[:n * k].reshape(n, k), pop_index=perm[n * k:])
    a = rng.normal(size=(n, k, k))
    a = a @ np.swapaxes(a, 1, 2) + 3 * np.eye(k)
    b = 0.3 * rng.normal(size=(n, k, p))
    c = rng.normal(size=(p, p))
    c = c @ c.T + (n + 3) * np.eye(p)
    h = np.zeros((dim, dim))
    for i in range(n):
        h[np.ix_(layout.cell_index[i], layout.cell_index[i])] = a[i]
        h[np.ix_(layout.cell_index[i], layout.pop_index)] = b[i]
        h[np.ix_(layout.pop_index, layout.cell_index[i])] = b[i].T
    h[np.ix_(layout.pop_index, layout.pop_index)] = c
    return layout, a, b, c, h


def test_the_whitening_of_a_block_arrow_matrix_is_its_dense_inverse_square_root():
    """W W^T = H^-1, W^T is W's transpose, the marginal variances are diag(H^-1), H v by blocks is H v."""
    rng = np.random.default_rng(0)
    layout, a, b, c, h = _random_arrow(rng)
    assert np.all(np.linalg.eigvalsh(h) > 0)
    factor = block_factor(layout, a, b, c, floor=1e-12)
    dim = h.shape[0]
    w = np.asarray(jax.vmap(factor.apply, in_axes=1, out_axes=1)(jnp.eye(dim)))
    wt = np.asarray(jax.vmap(factor.apply_t, in_axes=1, out_axes=1)(jnp.eye(dim)))
    np.testing.assert_allclose(w @ w.T, np.linalg.inv(h), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(wt, w.T, atol=1e-12)
    np.testing.assert_allclose(factor.marginal_variance(), np.diag(np.linalg.inv(h)), rtol=1e-10)
    np.testing.assert_allclose(factor.inverse(), np.linalg.inv(h), rtol=1e-10, atol=1e-12)
    v = rng.normal(size=dim)
    np.testing.assert_allclose(arrow_matvec(layout, a, b, c, v), h @ v, rtol=1e-12)


def test_an_indefinite_block_arrow_matrix_gets_a_positive_definite_metric():
    """Away from the optimum a block (and the Schur complement) can be indefinite: the metric is
    still positive definite and finite, and equals H^-1 on the blocks that were definite."""
    rng = np.random.default_rng(1)
    layout, a, b, c, h = _random_arrow(rng)
    a[2] = -a[2]  # one cell's block negative definite
    factor = block_factor(layout, a, b, c, floor=1e-8)
    inv = np.asarray(factor.inverse())
    assert np.all(np.isfinite(inv)) and np.all(np.linalg.eigvalsh(0.5 * (inv + inv.T)) > 0)
    a[2] = -a[2]
    np.testing.assert_allclose(np.asarray(block_factor(layout, a, b, c, floor=1e-8).inverse()), np.linalg.inv(h),
                               rtol=1e-8, atol=1e-12)


def _hierarchical(y):
    """Cells with a mean and a noise sd each (plate "cell"), a population mean and spread, and one more global."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 3.0))
    tau = numpyro.sample("tau", dist.LogNormal(jnp.log(0.7), 0.2))
    offset = numpyro.sample("offset", dist.Normal(0.0, 1.0))
    with numpyro.plate("cell", y.shape[0]):
        theta = numpyro.sample("theta", dist.Normal(mu, tau))
        sigma = numpyro.sample("sigma", dist.LogNormal(jnp.log(0.5), 0.3))
    with numpyro.plate("cell", y.shape[0], dim=-2), numpyro.plate("obs", y.shape[1], dim=-1):
        numpyro.sample("y", dist.Normal(theta[:, None] + 0.1 * offset, sigma[:, None]), obs=y)


def _data(num_cells, rng=None):
    rng = rng or np.random.default_rng(0)
    return jnp.asarray(rng.normal(0, 1, (num_cells, 1)) + rng.normal(1, 0.5, (num_cells, 5)))


def _potential(model, y):
    info, potential_fn, _, tr = initialize_model(jax.random.key(0), model, model_args=(y,),
                                                 init_strategy=init_to_median(num_samples=5))
    flat, unravel = ravel_pytree(info.z)
    return info, tr, flat, unravel, potential_fn


def test_the_layout_finds_each_cells_coordinates_in_the_flat_vector():
    y = _data(6)
    info, tr, flat, unravel, _ = _potential(_hierarchical, y)
    layout = block_layout(tr, info.z, "cell")
    assert layout.cell_index.shape == (6, 2) and layout.pop_index.shape == (3,)
    tags = {name: jnp.full(jnp.shape(v), -1.0) for name, v in info.z.items()}
    tags["theta"] = jnp.arange(6.0)
    tags["sigma"] = jnp.arange(6.0) + 100
    flat_tags = np.asarray(ravel_pytree(tags)[0])
    # row i holds cell i's theta and sigma, in the same site order in every row (sorted names: sigma first)
    np.testing.assert_array_equal(flat_tags[layout.cell_index], np.stack([np.arange(6.0) + 100, np.arange(6.0)], 1))
    assert np.all(flat_tags[layout.pop_index] == -1)
    assert block_layout(tr, info.z, "no such plate") is None


def test_the_colored_hessian_is_the_exact_hessian_from_2_k_plus_p_plus_2_gradients():
    """Central differences along the 2 + 3 colored directions give every block of jax.hessian's
    matrix, with 2 (k + p) + 2 gradient calls whatever the number of cells."""
    y = _data(40)
    info, tr, flat, unravel, potential_fn = _potential(_hierarchical, y)
    layout = block_layout(tr, info.z, "cell")
    grad = jax.jit(jax.grad(lambda x: potential_fn(unravel(x))))
    calls = []

    def counted(x):
        calls.append(1)
        return np.asarray(grad(jnp.asarray(x)))

    x = np.asarray(flat) + 0.1 * np.random.default_rng(2).normal(size=flat.shape)
    a, b, c = block_hessian(counted, x, layout, 1e-5)
    assert len(calls) == 2 * (2 + 3) + 2
    h = np.asarray(jax.hessian(lambda x: potential_fn(unravel(x)))(jnp.asarray(x)))
    for i in range(40):
        np.testing.assert_allclose(a[i], h[np.ix_(layout.cell_index[i], layout.cell_index[i])], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(b[i], h[np.ix_(layout.cell_index[i], layout.pop_index)], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(c, h[np.ix_(layout.pop_index, layout.pop_index)], rtol=1e-6, atol=1e-6)


def test_cells_coupled_outside_the_population_are_refused():
    """A term linking neighbouring cells directly breaks the block-arrow structure: the random
    Hessian-vector probe sees it and the error names the fix."""

    def coupled(y):
        _hierarchical(y)
        with numpyro.plate("cell", y.shape[0]):
            w = numpyro.sample("w", dist.Normal(0.0, 1.0))
        numpyro.factor("neighbours", -2.0 * jnp.sum((w[1:] - w[:-1]) ** 2))

    y = _data(12)
    info, tr, flat, unravel, potential_fn = _potential(coupled, y)
    layout = block_layout(tr, info.z, "cell")
    grad = jax.jit(jax.grad(lambda x: potential_fn(unravel(x))))
    with pytest.raises(ValueError, match='metric = "dense"'):
        block_hessian(lambda x: np.asarray(grad(jnp.asarray(x))), np.asarray(flat), layout, 1e-5)


def test_block_and_dense_laplace_agree_and_auto_picks_block_from_64_cells():
    y = _data(70)
    dense = laplace_init(_hierarchical, (y,), key=jax.random.key(0), host_loop=True, tol=1e-8, max_iter=300,
                         metric="dense")
    block = laplace_init(_hierarchical, (y,), key=jax.random.key(0), host_loop=True, tol=1e-8, max_iter=300,
                         metric="auto")
    assert dense.metric == "dense" and block.metric == "block" and block.inverse_mass_matrix is None
    np.testing.assert_allclose(block.potential, dense.potential, rtol=1e-9)
    np.testing.assert_allclose(block.flat_map, dense.flat_map, atol=1e-4)
    inv = np.asarray(dense.inverse_mass_matrix)
    np.testing.assert_allclose(block.factor.inverse(), inv, atol=1e-5 * np.max(np.abs(inv)))
    few = laplace_init(_hierarchical, (y[:10],), key=jax.random.key(0), host_loop=True, max_iter=5, metric="auto")
    assert few.metric == "dense"
    with pytest.raises(ValueError, match="host loop"):
        laplace_init(_hierarchical, (y,), key=jax.random.key(0), max_iter=5, metric="block")


def test_the_whitened_model_has_the_models_density_and_constrained_sites():
    y = _data(20)
    lap = laplace_init(_hierarchical, (y,), key=jax.random.key(0), host_loop=True, max_iter=50, metric="block")
    space = Whitened(_hierarchical, (y,), lap.flat_map, lap.factor)
    _, unravel = ravel_pytree(lap.z_map)
    for seed in range(3):
        u = jax.random.normal(jax.random.key(seed), lap.flat_map.shape)
        z = unravel(lap.flat_map + lap.factor.apply(u))
        np.testing.assert_allclose(potential_energy(space.model, (y,), {}, {WHITENED_SITE: u}),
                                   potential_energy(_hierarchical, (y,), {}, z), rtol=1e-12)
        theirs = constrain_fn(_hierarchical, (y,), {}, z)
        ours = space.draws(u[None, None])
        assert set(ours) == set(theirs)
        for name in theirs:
            np.testing.assert_allclose(ours[name][0, 0], theirs[name], rtol=1e-12)


def _gaussian_cells(y, noise=0.4):
    """Normal means per cell around a normal population mean, known spreads: the posterior is Gaussian."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 2.0))
    with numpyro.plate("cell", y.shape[0]):
        theta = numpyro.sample("theta", dist.Normal(mu, 0.8))
    with numpyro.plate("cell", y.shape[0], dim=-2), numpyro.plate("obs", y.shape[1], dim=-1):
        numpyro.sample("y", dist.Normal(theta[:, None], noise), obs=y)


def test_nuts_in_whitened_coordinates_samples_the_exact_gaussian_posterior():
    """NUTS on the whitened model (unit metric, 2 chains started by chain_starts) against the
    closed-form posterior of a Gaussian hierarchy of 80 cells: means and sds within Monte Carlo error."""
    rng = np.random.default_rng(3)
    y = jnp.asarray(rng.normal(0.5, 0.8, (80, 1)) + rng.normal(0, 0.4, (80, 4)))
    lap = laplace_init(_gaussian_cells, (y,), key=jax.random.key(0), host_loop=True, tol=1e-8, max_iter=200,
                       metric="block")
    # the exact posterior: precision matrix of (theta_1..n, mu)
    n, m = y.shape
    prec = np.zeros((n + 1, n + 1))
    prec[:n, :n] = np.eye(n) * (m / 0.4**2 + 1 / 0.8**2)
    prec[:n, n] = prec[n, :n] = -1 / 0.8**2
    prec[n, n] = n / 0.8**2 + 1 / 2.0**2
    rhs = np.concatenate([np.asarray(y).sum(1) / 0.4**2, [0.0]])
    cov = np.linalg.inv(prec)
    mean = cov @ rhs
    config = SamplerConfig(num_warmup=200, num_samples=1000, num_chains=2)
    starts = chain_starts(lap, 2, key=jax.random.key(1), potential_model=(_gaussian_cells, y), whitened=True)
    space = Whitened(_gaussian_cells, (y,), lap.flat_map, lap.factor)
    samples, extra = sample_nuts(NUTS(space.model, step_size=0.1, adapt_mass_matrix=False), config, key=jax.random.key(2), model_args=(y,),
                                 init_params=starts, extra_fields=("diverging", "num_steps"), progress_bar=False,
                                 deterministic=False)
    draws = space.draws(samples[WHITENED_SITE])
    assert draws["theta"].shape == (2, 1000, n)
    flat = np.concatenate([draws["theta"].reshape(-1, n), draws["mu"].reshape(-1, 1)], 1)
    sd = np.sqrt(np.diag(cov))
    # 2000 draws of a well-mixed chain: the mean's Monte Carlo error is about sd / 40
    assert np.max(np.abs(flat.mean(0) - mean) / sd) < 0.15
    assert np.max(np.abs(flat.std(0) / sd - 1)) < 0.15
    assert not extra["diverging"].any()
    # the same sampler as NUTS on the model itself with the dense metric W W^T (the same matrix):
    # trajectories of the same length on average (the momenta's random numbers differ)
    dense_lap = laplace_init(_gaussian_cells, (y,), key=jax.random.key(0), host_loop=True, tol=1e-8, max_iter=200,
                             metric="dense")
    dense = NUTS(_gaussian_cells, step_size=0.1, dense_mass=True, inverse_mass_matrix=dense_lap.inverse_mass_matrix,
                 adapt_mass_matrix=False)
    _, dense_extra = sample_nuts(dense, config, key=jax.random.key(2), model_args=(y,), progress_bar=False,
                                 init_params=chain_starts(dense_lap, 2, key=jax.random.key(1),
                                                          potential_model=(_gaussian_cells, y)),
                                 extra_fields=("diverging", "num_steps"))
    ratio = extra["num_steps"].mean() / dense_extra["num_steps"].mean()
    print(f"leapfrog steps per draw: whitened {extra['num_steps'].mean():.2f}, dense {dense_extra['num_steps'].mean():.2f}")
    assert 0.85 < ratio < 1.15


def test_the_metric_setting_is_checked_and_only_imaging_fits_take_the_block_form():
    import pydantic

    from inference._config import CustomSamplerSection, SamplerSection, TranscriptSamplerSection

    assert SamplerSection(metric="block").nuts().metric == "block"
    assert SamplerSection().nuts().metric == "auto"
    for section in (TranscriptSamplerSection, CustomSamplerSection):
        assert section(metric="dense").metric == "dense"
        with pytest.raises(pydantic.ValidationError):
            section(metric="block")
    with pytest.raises(ValueError, match="metric must be one of"):
        SamplerConfig(metric="diagonal")

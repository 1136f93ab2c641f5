"""inference/_sampling.py: warmup and draws from one compiled program are numpyro's NUTS chains."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer import MCMC, NUTS

from inference._fit import SamplerConfig
from inference._sampling import sample_nuts


def _model(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(2.0))
    numpyro.deterministic("mu_twice", 2.0 * mu)
    numpyro.sample("y", dist.Normal(mu, sigma), obs=y)


Y = jnp.asarray(np.random.default_rng(0).normal(1.5, 0.7, size=30))


@pytest.mark.parametrize("num_chains, chain_method", [(1, "sequential"), (2, "sequential"), (2, "vectorized")])
def test_chains_are_numpyros_chains_draw_for_draw(num_chains, chain_method):
    """The same key, starts and kernel settings through ``sample_nuts`` (warmup in pieces of the
    one program, then the draws) and through numpyro's ``MCMC.run``: the same draws and extra
    fields, to rounding (the programs are compiled differently)."""
    config = SamplerConfig(num_warmup=60, num_samples=40, num_chains=num_chains, chain_method=chain_method)
    starts = {"mu": jnp.linspace(-1.0, 1.0, num_chains), "sigma": jnp.linspace(-0.5, 0.5, num_chains)}  # unconstrained
    key = jax.random.key(3)

    def kernel():
        return NUTS(_model, max_tree_depth=6)

    ours, extra = sample_nuts(kernel(), config, key=key, model_args=(Y,), progress_bar=False,
                              init_params=starts if num_chains > 1 else {k: v[0] for k, v in starts.items()},
                              extra_fields=("diverging", "num_steps"))
    mcmc = MCMC(kernel(), num_warmup=60, num_samples=40, num_chains=num_chains, chain_method=chain_method,
                progress_bar=False)
    mcmc.run(key, Y, init_params=starts if num_chains > 1 else {k: v[0] for k, v in starts.items()},
             extra_fields=("diverging", "num_steps"))
    theirs = mcmc.get_samples(group_by_chain=True)
    assert set(ours) == {"mu", "sigma", "mu_twice"} and ours["mu"].shape == (num_chains, 40)
    for k in ours:
        np.testing.assert_allclose(ours[k], np.asarray(theirs[k]), rtol=1e-9, atol=1e-12)
    fields = mcmc.get_extra_fields(group_by_chain=True)
    np.testing.assert_array_equal(extra["num_steps"], np.asarray(fields["num_steps"]))
    assert extra["solver_failures_in_trajectory"].shape == (num_chains, 40)

import jax
import numpyro
import pytest


jax.config.update("jax_enable_x64", True)
numpyro.enable_validation()


@pytest.fixture(scope="session")
def example_protocol():
    """The bundled example protocol as model inputs (minutes)."""
    from data import EXAMPLE_DIR, read_protocol

    return read_protocol(EXAMPLE_DIR / "protocol.toml").to_inputs(30.0)

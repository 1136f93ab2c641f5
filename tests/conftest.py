import atexit
import shutil
import tempfile

import jax
import numpyro
import pytest


jax.config.update("jax_enable_x64", True)
# identical programs compiled by several tests (the same fit run twice, the same model in several
# checks) are compiled once per session
_CACHE = tempfile.mkdtemp(prefix="zinckin-jax-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
numpyro.enable_validation()


@pytest.fixture(scope="session")
def example_protocol():
    """The bundled example protocol as model inputs (minutes)."""
    from data import EXAMPLE_DIR, read_protocol

    return read_protocol(EXAMPLE_DIR / "protocol.toml").to_inputs(30.0)


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Drop in-memory compiled programs after each test module.

    Every compiled XLA program keeps its own memory mappings; a worker process that runs many
    fits accumulates them until LLVM fails with "Cannot allocate memory" (the kernel's
    ``vm.max_map_count`` is 65530 here). Programs shared between modules come back from the
    session's persistent compilation cache.
    """
    yield
    jax.clear_caches()

"""NUTS in chunks, with the sampler state saved after warmup and after every chunk.

Every NUTS fit (imaging, transcripts, user models) samples through :func:`sample_nuts`. Without a
checkpoint path it is one numpyro ``MCMC.run``. With one, warmup runs first (``MCMC.warmup``) and
the kept draws come in chunks of ``chunk_size`` iterations; each chunk continues from the
previous chunk's last state (position, step size, metric and the per-chain random key), so the
chain is the same Markov chain as an uninterrupted run, draw for draw. After warmup and after each
chunk, the state and every draw so far are written to ``checkpoint.pkl`` atomically (temporary
file, fsync, rename): a process killed at any moment leaves the last complete checkpoint.

Resuming reads the checkpoint, checks that it belongs to the same fit (a fingerprint of the
resolved config, the input files and the sampler settings), restores the state and runs the
remaining chunks. Kernel functions are rebuilt by one ``kernel.init`` at the stored starting
points (no warmup is repeated).
"""

import dataclasses
import operator
import os
import pickle
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.infer import MCMC


CHECKPOINT_NAME = "checkpoint.pkl"
_KEY_TAG = "__prng_key__"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed (another fit's, or unreadable)."""


def _to_host(tree):
    """Device arrays to NumPy; typed PRNG keys to their raw data (picklable across processes)."""

    def leaf(x):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return (_KEY_TAG, str(jax.random.key_impl(x)), np.asarray(jax.random.key_data(x)))
        return np.asarray(x) if isinstance(x, jax.Array) else x

    return jax.tree.map(leaf, tree)


def _from_host(tree):
    def is_key(x):
        return type(x) is tuple and len(x) == 3 and isinstance(x[0], str) and x[0] == _KEY_TAG

    def leaf(x):
        if is_key(x):
            return jax.random.wrap_key_data(x[2], impl=x[1])
        return jax.numpy.asarray(x) if isinstance(x, np.ndarray) else x

    return jax.tree.map(leaf, tree, is_leaf=is_key)


def _atomic_pickle(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_checkpoint(path: Path) -> dict:
    """The checkpoint at ``path`` (a dict), or a :class:`CheckpointError` naming the problem."""
    try:
        with open(path, "rb") as f:
            ck = pickle.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no checkpoint to resume from. Fix: start the fit without --resume.") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint ({e}). Fix: delete it and refit with --overwrite.") from None
    if not isinstance(ck, dict) or ck.get("format") != 1:
        raise CheckpointError(f"{path}: not a zinckin checkpoint. Fix: delete it and refit with --overwrite.")
    return ck


@dataclasses.dataclass(frozen=True)
class Checkpointing:
    """Where and how a NUTS run saves its progress.

    Attributes
    ----------
    path : the checkpoint file (``RUN_DIR/checkpoint.pkl``).
    fingerprint : identifies the fit (resolved config, input files, sampler); checked on resume.
    resume : continue from ``path`` instead of starting over.
    chunk_size : kept iterations per chunk between checkpoints.
    meta : stored with every checkpoint (the config text and the folder its paths resolve
        against, so that ``zinckin fit --resume RUN_DIR`` needs nothing else).
    on_chunk : called as ``on_chunk(draws_done, num_samples)`` after each saved chunk.
    """

    path: Path
    fingerprint: str
    resume: bool = False
    chunk_size: int = 250
    meta: dict = dataclasses.field(default_factory=dict)
    on_chunk: object = None


def _concat(chunks):
    return {k: np.concatenate([c[k] for c in chunks], axis=1) for k in chunks[0]}


def _chunk_program(kernel, sampler, model_args, extra_fields):
    """``run_chunk(state, n) -> (state, (draws, fields))``: ``n`` NUTS transitions of every chain.

    One compiled program per chunk length (jit with ``n`` static), reused for every chunk; numpyro's
    ``MCMC.run`` would trace and compile its sampling loop again on every call. The transitions are
    ``kernel.sample``, as in ``MCMC.run``, so the chain is the same. ``draws`` are the constrained
    sample sites and deterministic sites, ``fields`` the extra fields, both ``(chain, n, ...)``.
    """
    postprocess = kernel.postprocess_fn(model_args, {})
    getters = {name: operator.attrgetter(name) for name in extra_fields}
    # vectorized chains: kernel.init batched kernel.sample over chains, so the scan carries all chains
    batched = sampler.num_chains > 1 and sampler.chain_method == "vectorized"
    post = jax.vmap(postprocess) if batched else postprocess

    def chains_scan(state, n):
        def step(st, _):
            st = kernel.sample(st, model_args, {})
            return st, (post(st.z), {k: g(st) for k, g in getters.items()})

        return jax.lax.scan(step, state, None, length=n)

    def chunk(state, n):
        if sampler.num_chains == 1:
            state, out = chains_scan(state, n)
            return state, jax.tree.map(lambda x: x[None], out)
        if batched:
            state, out = chains_scan(state, n)
            return state, jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), out)
        return jax.lax.map(lambda st: chains_scan(st, n), state)

    return jax.jit(chunk, static_argnums=1)


def sample_nuts(kernel, sampler, *, key, model_args, init_params, extra_fields, progress_bar=True,
                checkpoint: Checkpointing | None = None):
    """Run NUTS; returns ``(samples, extra)``, both dicts of arrays grouped by chain ``(chain, draw, ...)``.

    Parameters
    ----------
    kernel : the numpyro NUTS kernel.
    sampler : :class:`inference._fit.SamplerConfig`.
    key : PRNG key of the MCMC run.
    model_args : positional arguments of the model.
    init_params : unconstrained starting points, leading dim ``num_chains``.
    extra_fields : numpyro extra fields to collect.
    checkpoint : where to save progress (:class:`Checkpointing`); None samples in one piece.
    """
    mcmc = MCMC(kernel, num_warmup=sampler.num_warmup, num_samples=sampler.num_samples, num_chains=sampler.num_chains,
                chain_method=sampler.chain_method, progress_bar=progress_bar)
    if checkpoint is None:
        mcmc.run(key, *model_args, extra_fields=extra_fields, init_params=init_params)
        return ({k: np.asarray(v) for k, v in mcmc.get_samples(group_by_chain=True).items()},
                {k: np.asarray(v) for k, v in mcmc.get_extra_fields(group_by_chain=True).items()})
    cp = checkpoint
    checkpoint, fingerprint = Path(cp.path), cp.fingerprint
    chunk_size = max(1, min(cp.chunk_size, sampler.num_samples))

    def save(state, samples, extra, done):
        _atomic_pickle({"format": 1, "fingerprint": fingerprint, "meta": cp.meta, "state": _to_host(state),
                        "samples": samples, "extra": extra, "num_done": done, "num_samples": sampler.num_samples},
                       checkpoint)

    if cp.resume:
        ck = read_checkpoint(checkpoint)
        if ck["fingerprint"] != fingerprint:
            raise CheckpointError(f"{checkpoint}: belongs to another fit (its config, data or sampler settings "
                                  "differ from this one). Fix: resume with the run's own config, or refit with --overwrite.")
        # numpyro builds the kernel's sample function in kernel.init; run it once at the stored starts
        vectorized = sampler.chain_method == "vectorized" and sampler.num_chains > 1
        starts = init_params if vectorized else jax.tree.map(lambda x: x[0], init_params)
        keys = jax.random.split(key, sampler.num_chains) if vectorized else key
        kernel.init(keys, sampler.num_warmup, starts, model_args, {})
        state, samples, extra = _from_host(ck["state"]), list(ck["samples"]), list(ck["extra"])
    else:
        mcmc_w = MCMC(kernel, num_warmup=sampler.num_warmup, num_samples=chunk_size, num_chains=sampler.num_chains,
                      chain_method=sampler.chain_method, progress_bar=progress_bar)
        mcmc_w.warmup(key, *model_args, extra_fields=extra_fields, init_params=init_params)
        state, samples, extra = mcmc_w.post_warmup_state, [], []
        save(state, samples, extra, 0)
    done = sum(s[next(iter(s))].shape[1] for s in samples) if samples else 0
    run_chunk = _chunk_program(kernel, sampler, model_args, extra_fields)
    while done < sampler.num_samples:
        n = min(chunk_size, sampler.num_samples - done)
        state, (draws, fields) = run_chunk(state, n)
        samples.append({k: np.asarray(v) for k, v in draws.items()})
        extra.append({k: np.asarray(v) for k, v in fields.items()})
        done += n
        save(state, samples, extra, done)
        if progress_bar:
            print(f"sampled {done}/{sampler.num_samples} draws per chain (checkpoint saved)", flush=True)
        if cp.on_chunk is not None:
            cp.on_chunk(done, sampler.num_samples)
    return _concat(samples), _concat(extra)

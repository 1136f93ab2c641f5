"""NUTS in chunks, with the sampler state saved after warmup and after every chunk.

Every NUTS fit (imaging, transcripts, user models) samples through :func:`sample_nuts`: warmup and
the kept draws come from one compiled program of numpyro's NUTS transitions (warmup in pieces, the
draws in one piece or, with a checkpoint, in chunks of ``chunk_size`` iterations); each piece continues from the
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
import functools
import inspect
import operator
import os
import pickle
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from models import using_row_devices


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
    """

    path: Path
    fingerprint: str
    resume: bool = False
    chunk_size: int = 250
    meta: dict = dataclasses.field(default_factory=dict)


def _concat(chunks):
    return {k: np.concatenate([c[k] for c in chunks], axis=1) for k in chunks[0]}


def _chunk_program(kernel, sampler, model_args, extra_fields, length: int, deterministic: bool = True):
    """``run_chunk(state, n, keep) -> (state, (draws, fields))``: ``n <= length`` NUTS transitions of every chain.

    One compiled program for the whole fit: ``n`` and ``keep`` are traced, so warmup pieces and
    chunks of any length up to ``length`` reuse it (numpyro's ``MCMC.warmup`` and ``MCMC.run``
    trace and compile their loop again for every chain and every call). The transitions are
    ``kernel.sample``, as in ``MCMC.run``; warmup is the same transitions while the state's
    iteration count is below ``num_warmup`` (the kernel adapts step size and metric then). With
    ``keep`` the constrained sample and deterministic sites (``draws``) and the extra fields
    (``fields``) of each transition are written into buffers ``(chain, length, ...)`` and
    returned as host arrays ``(chain, n, ...)``; without it (warmup) they are not computed (the
    deterministic sites can hold a full ODE solve) and ``None`` is returned in their place.
    ``deterministic=False`` leaves the deterministic sites out of ``draws`` (a caller that
    computes them after sampling saves their solve in this program's compile).
    """
    if deterministic:
        postprocess = kernel.postprocess_fn(model_args, {})
    else:
        from numpyro.infer.util import constrain_fn

        postprocess = functools.partial(constrain_fn, kernel.model, model_args, {}, return_deterministic=False)
    getters = {name: operator.attrgetter(name) for name in extra_fields}
    devices = chain_devices(sampler)
    # vectorized chains: kernel.init batched kernel.sample over chains, so the loop carries all chains
    batched = sampler.num_chains > 1 and sampler.chain_method == "vectorized"
    post = jax.vmap(postprocess) if batched else postprocess

    @jax.jit  # traced once: eval_shape below and the cond in the loop share the trace
    def outputs(st):
        fields = {k: g(st) for k, g in getters.items()}
        fields.update(_position(st))
        return post(st.z), fields

    def chains_loop(state, n, keep):
        shapes = jax.eval_shape(outputs, state)

        def skip(_):
            return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

        def step(st, i):
            def go(st):
                st = kernel.sample(st, model_args, {})
                return st, jax.lax.cond(keep, outputs, skip, st)
            return jax.lax.cond(i < n, go, lambda st: (st, skip(st)), st)

        return jax.lax.scan(step, state, jnp.arange(length))

    def chunk(state, n, keep):
        if sampler.num_chains == 1:
            state, out = chains_loop(state, n, keep)
            return state, jax.tree.map(lambda x: x[None], out)
        if batched:
            state, out = chains_loop(state, n, keep)
            return state, jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), out)
        return jax.lax.map(lambda st: chains_loop(st, n, keep), state)

    program = jax.jit(chunk) if devices is None else _per_device(chains_loop, devices, sampler.num_chains)

    def run_chunk(state, n: int, keep: bool = True):
        if not 0 < n <= length:
            raise ValueError(f"a chunk of {n} transitions does not fit the program's {length}")
        state, out = program(state, jnp.asarray(n, jnp.int32), jnp.asarray(keep))
        # sliced on the host: an eager slice would compile a program per array; warmup's are dropped
        return state, (jax.tree.map(lambda x: np.asarray(x)[:, :n], out) if keep else None)

    return run_chunk


def _initial_state(kernel, sampler, key, model_args, init_params):
    """The sampler state before warmup: ``kernel.init`` as numpyro's ``MCMC`` calls it.

    One chain: the key itself, ``init_params`` without a chain axis (as :func:`inference._fit.chain_starts`
    returns them). Several: ``split(key, num_chains)``, one ``kernel.init`` per chain stacked along
    a leading chain axis, or for ``chain_method = "vectorized"`` one batched ``kernel.init`` (which
    also batches ``kernel.sample``).
    """
    if sampler.num_chains == 1:
        return kernel.init(key, sampler.num_warmup, init_params, model_args, {})
    keys = jax.random.split(key, sampler.num_chains)
    if sampler.chain_method == "vectorized":
        return kernel.init(keys, sampler.num_warmup, init_params, model_args, {})
    return _stack([kernel.init(keys[c], sampler.num_warmup, jax.tree.map(lambda x, c=c: x[c], init_params),
                               model_args, {}) for c in range(sampler.num_chains)])


def chain_devices(sampler) -> list | None:
    """The devices of ``chain_method = "sharded"`` (None for the other methods or one chain).

    The devices of the job (every process's under ``jax.distributed``), the same number ``k`` from
    each process, ``k * process_count`` dividing ``num_chains``, ``k`` as large as that allows:
    4 chains use 4 of 8 devices, 6 chains 3 of 4. Chain ``c`` runs on device
    ``c // (num_chains // len(devices))``. Raises ``ValueError`` when ``num_chains`` is not a
    multiple of the number of processes.
    """
    if sampler.chain_method != "sharded" or sampler.num_chains == 1:
        return None
    procs = jax.process_count()
    if sampler.num_chains % procs:
        raise ValueError(f"chain_method = 'sharded' over {procs} processes needs num_chains to be a multiple of "
                         f"{procs}, got {sampler.num_chains}. Fix: set [sampler] num_chains accordingly.")
    by_process = [[d for d in jax.devices() if d.process_index == p] for p in range(procs)]
    local = min(len(ds) for ds in by_process)
    k = max(k for k in range(1, local + 1) if sampler.num_chains % (k * procs) == 0)
    return [d for ds in by_process for d in ds[:k]]


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _stack(trees):
    """Stack per-chain pytrees (device arrays, typed PRNG keys) along a new leading chain axis, on the host."""

    def leaf(*xs):
        if _is_key(xs[0]):
            return jax.random.wrap_key_data(np.stack([np.asarray(jax.random.key_data(x)) for x in xs]),
                                            impl=jax.random.key_impl(xs[0]))
        return np.stack([np.asarray(x) for x in xs])

    return jax.tree.map(leaf, *trees)


def _per_device(one_chain, devices, num_chains):
    """``run(state, *args) -> (state, out)`` for sharded chains: ``one_chain(state, *args)`` for every chain
    (leading axis of ``state``; outputs stacked the same way), each device running its own block
    of chains one after another, all devices at once (one host thread per device).

    Every chain goes through the same single-chain program, whatever the number of devices, so
    the draws are the same bit for bit on 1 or on N devices. (One ``shard_map`` program over a
    sharded chain axis would run the chains in lock step, each NUTS tree as deep as the deepest
    chain's, and not bit-identically.) The
    program is compiled once per device. With several processes (``jax.distributed``) each runs
    the chains of its own devices and the results are gathered on every process.
    """
    from concurrent.futures import ThreadPoolExecutor

    from jax.experimental import multihost_utils

    program = jax.jit(one_chain)
    per = num_chains // len(devices)
    mine = [i for i, d in enumerate(devices) if d.process_index == jax.process_index()]
    # chain_devices takes the same number from every process, in process order: blocks are contiguous

    def run_block(i, state, args):
        device = devices[i]
        outs = []
        for c in range(i * per, (i + 1) * per):
            st, a = jax.device_put((jax.tree.map(lambda x, c=c: x[c], state), args), device)
            outs.append(jax.block_until_ready(program(st, *a)))
        return outs

    def run(state, *args):
        with ThreadPoolExecutor(len(mine)) as pool:
            blocks = list(pool.map(lambda i: run_block(i, state, args), mine))
        local = _stack([out for block in blocks for out in block])
        if jax.process_count() == 1:
            return local

        def gather(x):
            if _is_key(x):
                return jax.random.wrap_key_data(np.asarray(gather(np.asarray(jax.random.key_data(x)))),
                                                impl=jax.random.key_impl(x))
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))

        return jax.tree.map(gather, local)

    return run


def chain_layout(runner):
    """Decorator of the fit functions (their sampler settings are the argument ``config``): with
    ``chain_method = "sharded"`` the whole fit, MAP included, solves all rows of a chain on one
    device (:func:`models.using_row_devices`), since the devices hold chains instead; every
    program of the fit is then traced with one layout.
    """
    signature = inspect.signature(runner)

    @functools.wraps(runner)
    def run(*args, **kwargs):
        if chain_devices(signature.bind(*args, **kwargs).arguments["config"]) is None:
            return runner(*args, **kwargs)
        with using_row_devices(jax.local_devices()[:1]):
            return runner(*args, **kwargs)

    return run


def _position(state) -> dict:
    """What a transition starts from besides the adapted step size and metric: z and the key."""
    return {"_z": state.z, "_key": jax.random.key_data(state.rng_key)}


def _chain(tree, c, num_chains):
    return jax.tree.map(lambda x: x[c], tree) if num_chains > 1 else tree


# per replayed transition of the last replay_failures call: max |replayed - recorded| position;
# read by hand to measure how faithful the replay is (the figures in docs/inference.md)
replay_gap: list[float] = []


def replay_failures(kernel, sampler, model_args, final_state, start: dict, fields: dict) -> np.ndarray:
    """Failed solves inside each draw's NUTS trajectory, ``(chain, draw)`` ints.

    A failed solve makes the potential energy infinite, which numpyro's tree building treats as a
    divergence: the trajectory stops there and the transition is flagged ``diverging``. So only
    divergent transitions can hold failures, and only the accepted point of a transition is
    returned by the sampler. This replays each divergent transition after sampling, from the
    stored position and key of the draw before it, with the step size and metric of the run
    (constant after warmup), through a potential that counts the rows whose solve failed (the
    model's ``solver_failures`` site) on the host. Transitions without a divergence count 0.
    Returns zeros when the model has no ``solver_failures`` site.
    """
    from numpyro.infer import NUTS
    from numpyro.infer.util import initialize_model

    diverging = np.asarray(fields["diverging"])
    counts = np.zeros(diverging.shape, dtype=int)
    if not diverging.any():
        return counts
    info = initialize_model(jax.random.key(0), kernel.model, model_args=model_args)
    potential, postprocess = info.potential_fn, info.postprocess_fn
    if "solver_failures" not in postprocess(info.param_info.z):
        return counts
    seen = []

    def counting_potential(z):
        jax.debug.callback(lambda n: seen.append(int(n)), postprocess(z)["solver_failures"])
        return potential(z)

    impl = str(jax.random.key_impl(final_state.rng_key))
    replay = NUTS(potential_fn=counting_potential, max_tree_depth=kernel._max_tree_depth,
                  dense_mass=kernel._dense_mass, adapt_step_size=False, adapt_mass_matrix=False)
    step = None
    replay_gap.clear()
    for c, i in zip(*np.nonzero(diverging)):
        before = start if i == 0 else {"_z": jax.tree.map(lambda x: x[:, i - 1], fields["_z"]),
                                       "_key": fields["_key"][:, i - 1]}
        z = jax.tree.map(lambda x: jnp.asarray(x[c]), before["_z"])
        state = replay.init(jax.random.key(0), 0, z)
        state = state._replace(adapt_state=_chain(final_state.adapt_state, c, sampler.num_chains),
                               rng_key=jax.random.wrap_key_data(jnp.asarray(before["_key"][c]), impl=impl))
        if step is None:
            step = jax.jit(lambda st: replay.sample(st, (), {}))
        seen.clear()
        new = jax.block_until_ready(step(state))
        jax.effects_barrier()
        counts[c, i] = sum(seen)
        recorded = jax.tree.map(lambda x: x[c, i], fields["_z"])
        replay_gap.append(max(float(np.max(np.abs(np.asarray(new.z[k]) - recorded[k]))) for k in recorded))
    return counts


def sample_nuts(kernel, sampler, *, key, model_args, init_params, extra_fields, progress_bar=True,
                checkpoint: Checkpointing | None = None, deterministic: bool = True):
    """Run NUTS; returns ``(samples, extra)``, both dicts of arrays grouped by chain ``(chain, draw, ...)``.

    The chains start from :func:`_initial_state` (numpyro's ``kernel.init``, keys as ``MCMC``
    splits them); warmup and the kept draws both run :func:`_chunk_program`'s one program, the
    draws in chunks when checkpointing (numpyro's transitions, as ``MCMC.warmup`` and
    ``MCMC.run`` take them, compiled once instead of per chain and per call). ``extra``
    holds the requested extra fields and ``solver_failures_in_trajectory`` (:func:`replay_failures`).

    Parameters
    ----------
    kernel : the numpyro NUTS kernel.
    sampler : :class:`inference._fit.SamplerConfig`.
    key : PRNG key of the MCMC run.
    model_args : positional arguments of the model.
    init_params : unconstrained starting points, leading dim ``num_chains``.
    extra_fields : numpyro extra fields to collect (``diverging`` among them).
    checkpoint : where to save progress (:class:`Checkpointing`); None samples in one piece.
    deterministic : whether the draws include the model's deterministic sites (False: the caller
        computes them after sampling).
    """
    cp = checkpoint
    began = time.perf_counter()
    chunk_size = sampler.num_samples if cp is None else max(1, min(cp.chunk_size, sampler.num_samples))

    def save(state, start, samples, extra, done):
        if cp is not None and jax.process_index() == 0:  # one writer when the job spans processes
            _atomic_pickle({"format": 1, "fingerprint": cp.fingerprint, "meta": cp.meta, "state": _to_host(state),
                            "start": _to_host(start), "samples": samples, "extra": extra, "num_done": done,
                            "num_samples": sampler.num_samples}, Path(cp.path))

    if cp is not None and cp.resume:
        ck = read_checkpoint(Path(cp.path))
        if ck["fingerprint"] != cp.fingerprint:
            raise CheckpointError(f"{cp.path}: belongs to another fit (its config, data or sampler settings "
                                  "differ from this one). Fix: resume with the run's own config, or refit with --overwrite.")
        # numpyro builds the kernel's sample function in kernel.init; run it once at the stored starts
        vectorized = sampler.chain_method == "vectorized" and sampler.num_chains > 1
        starts = init_params if vectorized or sampler.num_chains == 1 else jax.tree.map(lambda x: x[0], init_params)
        keys = jax.random.split(key, sampler.num_chains) if vectorized else key
        kernel.init(keys, sampler.num_warmup, starts, model_args, {})
        state, start = _from_host(ck["state"]), ck["start"]
        samples, extra = list(ck["samples"]), list(ck["extra"])
        run_chunk = _chunk_program(kernel, sampler, model_args, extra_fields, chunk_size, deterministic)
    else:
        state, samples, extra = _initial_state(kernel, sampler, key, model_args, init_params), [], []
        # after kernel.init: it builds the kernel's sample and postprocess functions
        run_chunk = _chunk_program(kernel, sampler, model_args, extra_fields, chunk_size, deterministic)
        devices = chain_devices(sampler)
        where = f" on {len(devices)} device(s)" if devices else ""
        # with a progress display, warmup in quarters (the same program; the chain does not change)
        piece = min(chunk_size, -(-sampler.num_warmup // 4) if progress_bar else chunk_size)
        warmed = 0
        while warmed < sampler.num_warmup:
            n = min(piece, sampler.num_warmup - warmed)
            state, _ = run_chunk(state, n, keep=False)
            warmed += n
            if progress_bar:
                jax.block_until_ready(state)  # dispatch is asynchronous: report the iterations done
                print(f"warmup: {warmed}/{sampler.num_warmup} iterations per chain "
                      f"({sampler.num_chains} chain(s){where}; {time.perf_counter() - began:.0f} s)", flush=True)
        start = _position(state)
        if sampler.num_chains == 1:
            start = jax.tree.map(lambda x: x[None], start)
        start = _to_host(start)
        save(state, start, samples, extra, 0)
    done = sum(s[next(iter(s))].shape[1] for s in samples) if samples else 0
    while done < sampler.num_samples:
        n = min(chunk_size, sampler.num_samples - done)
        state, (draws, fields) = run_chunk(state, n)
        samples.append({k: np.asarray(v) for k, v in draws.items()})
        extra.append(jax.tree.map(np.asarray, fields))
        done += n
        save(state, start, samples, extra, done)
        if cp is not None and progress_bar:
            print(f"sampled {done}/{sampler.num_samples} draws per chain (checkpoint saved; "
                  f"{time.perf_counter() - began:.0f} s)", flush=True)
    fields = {k: (np.concatenate([e[k] for e in extra], axis=1) if k != "_z" else
                  {s: np.concatenate([e["_z"][s] for e in extra], axis=1) for s in extra[0]["_z"]})
              for k in extra[0]}
    failures = replay_failures(kernel, sampler, model_args, state, start, fields)
    fields = {k: v for k, v in fields.items() if not k.startswith("_")}
    fields["solver_failures_in_trajectory"] = failures
    return _concat(samples), fields

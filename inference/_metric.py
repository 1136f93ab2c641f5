r"""The Laplace metric of a hierarchical model with many cells, without a dense matrix.

In a model whose cells interact only through population parameters (the imaging model: each
cell's kinetic and observation constants enter its own trace and its own prior, given the
population medians and spreads), the Hessian of the potential in numpyro's unconstrained space is
*block-arrow*: with the coordinates of cell $i$ collected in $x_i$ ($k$ of them) and the population
coordinates in $x_p$ ($p$ of them),

.. math::

    H = \begin{pmatrix} A & B \\ B^\top & C \end{pmatrix},\qquad
    A = \operatorname{diag}(A_1, \dots, A_n),\ A_i \in \mathbb{R}^{k\times k},\
    B = \begin{pmatrix} B_1 \\ \vdots \\ B_n \end{pmatrix},\ B_i \in \mathbb{R}^{k\times p},\
    C \in \mathbb{R}^{p\times p}.

Two consequences make the Laplace metric usable at 10,000 cells, where the dense matrix of dimension
$d = nk + p$ (70,011) would need 39 GB and its finite-difference Hessian $2d$ gradients:

1. **Colored finite differences** (Curtis, Powell and Reid 1974): perturbing coordinate $j$ of
   *every* cell at once gives column $j$ of every $A_i$ in one central difference of the gradient,
   since no other cell's gradient moves. With one more difference per population coordinate (which
   gives $B$ and $C$), the whole Hessian costs $2(k + p)$ gradients, 36 for the imaging model,
   whatever $n$ (:func:`block_hessian`).
2. **A structured whitening** $W$ with $W W^\top = H^{-1}$, applied in $O(n k (k + p) + p^2)$
   (:class:`BlockFactor`). With the Schur complement $S = C - \sum_i B_i^\top A_i^{-1} B_i$,
   $H = L L^\top$ with

   .. math::

       L = \begin{pmatrix} A^{1/2} & 0 \\ B^\top A^{-1/2} & S^{1/2} \end{pmatrix},\qquad
       W = L^{-\top}:\quad
       (W u)_p = S^{-1/2} u_p,\ (W u)_i = A_i^{-1/2} u_i - A_i^{-1} B_i\, (W u)_p,

   and $W^\top g$: $(W^\top g)_i = A_i^{-1/2} g_i$, $(W^\top g)_p = S^{-1/2}(g_p - \sum_i
   B_i^\top A_i^{-1} g_i)$. $W W^\top$ is the *full* inverse Hessian (dense), represented
   exactly. NUTS in the coordinates $u$ of $x = \hat x + W u$ with a unit metric is NUTS in $x$
   with the dense Laplace metric $H^{-1}$ (the leapfrog and the U-turn criterion are
   affine-invariant); only the momentum draws' random numbers differ.

Where $H$ is not positive definite (a start away from the optimum), each $A_i$ and $S$ have their
eigenvalues replaced by their absolute values, floored at ``floor`` times the largest absolute
eigenvalue of the diagonal blocks: the same repair as the dense metric's, per block.

References
----------
Curtis, A. R., Powell, M. J. D. and Reid, J. K. (1974). On the estimation of sparse Jacobian
matrices. *IMA Journal of Applied Mathematics* 13, 117-119.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float, Int


# "auto" metric: the block-arrow metric from this many cells (the dense one below). At 64 cells
# the dense Hessian takes 2 * 459 gradients against 2 * 18; both metrics are the same matrix.
BLOCK_METRIC_MIN_CELLS = 64
METRICS = ("auto", "dense", "block")
# a Hessian-vector product along a random direction must agree with the block-arrow assembly to
# this relative tolerance (finite-difference noise is ~1e-6 here; a coupling between cells is O(1))
PROBE_RTOL = 1e-2
WHITENED_SITE = "laplace_u"  # the one latent site of a :class:`Whitened` model


class BlockLayout(eqx.Module):
    """Where the cells' and the population's coordinates sit in the flat unconstrained vector.

    Attributes
    ----------
    cell_index : ``(n, k)`` flat indices of cell ``i``'s coordinates (the same site and element
        order in every row).
    pop_index : ``(p,)`` flat indices of the coordinates outside the plate.
    """

    cell_index: Int[np.ndarray, "n k"]
    pop_index: Int[np.ndarray, " p"]

    @property
    def num_cells(self) -> int:
        return self.cell_index.shape[0]


def block_layout(model_trace: dict, z: dict, plate: str) -> BlockLayout | None:
    """The block layout of the latent sites ``z`` (unconstrained values) over the plate ``plate``.

    ``model_trace`` is a numpyro trace of the model (``initialize_model``'s). A latent site inside
    the plate contributes one slice per plate index (the plate's axis of its unconstrained value);
    the others are population coordinates. Returns None when no latent site is inside the plate,
    or the plate has fewer than 2 members.
    """
    tags = {}
    size = None
    for name, value in z.items():
        site = model_trace[name]
        frames = [f for f in site["cond_indep_stack"] if f.name == plate]
        shape = np.shape(value)
        if not frames:
            tags[name] = np.full(shape, -1.0)
            continue
        frame = frames[0]
        axis = len(site["fn"].batch_shape) + frame.dim
        if not (0 <= axis < len(shape)) or shape[axis] != frame.size:
            raise ValueError(f"site {name!r}: its unconstrained value {shape} has no axis of plate {plate!r} "
                             f"(size {frame.size}, dim {frame.dim}).")
        size = frame.size
        index = np.arange(frame.size, dtype=float).reshape((-1,) + (1,) * (len(shape) - axis - 1))
        tags[name] = np.broadcast_to(index, shape)
    if size is None or size < 2:
        return None
    owner = np.asarray(ravel_pytree(tags)[0]).astype(int)  # ravel_pytree's (sorted) order, as the flat vectors
    pop_index = np.flatnonzero(owner < 0)
    order = np.argsort(owner[owner >= 0], kind="stable")
    cell_flat = np.flatnonzero(owner >= 0)[order]
    return BlockLayout(cell_index=cell_flat.reshape(size, -1), pop_index=pop_index)


def probe_directions(layout: BlockLayout, dim: int) -> np.ndarray:
    """The ``k + p`` colored unit directions: coordinate ``j`` of every cell, then each population coordinate."""
    n, k = layout.cell_index.shape
    p = layout.pop_index.shape[0]
    dirs = np.zeros((k + p, dim))
    for j in range(k):
        dirs[j, layout.cell_index[:, j]] = 1.0
    dirs[k + np.arange(p), layout.pop_index] = 1.0
    return dirs


def assemble(layout: BlockLayout, columns: np.ndarray):
    """``(A, B, C)`` from the central differences ``columns`` ``(k + p, dim)`` along :func:`probe_directions`.

    Row ``r`` of cell ``i`` in difference ``j < k`` is ``A_i[r, j]`` (no other cell's coordinate
    moved); difference ``k + q`` is the Hessian's column of population coordinate ``q``, giving
    ``B`` and ``C``. Non-finite entries become 0 (a repaired metric, not a result); ``A_i`` and
    ``C`` are symmetrised.
    """
    k = layout.cell_index.shape[1]
    columns = np.where(np.isfinite(columns), columns, 0.0)
    a = np.transpose(columns[:k][:, layout.cell_index], (1, 2, 0))  # (n, k row, k column)
    b = np.transpose(columns[k:][:, layout.cell_index], (1, 2, 0))  # (n, k, p)
    c = columns[k:][:, layout.pop_index]
    return 0.5 * (a + np.swapaxes(a, 1, 2)), b, 0.5 * (c + c.T)


def arrow_matvec(layout: BlockLayout, a, b, c, v: np.ndarray) -> np.ndarray:
    """``H v`` for the block-arrow ``H`` given by ``(A, B, C)``."""
    vc, vp = v[layout.cell_index], v[layout.pop_index]
    out = np.zeros_like(v)
    out[layout.cell_index] = np.einsum("nrj,nj->nr", a, vc) + b @ vp
    out[layout.pop_index] = c @ vp + np.einsum("nrq,nr->q", b, vc)
    return out


def block_hessian(grad_fn, x: np.ndarray, layout: BlockLayout, step: float, *, key=0, check: bool = True):
    """The block-arrow Hessian at ``x`` from ``2 (k + p) + 2`` gradients, checked against its structure.

    ``grad_fn(x) -> gradient`` (NumPy in, NumPy out). The last two gradients difference along a
    random direction ``v``; ``H v`` from the assembled blocks must match it to :data:`PROBE_RTOL`
    relative, otherwise the model couples cells outside the population coordinates (or its gradient
    is too rough for finite differences) and a ``ValueError`` says so. ``check=False`` skips those
    two gradients (a preconditioner on the way to the MAP, where only speed depends on it; far from
    the MAP, cells that share adaptive solver steps in the CPU's blocks are coupled through the
    step-size control: measured 0.2 relative on simulated data at the prior medians). Returns ``(A, B, C)``.
    """
    dim = x.shape[0]
    dirs = probe_directions(layout, dim)
    columns = np.stack([(grad_fn(x + step * d) - grad_fn(x - step * d)) / (2 * step) for d in dirs])
    a, b, c = assemble(layout, columns)
    if not check:
        return a, b, c
    v = np.random.default_rng(key).choice([-1.0, 1.0], size=dim)
    hv = (grad_fn(x + step * v) - grad_fn(x - step * v)) / (2 * step)
    if np.all(np.isfinite(hv)):
        gap = np.linalg.norm(arrow_matvec(layout, a, b, c, v) - hv) / max(np.linalg.norm(hv), 1e-300)
        if gap > PROBE_RTOL:
            raise ValueError(f"the Hessian is not block-arrow over the cells (a random Hessian-vector product differs "
                             f"from the blocks' by {gap:.2g} relative): the model couples cells other than through "
                             "population parameters. Fix: set [sampler] metric = \"dense\".")
    return a, b, c


def _floored(w, floor_abs):
    return jnp.maximum(jnp.abs(w), floor_abs)


class DenseFactor(eqx.Module):
    """``W = H^{-1/2}`` (symmetric) of a dense Hessian: ``W W^T = H^{-1}``."""

    sqrt_inv: Float[Array, "dim dim"]

    def apply(self, u):
        return self.sqrt_inv @ u

    def apply_t(self, g):
        return self.sqrt_inv.T @ g

    def inverse(self):
        return self.sqrt_inv @ self.sqrt_inv.T


class BlockFactor(eqx.Module):
    r"""The whitening ``W`` of a block-arrow Hessian (module docstring): ``W W^T = H^{-1}``.

    Attributes
    ----------
    cell_index, pop_index : the :class:`BlockLayout`.
    r : ``(n, k, k)`` $A_i^{-1/2}$.
    q : ``(n, k, p)`` $A_i^{-1} B_i$.
    t : ``(p, p)`` $S^{-1/2}$.
    """

    cell_index: Int[Array, "n k"]
    pop_index: Int[Array, " p"]
    r: Float[Array, "n k k"]
    q: Float[Array, "n k p"]
    t: Float[Array, "p p"]

    @property
    def dim(self) -> int:
        return self.cell_index.size + self.pop_index.size

    def apply(self, u):
        """``W u``."""
        vp = self.t @ u[self.pop_index]
        vc = jnp.einsum("nrj,nj->nr", self.r, u[self.cell_index]) - self.q @ vp
        return jnp.zeros_like(u).at[self.cell_index].set(vc).at[self.pop_index].set(vp)

    def apply_t(self, g):
        """``W^T g``."""
        gc = g[self.cell_index]
        oc = jnp.einsum("nrj,nj->nr", self.r, gc)
        op = self.t @ (g[self.pop_index] - jnp.einsum("nrq,nr->q", self.q, gc))
        return jnp.zeros_like(g).at[self.cell_index].set(oc).at[self.pop_index].set(op)

    def inverse(self):
        """The dense ``W W^T`` (``dim x dim``; for checks on small problems)."""
        w = jax.vmap(self.apply, in_axes=1, out_axes=1)(jnp.eye(self.dim, dtype=self.r.dtype))
        return w @ w.T

    def marginal_variance(self):
        """``diag(W W^T)`` without forming it: per cell ``A_i^{-1} + Q_i S^{-1} Q_i^T``, population ``S^{-1}``."""
        s_inv = self.t @ self.t.T
        cell = jnp.einsum("nrj,nrj->nr", self.r, self.r) + jnp.einsum("nrq,qs,nrs->nr", self.q, s_inv, self.q)
        return jnp.zeros(self.dim, self.r.dtype).at[self.cell_index].set(cell).at[self.pop_index].set(jnp.diag(s_inv))


def block_factor(layout: BlockLayout, a, b, c, floor: float, dtype=jnp.float64) -> BlockFactor:
    """:class:`BlockFactor` of the block-arrow ``H = (A, B, C)``, its blocks' eigenvalues made positive
    and floored at ``floor`` times the largest absolute eigenvalue of ``A``'s blocks and ``C``.
    """
    a, b, c = (jnp.asarray(m, dtype) for m in (a, b, c))
    wa, va = jnp.linalg.eigh(a)
    wc = jnp.linalg.eigvalsh(c)
    floor_abs = floor * jnp.maximum(jnp.max(jnp.abs(wa)), jnp.max(jnp.abs(wc)))
    wa = _floored(wa, floor_abs)
    r = jnp.einsum("nij,nj,nkj->nik", va, 1 / jnp.sqrt(wa), va)
    q = jnp.einsum("nij,nj,nkj,nkq->niq", va, 1 / wa, va, b)
    s = c - jnp.einsum("nkp,nkq->pq", b, q)
    ws, vs = jnp.linalg.eigh(0.5 * (s + s.T))
    t = (vs / jnp.sqrt(_floored(ws, floor_abs))) @ vs.T
    return BlockFactor(cell_index=jnp.asarray(layout.cell_index), pop_index=jnp.asarray(layout.pop_index),
                       r=r, q=q, t=t)



class Whitened:
    r"""``model`` in the whitened coordinates ``u`` of ``x = flat_map + W u`` (``W``: ``factor``).

    :attr:`model` is a numpyro model with one latent site :data:`WHITENED_SITE` (``u``, flat,
    improper flat prior) whose log density is ``model``'s at the unconstrained point ``x``: the
    sites of ``model`` are conditioned on their constrained values and the log Jacobians of the
    constraining transforms are added, as numpyro's potential does. ``W`` is linear, so its
    Jacobian is a constant and is left out. ``model``'s deterministic sites stay in the trace
    (``solver_failures`` among them). NUTS on this model with a unit metric is NUTS on ``model``
    with the metric ``W W^T`` (module docstring). It takes ``model``'s arguments.

    Parameters
    ----------
    model, model_args : the numpyro model and its arguments (traced once, for the latent sites'
        supports and shapes; the flat order is ``ravel_pytree``'s of those sites).
    flat_map : the centre ``x`` at ``u = 0`` (the MAP).
    factor : :class:`DenseFactor` or :class:`BlockFactor`.
    """

    def __init__(self, model, model_args, flat_map, factor):
        from numpyro.distributions import biject_to
        from numpyro.handlers import seed, trace

        self.inner, self.flat_map, self.factor = model, flat_map, factor
        tr = trace(seed(model, rng_seed=0)).get_trace(*model_args)
        latent = {name: site for name, site in tr.items() if site["type"] == "sample" and not site["is_observed"]}
        self.transforms = {name: biject_to(site["fn"].support) for name, site in latent.items()}
        prototype = {name: jnp.zeros(jnp.shape(self.transforms[name].inv(site["value"])), flat_map.dtype)
                     for name, site in latent.items()}
        flat, self.unravel = ravel_pytree(prototype)
        if flat.shape != flat_map.shape:
            raise ValueError(f"the model's latent sites hold {flat.shape[0]} unconstrained values, the MAP "
                             f"{flat_map.shape[0]}.")

    def _sites(self, u):
        """The unconstrained and the constrained latent sites of ``model`` at ``u`` (flat ``(dim,)``)."""
        z = self.unravel(self.flat_map + self.factor.apply(u))
        return z, {name: t(z[name]) for name, t in self.transforms.items()}

    def point(self, u) -> dict:
        """The constrained latent sites of ``model`` at ``u`` (one point, flat ``(dim,)``)."""
        return self._sites(u)[1]

    def model(self, *args, **kwargs):
        import numpyro
        import numpyro.distributions as dist
        from numpyro.distributions import constraints
        from numpyro.handlers import condition

        dim = self.flat_map.shape[0]
        u = numpyro.sample(WHITENED_SITE, dist.ImproperUniform(constraints.real_vector, (), (dim,)))
        z, values = self._sites(u)
        numpyro.factor("laplace_log_det", sum(jnp.sum(t.log_abs_det_jacobian(z[name], values[name]))
                                              for name, t in self.transforms.items()))
        return condition(self.inner, values)(*args, **kwargs)

    def draws(self, u) -> dict:
        """The constrained latent sites at whitened draws ``u`` ``(chain, draw, dim)``, as NumPy ``(chain, draw, ...)``."""
        lead = u.shape[:2]
        out = jax.jit(jax.vmap(self.point))(jnp.asarray(u).reshape((-1, u.shape[-1])))
        return {k: np.asarray(v).reshape(lead + v.shape[1:]) for k, v in out.items()}

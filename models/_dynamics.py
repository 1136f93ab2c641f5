"""Zinc flux model (model A): vector fields for one cell.

This module knows nothing about fluorescence; see ``_observation.py`` for the measurement map.
"""

import abc

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import ArrayLike

from ._params import ZincFluxParams
from ._protocol import ProtocolInputs
from ._types import RealScalarLike


class FluxState(eqx.Module):
    """State of the rapid-equilibrium model: ``log_zc`` = ln(free cytosolic zinc / nM), store zinc (nM)."""

    log_zc: ArrayLike
    zs_nM: ArrayLike


class FullState(eqx.Module):
    """State of the full model: free, MT-bound, store and probe-bound zinc (all nM)."""

    zc_nM: ArrayLike
    zmt_nM: ArrayLike
    zs_nM: ArrayLike
    zp_nM: ArrayLike


def _mm(vmax, km, x):
    return vmax * x / (km + x)


def derived_rates(params: ZincFluxParams, protocol: ProtocolInputs):
    r"""Rates fixed by the resting steady state.

    Returns ``(znt_vmax_nM_per_min, store_leak_per_min)``:

    $V_{znt} = J_{zip}(z_0) (K_{znt} + Z_c^*) / Z_c^*$ and $k_{leak} = J_{seq}(Z_c^*) / Z_s^*$,

    so that at $t_0$, with $Z_o = z_0$ (the baseline medium) and no stimulus, ionophore or TPEN,
    $(Z_c^*, Z_s^*)$ is a steady state.
    """
    p = params
    j_zip0 = _mm(p.zip_vmax_nM_per_min, p.zip_km_uM, protocol.zn_ext_uM[0])
    znt_vmax = j_zip0 * (p.znt_km_nM + p.zc_rest_nM) / p.zc_rest_nM
    leak = _mm(p.seq_vmax_nM_per_min, p.seq_km_nM, p.zc_rest_nM) / p.store_rest_nM
    return znt_vmax, leak


def net_flux(t, zc, zs, params: ZincFluxParams, protocol: ProtocolInputs):
    r"""Transport fluxes (nM/min) into free cytosolic zinc and into stores.

    Returns ``(j_cyt, j_store)`` with
    $j_{cyt} = J_{zip} - J_{znt} - J_{seq} + J_{rel} + J_{ion} - J_{tpen}$ and
    $j_{store} = J_{seq} - J_{rel}$.
    """
    p = params
    zo, stim, iono, tpen = protocol.inputs(t, p.stim_decay_min)
    znt_vmax, leak = derived_rates(p, protocol)
    j_zip = _mm(p.zip_vmax_nM_per_min, p.zip_km_uM, zo)
    j_znt = _mm(znt_vmax, p.znt_km_nM, zc)
    j_seq = _mm(p.seq_vmax_nM_per_min, p.seq_km_nM, zc)
    j_rel = (leak + p.release_stim_per_min * stim) * zs
    j_ion = p.iono_perm_per_min * iono * (1000.0 * zo - zc)
    j_tpen = p.tpen_rate_per_min * tpen * zc
    return j_zip - j_znt - j_seq + j_rel + j_ion - j_tpen, j_seq - j_rel


class AbstractZincModel(eqx.Module):
    """A zinc flux model of one cell under a fixed protocol.

    The Module holds structure (the protocol); sampled numbers arrive as ``args`` so that
    ``vector_field`` is a pure ``(t, y, params)`` function that ``diffrax.ODETerm`` wraps.
    """

    protocol: eqx.AbstractVar[ProtocolInputs]

    @abc.abstractmethod
    def vector_field(self, t: RealScalarLike, y, args: ZincFluxParams):
        """Time derivative of the state."""

    @abc.abstractmethod
    def initial_state(self, params: ZincFluxParams):
        """Resting steady state at the start of the recording."""

    @abc.abstractmethod
    def free_zinc_nM(self, y, params: ZincFluxParams):
        """Free cytosolic zinc (nM) from the state."""

    @abc.abstractmethod
    def probe_bound_fraction(self, y, params: ZincFluxParams):
        """Fraction of the probe that carries zinc, in [0, 1]."""


class ZincFluxRapidEquilibrium(AbstractZincModel):
    r"""Zinc flux model with MT and probe binding in rapid equilibrium (the fitting model).

    States: $u = \ln(Z_c / \mathrm{nM})$ (free cytosolic zinc) and $Z_s$ (store zinc, nM per litre
    of cytosol). Time in minutes. MT-bound and probe-bound zinc are algebraic:

    $$Z_{MT} = S_{MT} Z_c / (K_{MT} + Z_c), \qquad Z_P = P Z_c / (K_P + Z_c).$$

    Total exchangeable cytosolic zinc $Z_c + Z_{MT} + Z_P$ changes by the transport fluxes, so

    $$\frac{du}{dt} = \frac{J_{zip} - J_{znt} - J_{seq} + J_{rel} + J_{ion} - J_{tpen}}
        {Z_c\,\beta(Z_c)}, \qquad
      \beta(Z_c) = 1 + \frac{S_{MT} K_{MT}}{(K_{MT} + Z_c)^2} + \frac{P K_P}{(K_P + Z_c)^2},$$

    $$\frac{dZ_s}{dt} = J_{seq} - J_{rel},$$

    with fluxes (nM/min)

    - $J_{zip} = V_{zip} Z_o(t) / (K_{zip} + Z_o(t))$, $Z_o$ in uM;
    - $J_{znt} = V_{znt} Z_c / (K_{znt} + Z_c)$;
    - $J_{seq} = V_{seq} Z_c / (K_{seq} + Z_c)$;
    - $J_{rel} = (k_{leak} + k_{stim} s(t)) Z_s$;
    - $J_{ion} = p_{ion} I(t) (1000 Z_o(t) - Z_c)$ (1000 converts uM to nM);
    - $J_{tpen} = k_{tpen} T(t) Z_c$;

    and $V_{znt}$, $k_{leak}$ fixed by the resting steady state (:func:`derived_rates`). The
    inputs $Z_o, s, I, T$ are defined by :class:`ProtocolInputs`. Initial state:
    $u(t_0) = \ln Z_c^*$, $Z_s(t_0) = Z_s^*$.

    Why this formulation: binding to MT and probe relaxes in well under a second while transport
    acts over minutes, so the full equations (:class:`ZincFluxFull`) are stiff. Eliminating the
    fast binding (the rapid-buffer approximation, as for calcium: Wagner & Keizer 1994,
    Biophys. J. 67:447) leaves a non-stiff 2-state system that an explicit solver (Tsit5)
    integrates in few steps; working in $\ln Z_c$ keeps relative accuracy across the 1e-4 to
    1e5 nM range crossed between the TPEN and ionophore calibrations. The test suite checks it
    against a tight Radau solution of the full equations.
    """

    protocol: ProtocolInputs

    def vector_field(self, t, y: FluxState, args: ZincFluxParams) -> FluxState:
        p = args
        # The clip only bites on wild trial steps of the adaptive solver (Zc > 7e10 nM or
        # < 4e-18 nM); it keeps them finite so that the step is rejected and shrunk, not NaN.
        zc = jnp.exp(jnp.clip(y.log_zc, -40.0, 25.0))
        j_cyt, j_store = net_flux(t, zc, y.zs_nM, p, self.protocol)
        beta = (
            1.0
            + p.mt_sites_nM * p.mt_kd_nM / (p.mt_kd_nM + zc) ** 2
            + p.probe_total_nM * p.probe_kd_nM / (p.probe_kd_nM + zc) ** 2
        )
        return FluxState(log_zc=j_cyt / (zc * beta), zs_nM=j_store)

    def initial_state(self, params: ZincFluxParams) -> FluxState:
        return FluxState(log_zc=jnp.log(params.zc_rest_nM), zs_nM=jnp.asarray(params.store_rest_nM))

    def free_zinc_nM(self, y: FluxState, params: ZincFluxParams):
        return jnp.exp(y.log_zc)

    def probe_bound_fraction(self, y: FluxState, params: ZincFluxParams):
        zc = jnp.exp(y.log_zc)
        return zc / (params.probe_kd_nM + zc)


class ZincFluxFull(AbstractZincModel):
    r"""Zinc flux model with explicit (mass-action) MT and probe binding: the reference equations.

    States (nM): free cytosolic zinc $Z_c$, MT-bound zinc $Z_{MT}$, store zinc $Z_s$, probe-bound
    zinc $Z_P$. Time in minutes. With the fluxes of :class:`ZincFluxRapidEquilibrium`,

    $$R_{MT} = k_{on} (Z_c (S_{MT} - Z_{MT}) - K_{MT} Z_{MT}), \qquad
      R_P = k_{on} (Z_c (P - Z_P) - K_P Z_P),$$

    $$\frac{dZ_c}{dt} = J_{zip} - J_{znt} - J_{seq} + J_{rel} + J_{ion} - J_{tpen} - R_{MT} - R_P,$$
    $$\frac{dZ_{MT}}{dt} = R_{MT}, \quad \frac{dZ_P}{dt} = R_P, \quad \frac{dZ_s}{dt} = J_{seq} - J_{rel}.$$

    Initial state: the resting steady state, $Z_c = Z_c^*$, both buffers at equilibrium with it,
    $Z_s = Z_s^*$. This system is stiff for physiological $k_{on}$ (about 6 /nM/min, i.e.
    1e8 /M/s) and needs an implicit solver; it exists to check the rapid-equilibrium model.

    Attributes
    ----------
    protocol : ProtocolInputs
    kon_per_nM_per_min : float
        Association rate constant shared by MT and probe (1/(nM min)).
    """

    protocol: ProtocolInputs
    kon_per_nM_per_min: float = eqx.field(static=True, default=6.0)

    def vector_field(self, t, y: FullState, args: ZincFluxParams) -> FullState:
        p = args
        kon = self.kon_per_nM_per_min
        j_cyt, j_store = net_flux(t, y.zc_nM, y.zs_nM, p, self.protocol)
        r_mt = kon * (y.zc_nM * (p.mt_sites_nM - y.zmt_nM) - p.mt_kd_nM * y.zmt_nM)
        r_p = kon * (y.zc_nM * (p.probe_total_nM - y.zp_nM) - p.probe_kd_nM * y.zp_nM)
        return FullState(zc_nM=j_cyt - r_mt - r_p, zmt_nM=r_mt, zs_nM=j_store, zp_nM=r_p)

    def initial_state(self, params: ZincFluxParams) -> FullState:
        p = params
        zc = jnp.asarray(p.zc_rest_nM)
        return FullState(
            zc_nM=zc,
            zmt_nM=p.mt_sites_nM * zc / (p.mt_kd_nM + zc),
            zs_nM=jnp.asarray(p.store_rest_nM),
            zp_nM=p.probe_total_nM * zc / (p.probe_kd_nM + zc),
        )

    def free_zinc_nM(self, y: FullState, params: ZincFluxParams):
        return y.zc_nM

    def probe_bound_fraction(self, y: FullState, params: ZincFluxParams):
        return y.zp_nM / params.probe_total_nM

"""Independent NumPy implementation of the full zinc flux equations, for SciPy reference solves.

Written from docs/models.md without importing the package's vector fields.
"""

import numpy as np
from scipy.integrate import solve_ivp


def inputs(t, starts, kinds, zn, tau):
    k = max(i for i, s in enumerate(starts) if s <= t)
    tpen = 1.0 if "fmin" in kinds[: k + 1] else 0.0
    iono = 1.0 if "fmax" in kinds[: k + 1] else 0.0
    zo = zn[k] * (1.0 - tpen)
    ts = next((s for s, kind in zip(starts, kinds) if kind == "stimulus"), None)
    stim = np.exp(-(t - ts) / tau) if ts is not None and t >= ts else 0.0
    return zo, stim, iono, tpen


def full_rhs(t, y, p, starts, kinds, zn, kon):
    zc, zmt, zs, zp = y
    zo, stim, iono, tpen = inputs(t, starts, kinds, zn, p["stim_decay_min"])
    zr = p["zc_rest_nM"]
    j_zip0 = p["zip_vmax_nM_per_min"] * zn[0] / (p["zip_km_uM"] + zn[0])
    v_znt = j_zip0 * (p["znt_km_nM"] + zr) / zr
    leak = p["seq_vmax_nM_per_min"] * zr / (p["seq_km_nM"] + zr) / p["store_rest_nM"]
    j_zip = p["zip_vmax_nM_per_min"] * zo / (p["zip_km_uM"] + zo)
    j_znt = v_znt * zc / (p["znt_km_nM"] + zc)
    j_seq = p["seq_vmax_nM_per_min"] * zc / (p["seq_km_nM"] + zc)
    j_rel = (leak + p["release_stim_per_min"] * stim) * zs
    j_ion = p["iono_perm_per_min"] * iono * (1000.0 * zo - zc)
    j_tpen = p["tpen_rate_per_min"] * tpen * zc
    r_mt = kon * (zc * (p["mt_sites_nM"] - zmt) - p["mt_kd_nM"] * zmt)
    r_p = kon * (zc * (p["probe_total_nM"] - zp) - p["probe_kd_nM"] * zp)
    return [j_zip - j_znt - j_seq + j_rel + j_ion - j_tpen - r_mt - r_p, r_mt, j_seq - j_rel, r_p]


def solve_full_reference(p: dict, starts, kinds, zn, ts, *, kon=6.0, rtol=1e-10, atol=1e-14):
    """Radau, segment by segment (restarting at each protocol switch); returns (zc, probe fraction)."""
    zr = p["zc_rest_nM"]
    y = [zr, p["mt_sites_nM"] * zr / (p["mt_kd_nM"] + zr), p["store_rest_nM"],
         p["probe_total_nM"] * zr / (p["probe_kd_nM"] + zr)]
    edges = list(starts) + [ts[-1]]
    out = np.empty((len(ts), 4))
    for a, b in zip(edges[:-1], edges[1:]):
        if b <= a:
            continue
        sol = solve_ivp(full_rhs, (a, b), y, method="Radau", rtol=rtol, atol=atol, dense_output=True,
                        args=(p, starts, kinds, zn, kon))
        t_last = sol.t[-1]
        # SciPy's Radau can stop a hair before t_bound ("required step size is less than spacing
        # between numbers") when its last step leaves a remainder of ~1e-13; accept that, nothing else.
        assert sol.success or (b - t_last) <= 1e-9 * (b - a), sol.message
        sel = (ts >= a) & ((ts < b) | (b == ts[-1]))
        out[sel] = sol.sol(np.minimum(ts[sel], t_last)).T
        y = sol.y[:, -1]
    return out[:, 0], out[:, 3] / p["probe_total_nM"]

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


# --- Model B (MTF-1 transcription), in natural units (Zc in nM, mRNA relative to control) ---------


def mtf1_synthesis(zc, p, regulation):
    a = zc ** p["n"] / (p["K"] ** p["n"] + zc ** p["n"])
    out = []
    for i, kind in enumerate(regulation):
        if kind == "induced":
            out.append(1.0 + p["A"][i] * a)
        elif kind == "repressed":
            out.append(1.0 / (1.0 + p["A"][i] * a))
        else:
            out.append((1.0 + p["A"][i] * a) / (1.0 + (zc / p["K2"][i]) ** p["n2"][i]))
    return np.array(out)


def mtf1_rhs(t, y, p, regulation, genes, u, feedback):
    zc, m = y[0], y[1:]
    q = mtf1_synthesis(zc, p, regulation) / mtf1_synthesis(p["zr"], p, regulation)
    phi = u / (p["Kabs"] + u)
    if feedback:
        supply = p["zr"] * (1.0 + p["G"] * phi * m[genes.index("ZIP4")])
        efflux = m[genes.index("ZnT1")] * zc
    else:
        supply, efflux = p["zr"] * (1.0 + p["G"] * phi), zc
    return np.concatenate([[p["kzn"] * (supply - efflux)], p["delta"] * (q - m)])


def mtf1_time_course_reference(p, regulation, genes, u, ts, feedback):
    """SciPy Radau from the control steady state (Zc = zr, m = 1), rtol 1e-11."""
    y0 = np.concatenate([[p["zr"]], np.ones(len(genes))])
    sol = solve_ivp(mtf1_rhs, (0.0, ts[-1]), y0, method="Radau", t_eval=ts, rtol=1e-11, atol=1e-13,
                    args=(p, regulation, genes, u, feedback))
    assert sol.success, sol.message
    return sol.y.T


def mtf1_steady_reference(p, regulation, genes, u, feedback):
    """Steady state by bracketing the scalar balance z q_ZnT1(z)^b = 1 + G phi q_ZIP4(z)^b in z = Zc/zr."""
    from scipy.optimize import brentq

    phi = u / (p["Kabs"] + u)
    q = lambda z: mtf1_synthesis(z * p["zr"], p, regulation) / mtf1_synthesis(p["zr"], p, regulation)  # noqa: E731
    if feedback:
        i1, i4 = genes.index("ZnT1"), genes.index("ZIP4")
        g = lambda z: z * q(z)[i1] - 1.0 - p["G"] * phi * q(z)[i4]  # noqa: E731
    else:
        g = lambda z: z - 1.0 - p["G"] * phi  # noqa: E731
    z = brentq(g, 1.0 - 1e-12, 1.0 + p["G"] * phi + 1e-9, xtol=1e-15, rtol=1e-15)
    return z, q(z)

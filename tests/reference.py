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


def coupled_rhs(t, y, p, half_lives_h):
    """Model C written again from docs/models.md in NumPy (states: ln Zc, Zs, 3 ln mRNA, 3 ln protein)."""
    u, zs = y[0], y[1]
    ell, pi = np.asarray(y[2:5]), np.asarray(y[5:8])
    zc, zr = np.exp(u), p["zc_rest_nM"]
    mm = lambda v, k, x: v * x / (k + x)  # noqa: E731
    v_znt_ref = mm(p["zip_vmax_nM_per_min"], p["zip_km_uM"], p["zo_ref_uM"]) * (p["znt_km_nM"] + zr) / zr
    leak = mm(p["seq_vmax_nM_per_min"], p["seq_km_nM"], zr) / p["store_rest_nM"]
    zo = p["zo_before_uM"] if t < p["t_switch_min"] else p["zo_after_uM"]
    prot = np.exp(pi)  # MT1, ZnT1, ZIP4

    def act(z):
        return z ** p["mtf1_hill"] / (p["mtf1_k_nM"] ** p["mtf1_hill"] + z ** p["mtf1_hill"])

    amp = np.array([p["amplitude_MT1"], p["amplitude_ZnT1"], p["amplitude_ZIP4"]])
    s = lambda z: np.array([1 + amp[0] * act(z), 1 + amp[1] * act(z), 1 / (1 + amp[2] * act(z))])  # noqa: E731
    delta = np.log(2) / (np.array(half_lives_h) * 60.0)
    kappa = np.log(2) / (np.array([p["protein_half_life_h_MT1"], p["protein_half_life_h_ZnT1"], p["protein_half_life_h_ZIP4"]]) * 60.0)
    dell = delta * (s(zc) / s(zr) * np.exp(-ell) - 1.0)
    dpi = kappa * (np.exp(ell - pi) - 1.0)
    s_mt = p["mt_sites_nM"] * prot[0]
    j = (mm(p["zip_vmax_nM_per_min"] * prot[2], p["zip_km_uM"], zo) - mm(v_znt_ref * prot[1], p["znt_km_nM"], zc)
         - mm(p["seq_vmax_nM_per_min"], p["seq_km_nM"], zc) + leak * zs)
    beta = 1 + s_mt * p["mt_kd_nM"] / (p["mt_kd_nM"] + zc) ** 2 + p["probe_total_nM"] * p["probe_kd_nM"] / (p["probe_kd_nM"] + zc) ** 2
    du = (j - s_mt * dpi[0] * zc / (p["mt_kd_nM"] + zc)) / (zc * beta)
    dzs = mm(p["seq_vmax_nM_per_min"], p["seq_km_nM"], zc) - leak * zs
    return np.concatenate([[du, dzs], dell, dpi])


def solve_coupled_reference(p, y0, ts, half_lives_h, *, rtol=1e-11, atol=1e-12):
    """Radau from the pre-switch state; restarts at the medium switch so no step straddles it."""
    ts = np.asarray(ts, dtype=float)
    t_sw = p["t_switch_min"]
    out = np.empty((ts.size, len(y0)))
    y, t_start = np.asarray(y0, dtype=float), ts[0]
    pieces = [(t_start, t_sw), (t_sw, ts[-1])] if ts[0] < t_sw < ts[-1] else [(t_start, ts[-1])]
    for a, b in pieces:
        sel = (ts >= a) & (ts <= b)
        phase = a  # the rhs depends on t only through the medium, constant on each piece
        sol = solve_ivp(lambda t, yy, phase=phase: coupled_rhs(phase, yy, p, half_lives_h),
                        (a, b), y, method="Radau", t_eval=ts[sel], rtol=rtol, atol=atol)
        assert sol.success, sol.message
        out[sel] = sol.y.T
        y = sol.y[:, -1]
    return out

"""Devices and processes: rows of batched solves split over devices, chains spread over devices
and over the processes of a ``jax.distributed`` job (CPU devices forced with XLA_FLAGS)."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from test_runs import BLOWUP_SRC, ROOT, _config, _env, _posterior, _zinckin

from inference._cli import main
from inference._gate import EXIT_NOT_CONVERGED


# ---------------------------------------------------------------------------------------------
# rows split over devices

DEVICES_SCRIPT = """
import json, sys, textwrap, pathlib
import jax, numpy as np
jax.config.update("jax_enable_x64", True)
from jax.flatten_util import ravel_pytree
from numpyro.infer import init_to_median
from numpyro.infer.util import initialize_model
from inference._config import load_config
from inference._custom import custom_model, load_custom
d = pathlib.Path(sys.argv[1])
problem = load_custom(*load_config(d / "fit.toml"))
info, pot, _, _ = initialize_model(jax.random.key(0), custom_model, model_args=(problem,),
                                   init_strategy=init_to_median(num_samples=15))
x0, unravel = ravel_pytree(info.z)
x0 = x0 + 0.1 * jax.random.normal(jax.random.key(1), x0.shape)
v, g = jax.jit(jax.value_and_grad(lambda x: pot(unravel(x))))(x0)
print(json.dumps({"devices": jax.device_count(), "value": float(v), "grad": np.asarray(g).tolist()}))
"""


def test_rows_split_over_four_devices_give_the_same_log_density_and_gradient(tmp_path):
    """Five cells (rows padded to 8, two per device) on 4 forced CPU devices against 1 device:
    log density and gradient equal to 1e-12 relative (summation order differs across devices,
    so not bit for bit; NUTS draws therefore agree in distribution, not draw by draw)."""
    (tmp_path / "m.py").write_text(textwrap.dedent(BLOWUP_SRC))
    rng = np.random.default_rng(0)
    rows = [f"{c},{t:.1f},{np.exp(0.1 * rng.normal()) / (1 - a * t):.6g}\n"
            for c, a in zip("ABCDE", (0.3, 0.5, 0.6, 0.4, 0.7)) for t in np.arange(0.0, 0.95, 0.1)]
    (tmp_path / "d.csv").write_text("cell,time,x\n" + "".join(rows))
    (tmp_path / "fit.toml").write_text('[model]\nfile = "m.py"\nper_unit = ["a"]\n\n[[datasets]]\nfile = "d.csv"\n'
                                       'unit_column = "cell"\n')
    (tmp_path / "s.py").write_text(DEVICES_SCRIPT)
    out = {}
    for n in (1, 4):
        env = dict(_env(), XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
        res = subprocess.run([sys.executable, str(tmp_path / "s.py"), str(tmp_path)], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        out[n] = json.loads(res.stdout.strip().splitlines()[-1])
    assert out[1]["devices"] == 1 and out[4]["devices"] == 4
    assert out[4]["value"] == pytest.approx(out[1]["value"], rel=1e-12)
    np.testing.assert_allclose(out[4]["grad"], out[1]["grad"], rtol=1e-12, atol=1e-12 * np.max(np.abs(out[1]["grad"])))


# ---------------------------------------------------------------------------------------------
# chains over devices and processes


def test_sharded_chains_give_the_same_draws_on_one_device_four_devices_and_two_processes(tmp_path):
    """``chain_method = "sharded"``, 4 chains: on 1 device, on 4 (forced CPU) devices, and as a
    2-process ``jax.distributed`` job with 2 devices per process (coordinator on localhost, CPU
    collectives), the draws are identical bit for bit; in the 2-process job process 0 alone
    writes the run directory and records the job's shape."""
    import socket

    cfg = _config(tmp_path, 'num_warmup = 60\nnum_samples = 120\nnum_chains = 4\nchain_method = "sharded"',
                  "checkpoint_every = 40")
    for n in (1, 4):
        env = dict(_env(), XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
        res = subprocess.run(_zinckin("fit", str(cfg), "--out", str(tmp_path / f"devices{n}"), "--no-progress"),
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert res.returncode in (0, EXIT_NOT_CONVERGED), res.stderr[-3000:]
    def job():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = [subprocess.Popen(_zinckin("fit", str(cfg), "--out", str(tmp_path / "processes"), "--no-progress"),
                                  cwd=ROOT, env=dict(_env(), XLA_FLAGS="--xla_force_host_platform_device_count=2",
                                                     ZINCKIN_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                                     ZINCKIN_NUM_PROCESSES="2", ZINCKIN_PROCESS_ID=str(i)),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
        return [(p.communicate(timeout=900), p.returncode) for p in procs]

    outs = job()
    for (out, err), code in outs:
        assert code in (0, EXIT_NOT_CONVERGED), err[:3000] + "\n...\n" + err[-3000:]
    assert "process 1 of 2: 2 local device(s), 4 in all" in outs[1][0][0]
    assert "process 1: done (process 0 writes the run directory)" in outs[1][0][0]
    one, four, two_procs = (_posterior(tmp_path / d) for d in ("devices1", "devices4", "processes"))
    assert one["k"].shape == (4, 120)
    for k in one:
        np.testing.assert_array_equal(one[k], four[k])
        np.testing.assert_array_equal(one[k], two_procs[k])
    devices = {d: json.loads((tmp_path / d / "run.json").read_text())["provenance"]["devices"]
               for d in ("devices1", "devices4", "processes")}
    assert len(devices["devices1"]["devices"]) == 1 and len(devices["devices4"]["devices"]) == 4
    assert devices["processes"]["process_count"] == 2 and len(devices["processes"]["devices"]) == 4
    assert not (tmp_path / "processes" / "checkpoint.pkl").exists()
    # the same job again: every process refuses the finished run directory, with the same message
    for (out, err), code in job():
        assert code == 2 and "already holds a fit (posterior.nc); pass --overwrite" in err and "Traceback" not in err


def test_a_malformed_multi_process_setting_is_a_clear_error_before_any_work(tmp_path, capsys, monkeypatch):
    """A process count that is not a number stops the fit with a message naming the variable and
    the fix, before jax.distributed is touched and before the run directory is made."""
    from inference._cli import EXIT_BAD_INPUT

    cfg = _config(tmp_path, "num_warmup = 10\nnum_samples = 10")
    monkeypatch.setenv("ZINCKIN_COORDINATOR_ADDRESS", "127.0.0.1:1")
    monkeypatch.setenv("ZINCKIN_NUM_PROCESSES", "two")
    assert main(["fit", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "$ZINCKIN_NUM_PROCESSES = 'two' is not a whole number" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


CORES_SCRIPT = """
import json, os
from inference._cli import _cells_over_cores, _cpu_device_per_core
from inference._config import RuntimeSection
import models
made = _cpu_device_per_core(RuntimeSection())
import jax
out = {"made": made, "devices": jax.device_count(), "rows_before": len(models.row_devices())}
_cells_over_cores(models.CPU_MIN_ROWS_PER_DEVICE * jax.device_count() - 1)
out["rows_few"] = len(models.row_devices())
_cells_over_cores(models.CPU_MIN_ROWS_PER_DEVICE * jax.device_count())
out["rows_many"] = len(models.row_devices())
print(json.dumps(out))
"""


def test_fit_makes_one_cpu_device_per_core_and_splits_only_many_cells(tmp_path):
    """In a fresh process on a CPU: one jax device per core (here 2, as the cores allow), batched
    solves on the first device until each device would get ``CPU_MIN_ROWS_PER_DEVICE`` cells, then
    on all; an explicit ``--xla_force_host_platform_device_count`` is left alone; and in a process
    where jax has already started, nothing changes and nothing fails."""
    import os

    cores = len(os.sched_getaffinity(0))
    (tmp_path / "s.py").write_text(CORES_SCRIPT)
    runs = {}
    for name, flags in (("auto", None), ("user", "--xla_force_host_platform_device_count=1")):
        env = dict(_env(), **({"XLA_FLAGS": flags} if flags else {}))
        res = subprocess.run([sys.executable, str(tmp_path / "s.py")], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        runs[name] = json.loads(res.stdout.strip().splitlines()[-1])
    auto, user = runs["auto"], runs["user"]
    if cores >= 2:
        assert auto == {"made": True, "devices": cores, "rows_before": 1, "rows_few": 1, "rows_many": cores}
    else:
        assert auto["made"] is False and auto["devices"] == 1
    assert user["made"] is False and user["devices"] == 1
    import jax

    from inference._cli import _cpu_device_per_core
    from inference._config import RuntimeSection

    jax.devices()  # jax has started in this process
    assert _cpu_device_per_core(RuntimeSection()) is False

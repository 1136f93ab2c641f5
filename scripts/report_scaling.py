"""Time `zinckin report` on a large imaging run made by tiling a finished run's cells.

    python scripts/report_scaling.py RUN_DIR --cells 1000 [--draws 500] [--work /tmp/report_scaling]

RUN_DIR is a finished imaging fit (for example the bundled example's). Its cells are repeated
(renamed cell0001, ...) up to --cells, keeping --draws draws per chain, and written as a new run
directory beside its run.json and config.toml (so the model and priors still resolve); then the
report of the original and of the large run are built in this process and both times printed,
with their ratio. The tiled run is a timing device only: its cells are copies, so its scores and
LOO are not a fit's.
"""

import argparse
import shutil
import sys
import time
from pathlib import Path

import jax


jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from inference._report import build_report  # noqa: E402


def tile(run_dir: Path, out: Path, cells: int, draws: int) -> None:
    tree = xr.open_datatree(run_dir / "posterior.nc", engine="h5netcdf")
    n = tree["posterior"].sizes["cell"]
    reps = int(np.ceil(cells / n))
    names = [f"cell{i + 1:04d}" for i in range(cells)]
    groups = {}
    for path in tree.groups[1:]:
        ds = tree[path].to_dataset()
        if "draw" in ds.dims:
            ds = ds.isel(draw=slice(0, draws))
        if "cell" in ds.dims:
            ds = xr.concat([ds] * reps, dim="cell", data_vars="minimal", coords="minimal", compat="override")
            ds = ds.isel(cell=slice(0, cells)).assign_coords(cell=names)
        groups[path] = ds
    big = xr.DataTree.from_dict(groups)
    big.attrs.update(tree.attrs)
    out.mkdir(parents=True, exist_ok=True)
    big.to_netcdf(out / "posterior.nc", engine="h5netcdf")
    for name in ("run.json", "config.toml", "summary.csv"):
        shutil.copy2(run_dir / name, out / name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--cells", type=int, default=1000)
    p.add_argument("--draws", type=int, default=500, help="draws kept per chain")
    p.add_argument("--work", type=Path, default=Path("/tmp/report_scaling"))
    args = p.parse_args()
    big = args.work / f"cells{args.cells}"
    start = time.perf_counter()
    tile(args.run_dir, big, args.cells, args.draws)
    print(f"tiled run with {args.cells} cells written in {time.perf_counter() - start:.0f} s: {big}")
    small = build_report(args.run_dir, out=args.work / "report_small", log=lambda s: None)
    large = build_report(big, out=args.work / "report_large")
    print(f"report of {args.run_dir} ({len(small.figures)} figures): {small.seconds:.1f} s")
    print(f"report of {args.cells} cells ({len(large.figures)} figures): {large.seconds:.1f} s "
          f"(ratio {large.seconds / small.seconds:.1f})")


if __name__ == "__main__":
    main()

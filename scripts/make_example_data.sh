#!/usr/bin/env bash
# Regenerate the bundled example data set (data/example) exactly as committed.
set -euo pipefail
cd "$(dirname "$0")/.."
zinckin simulate --out data/example --num-cells 12 --seed 20261121 --overwrite \
  --record-command "zinckin simulate --out data/example --num-cells 12 --seed 20261121 --overwrite"

#!/usr/bin/env bash
# On a machine with the package registry: fetch the pure-Python wheels the GPU machine lacks into .gpu_wheels/
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --only-binary :all: --python-version 3.12 --no-deps -d .gpu_wheels \
  gguf==0.19.0 pytest pluggy iniconfig packaging
ls .gpu_wheels

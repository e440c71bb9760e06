#!/usr/bin/env bash
# On a machine with the package registry: fetch the pure-Python wheels the GPU machine lacks into .gpu_wheels/
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --only-binary :all: --python-version 3.12 --no-deps -d .gpu_wheels \
  gguf==0.19.0 pytest pluggy iniconfig packaging
ls .gpu_wheels
# the random-weight test model "base" (canvas 16) at Q8_0, for the GPU token tests: built here with the tests'
# transformers 5.23, not by the GPU machine's 5.17 (tests/test_cuda_kernels.py, canvas16_gguf)
python3 - <<'PY'
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, "tests")
from conftest import SPECS  # noqa: E402

from dgemma.convert import convert  # noqa: E402
from dgemma.convert.tiny import build_checkpoint  # noqa: E402

ckpt = build_checkpoint(SPECS["base"], Path(tempfile.mkdtemp()) / "base")
convert(ckpt, ".gpu_wheels/canvas16-q8.gguf", "Q8_0", quiet=True, force=True)
PY
ls -la .gpu_wheels/canvas16-q8.gguf

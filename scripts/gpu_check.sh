#!/usr/bin/env bash
# One call on a bare GPU machine (PyTorch and CuPy there, no package registry): install this checkout and
# the wheels carried in .gpu_wheels/ (made by scripts/gpu_prepare.sh), run the GPU tests, then the
# benchmark. Use with the device tool: carry [".gpu_wheels"], command "bash scripts/gpu_check.sh", timeout_s about
# 560: the three steps are capped at 200 + 110 + 200 s (and 15 s of grace for a hung test), about 35 s left for the
# installs. The tests run in 8 processes where pytest-xdist loads (the GPU image has it), else in one, where the
# model-level GPU tests come last in the test file, then the tiles compiled on sm_75's instructions
# (tests/test_cuda_turing.py): a cut at the cap loses those first.
#
# `bash scripts/gpu_check.sh --failed`, at once after it on the same (still warm) machine: only the tests that failed,
# each with its whole traceback (the list is kept in /tmp/dgemma_gpu_failed.txt; $OUT is emptied between calls).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
FAILED=/tmp/dgemma_gpu_failed.txt
if [ "${1:-}" = "--failed" ]; then
  [ -s "$FAILED" ] || { echo "no failed tests recorded in $FAILED (not this machine, or none failed)"; exit 1; }
  [ -f /tmp/dgemma_pythonpath ] && export PYTHONPATH=$(cat /tmp/dgemma_pythonpath)
  export PYTHONUNBUFFERED=1
  mapfile -t ids < "$FAILED"  # one id a line ([brackets] and all)
  # a test still running after 100 s (a hung kernel): every thread's stack printed (pytest's faulthandler), the
  # run goes on to the cap
  timeout -s INT -k 15 240 $PY -m pytest -v -rfE --tb=long -o faulthandler_timeout=100 -p no:cacheprovider "${ids[@]}" \
    2>&1 | tee "$OUT/failed_tests.txt"
  exit
fi
rm -f "$FAILED" /tmp/dgemma_pythonpath  # an earlier run's, on a machine kept warm
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv 2>&1 | tee "$OUT/gpu.txt"
if ls .gpu_wheels/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --find-links .gpu_wheels gguf pytest >"$OUT/install.log" 2>&1 || tail -5 "$OUT/install.log"
fi
if ! $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . >>"$OUT/install.log" 2>&1; then
  # no setuptools there: lay the package out by links (dgemma.convert -> convert/, ...) and use PYTHONPATH
  echo "pip install -e . failed (see install.log); using a linked package tree"
  site=$(mktemp -d) && mkdir -p "$site/dgemma"
  ln -s "$PWD/dgemma/__init__.py" "$site/dgemma/__init__.py"
  for d in convert quant plugin csrc; do ln -s "$PWD/$d" "$site/dgemma/$d"; done
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  echo "$PYTHONPATH" > /tmp/dgemma_pythonpath
fi
$PY -c "import dgemma.plugin.cuda as c; print('compute capability', c.check_cuda())" 2>&1 | tee -a "$OUT/gpu.txt"
export PYTHONUNBUFFERED=1
# pytest-xdist (the GPU image has it): the tests in 8 processes, so that their NVRTC compiles (each kernel
# module once per process, then from CuPy's disk cache) use the machine's cores; a worker whose CUDA context a
# kernel poisoned (an illegal address: every later launch fails) ends after that test's report and xdist starts
# another (tests/conftest.py). With pytest-timeout (also there), a test still running after 120 s (a hung
# kernel) ends its worker, which xdist reports as crashed and replaces, and the rest go on. Probed by running the
# host-memory tests in two workers (a collection alone starts none); where that fails, one process as before.
PAR=()
probe() { $PY -m pytest -q -n 2 "$@" -p no:cacheprovider tests/test_hostmem.py >/dev/null 2>&1; }
if probe --timeout 120 --timeout-method thread; then
  PAR=(-n 8 --timeout 120 --timeout-method thread)
elif probe; then
  PAR=(-n 8)
fi
echo "pytest workers: ${PAR[*]:-one process (no pytest-xdist)}" | tee -a "$OUT/gpu.txt"
# 8 workers' torch CPU threads (the references) on the machine's 16 cores
[ ${#PAR[@]} -gt 0 ] && export OMP_NUM_THREADS=2
echo "== GPU tests"
# -v: each test's name and result as it finishes; SIGINT at the limit: pytest stops and still prints its
# summary of what failed so far (-k: killed 15 s later if a kernel hangs it)
timeout -s INT -k 15 200 $PY -m pytest -v -rfE --durations=15 ${PAR[@]+"${PAR[@]}"} -m gpu -p no:cacheprovider \
  tests/test_cuda_kernels.py tests/test_cuda_turing.py 2>&1 | tee "$OUT/gpu_tests.txt" | grep -v PASSED | tail -60
# 124: cut at the cap (the tests running then are in neither the summary nor failed.txt)
echo "GPU tests: pytest exit ${PIPESTATUS[0]}" | tee -a "$OUT/gpu.txt"
grep -oE '^FAILED [^ ]+|^ERROR [^ ]+' "$OUT/gpu_tests.txt" | cut -d' ' -f2 | sort -u | tee "$FAILED" > "$OUT/failed.txt"
# a kernel that fails the tests may end this run with a CUDA error: rerun it with --kinds naming the others
echo "== kernels at the 26B-A4B's shapes (every matmul kind: 6 columns since session 12, f16-cublas)"
timeout 110 $PY bench/step_gpu.py --repeat 10 2>&1 | tee "$OUT/bench.txt"
echo "== whole denoising step, prefill, VRAM: cuda backend (Q4_K_M, the 12 GB plan; last, that plan streaming experts as an 8 GiB card would) against the torch backend"
timeout 200 $PY bench/model_gpu.py --matmuls scalar,auto --eager 2>&1 | tee "$OUT/model_bench.txt"

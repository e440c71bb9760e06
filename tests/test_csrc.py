"""CUDA sources without a GPU: every .cu compiles with nvcc for each target architecture (warnings as
errors), and the kernels' block decoding (csrc/quant/blocks.cuh), run on the CPU through a host harness,
equals gguf-py's dequantizers bit for bit."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from dgemma import quant

CSRC = Path(__file__).resolve().parents[1] / "csrc"
ARCHS = ["sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "sm_120"]
KERNELS = sorted(p.name for p in CSRC.glob("*.cu"))
nvcc = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(nvcc is None, reason="nvcc is not installed")


def supported_archs() -> list[str]:
    listed = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True).stdout.split()
    return [a for a in ARCHS if a.replace("sm_", "compute_") in listed]


@pytest.mark.parametrize("source", KERNELS)
def test_kernel_compiles_for_every_architecture(source, tmp_path):
    archs = supported_archs()
    assert {"sm_75", "sm_80", "sm_86", "sm_89", "sm_90"} <= set(archs)
    gencode = [f"-gencode=arch={a.replace('sm_', 'compute_')},code={a}" for a in archs]
    proc = subprocess.run([nvcc, "-std=c++17", "-Werror", "all-warnings", f"-I{CSRC}", *gencode, "-c", str(CSRC / source),
                           "-o", str(tmp_path / "k.o")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    exe = tmp_path_factory.mktemp("harness") / "dequant_host"
    proc = subprocess.run([nvcc, "-std=c++17", "-O2", "-Werror", "all-warnings", "-o", str(exe),
                           str(CSRC / "tools" / "dequant_host.cu")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return exe


TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_kernel_block_decoding_equals_gguf_py(harness, qtype):
    rng = np.random.default_rng(int(qtype))
    x = rng.standard_normal((7, 768)) * rng.uniform(1e-3, 1e3, (7, 1))
    x[0, :300] = 0.0
    x[1] = np.abs(x[1])
    data = quant.quantize(x.astype(np.float32), qtype)
    proc = subprocess.run([str(harness), str(int(qtype)), "768"], input=data.tobytes(), capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    ours = np.frombuffer(proc.stdout, np.float32).reshape(7, 768)
    ref = x.astype(np.float32) if qtype == Q.F32 else gguf.quants.dequantize(data, qtype).reshape(7, 768)
    np.testing.assert_array_equal(ours, ref)


def test_harness_refuses_bad_input(harness):
    proc = subprocess.run([str(harness), str(int(Q.Q4_K)), "100"], input=b"", capture_output=True, timeout=60)
    assert proc.returncode == 2 and b"not a multiple" in proc.stderr

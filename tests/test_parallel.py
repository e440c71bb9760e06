"""Quantizing in worker processes (quant/parallel.py): results in order, bounded in flight, errors where they
are due; convert and dgemma quantize write the same file for any worker count."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SPECS
from gguf import GGMLQuantizationType as Q

from dgemma import quant
from dgemma.convert import ConvertError, convert, requant, writer
from dgemma.convert.requant import requantize
from dgemma.quant import parallel
from dgemma.quant.parallel import IN_FLIGHT, Pool, check_workers, quantize_chunk, requantize_chunk


def chunks(n: int, rows: int = 8, width: int = 512) -> list[np.ndarray]:
    rng = np.random.default_rng(n)
    return [rng.standard_normal((rows, width), dtype=np.float32) for _ in range(n)]


def test_results_come_in_order_with_few_jobs_ahead():
    values = chunks(12)
    pulled = []

    def jobs():
        for i, v in enumerate(values):
            pulled.append(i)
            yield v, Q.Q4_K

    with Pool(2) as pool:
        out = pool.map(quantize_chunk, jobs(), len(values))
        first = next(out)
        assert len(pulled) == IN_FLIGHT * 2  # (the rest are not even made yet)
        got = [first, *out]
        again = list(pool.map(requantize_chunk, ((g, Q.Q4_K, Q.Q8_0) for g in got), len(got)))  # (same workers)
    assert all(np.array_equal(a, quant.quantize(v, Q.Q4_K)) for a, v in zip(got, values))
    assert all(np.array_equal(a, quant.quantize(quant.dequantize(g, Q.Q4_K), Q.Q8_0)) for a, g in zip(again, got))


def test_a_single_chunk_or_one_worker_runs_here():
    with Pool(4) as pool:
        assert len(list(pool.map(quantize_chunk, [(chunks(1)[0], Q.Q8_0)], 1))) == 1
        assert pool._executor is None  # (a small model never starts the workers)


def test_an_error_is_raised_in_order_and_the_rest_is_dropped():
    values = chunks(40)
    values[3] = values[3][:, :100]  # rows of 100 values: not a multiple of Q4_K's 256
    pulled = []

    def jobs():
        for i, v in enumerate(values):
            pulled.append(i)
            yield v, Q.Q4_K

    got = []
    with Pool(2) as pool, pytest.raises(quant.QuantError, match="not a multiple of 256"):
        for x in pool.map(quantize_chunk, jobs(), len(values)):
            got.append(x)
    assert len(got) == 3 and len(pulled) <= 3 + 1 + IN_FLIGHT * 2  # (not the other 30)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "4"])
def test_worker_counts_are_checked(bad):
    with pytest.raises(ValueError, match="--threads must be a positive integer"):
        check_workers(bad)
    assert check_workers(None) == 1 and check_workers(3) == 3


def test_convert_and_quantize_write_the_same_file_for_any_worker_count(checkpoint_factory, tmp_path, monkeypatch):
    """With chunks of 1024 values the larger tensors are several chunks, in flight at once in the workers."""
    monkeypatch.setattr(writer, "CHUNK_ELEMENTS", 1024)
    monkeypatch.setattr(requant, "CHUNK_ELEMENTS", 1024)
    submitted = []

    class Counted(parallel.ProcessPoolExecutor):
        def submit(self, fn, *args):
            submitted.append(fn.__name__)
            return super().submit(fn, *args)

    monkeypatch.setattr(parallel, "ProcessPoolExecutor", Counted)
    ckpt = checkpoint_factory(SPECS["odd"])
    one = convert(ckpt, tmp_path / "one.gguf", "Q4_K_M", quiet=True, threads=1).path
    two = convert(ckpt, tmp_path / "two.gguf", "Q4_K_M", quiet=True, threads=2).path
    assert one.read_bytes() == two.read_bytes()
    f32 = convert(ckpt, tmp_path / "f32.gguf", "F32", quiet=True, threads=2).path
    a = requantize(f32, tmp_path / "a.gguf", "Q2_K", quiet=True, threads=1).path
    b = requantize(f32, tmp_path / "b.gguf", "Q2_K", quiet=True, threads=3).path
    assert a.read_bytes() == b.read_bytes()
    assert {"quantize_chunk", "requantize_chunk", "cores"} == set(submitted) and len(submitted) > 20  # (cores: the start check)
    for call in (lambda: convert(ckpt, tmp_path / "x.gguf", "Q8_0", quiet=True, threads=0),
                 lambda: requantize(f32, tmp_path / "x.gguf", "Q8_0", quiet=True, threads=0)):
        with pytest.raises(ConvertError, match="--threads must be a positive integer, got 0"):
            call()
    assert not (tmp_path / "x.gguf").exists()


def test_a_dead_worker_is_a_clear_error():
    import os

    with Pool(2) as pool, pytest.raises(parallel.WorkerError, match="worker process died.*fewer --threads"):
        list(pool.map(os._exit, [(3,), (3,), (3,)], 3))


def test_where_workers_cannot_start_it_quantizes_here(tmp_path):
    """spawn re-imports the main script: a script read from stdin has none, so the workers fail to start; the
    pool says so once and quantizes in this process (the same bytes)."""
    import subprocess
    import sys

    script = """
import numpy as np
from gguf import GGMLQuantizationType as Q
from dgemma import quant
from dgemma.quant.parallel import Pool, quantize_chunk
chunks = [np.random.default_rng(i).standard_normal((4, 256), dtype=np.float32) for i in range(5)]
with Pool(2) as pool:
    out = list(pool.map(quantize_chunk, ((c, Q.Q4_K) for c in chunks), 5))
    assert pool.workers == 1
    again = list(pool.map(quantize_chunk, ((c, Q.Q4_K) for c in chunks), 5))
assert all(np.array_equal(a, quant.quantize(c, Q.Q4_K)) for a, c in zip(out + again, chunks + chunks))
print("ok")
"""
    run = subprocess.run([sys.executable, "-"], input=script, capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]
    warned = [line for line in run.stderr.splitlines() if line.startswith("dgemma:")]
    assert len(warned) == 1 and "quantizing in this process" in warned[0]

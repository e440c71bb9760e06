"""Quantizing on more cores (`--threads N`): a tensor's chunks quantized in worker processes, written in order.

Threads do not help here: the K-quant searches are many numpy calls on mid-sized arrays, held back by the GIL
(bench/quantize_threads.py: two threads quantize Q4_K slower than one). So the chunks go to worker processes
(started with "spawn": the converter's process holds torch's threads, which a fork would copy mid-state, and
a worker imports only numpy and dgemma.quant, in a fraction of a second). Results come back in the order of the
chunks, with at most IN_FLIGHT per worker submitted: the working set stays a few chunks per worker whatever the
tensor's size. The workers start at the first tensor of more than one chunk (a small model never starts them).
`workers` 1 is the plain loop in this process (the reference the tests compare: the bytes are the same).

One worker stays the default until a machine shows more are faster: on the 2-core development VM they are not
(bench/quantize_parallel.py: Q4_K x1.0, Q6_K x0.9, Q8_0 x0.5 with two workers; even a plain numpy loop runs
only x1.07 in two processes there, so its memory, not the GIL, is the limit), and a chunk's trip to a worker
costs more than Q8_0's quantizing of it.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np
from gguf import GGMLQuantizationType

from .api import dequantize, quantize

IN_FLIGHT = 2  # chunks per worker submitted ahead of the one being written


class WorkerError(RuntimeError):
    """A worker process died mid-run (its chunk is lost: the file cannot be finished)."""


DEFAULT_WORKERS = 1  # (see above)


def cores() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # (not on Linux)
        return max(1, os.cpu_count() or 1)


def check_workers(workers: int | None) -> int:
    """None: DEFAULT_WORKERS; else a positive count (ValueError otherwise)."""
    if workers is None:
        return DEFAULT_WORKERS
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"--threads must be a positive integer, got {workers!r}")
    return workers


def quantize_chunk(values: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """float values [r, K] -> their bytes in qtype (a worker's job in convert)."""
    return quantize(values, qtype)


def requantize_chunk(data: np.ndarray, src: GGMLQuantizationType, qtype: GGMLQuantizationType) -> np.ndarray:
    """A chunk's bytes in src -> in qtype, through float32 (a worker's job in dgemma quantize)."""
    return quantize(dequantize(data, src), qtype)


class Pool:
    """The workers for one file: its tensors' chunks go through `map`, one tensor after another."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._executor: ProcessPoolExecutor | None = None

    def map(self, fn, jobs: Iterable[tuple], n_jobs: int) -> Iterator[np.ndarray]:
        """fn(*job) for each of the n_jobs jobs, in order; an error in any is raised where its result is due.
        fn is a module-level function (it is sent to the workers by name)."""
        if self.workers == 1 or n_jobs < 2:
            for job in jobs:
                yield fn(*job)
            return
        if self._executor is None and not self._start():
            yield from self.map(fn, jobs, n_jobs)  # (now in this process)
            return
        pending: deque[Future[np.ndarray]] = deque()
        try:
            for job in jobs:
                try:
                    pending.append(self._executor.submit(fn, *job))
                except (ValueError, OSError) as e:  # submit starts workers on demand: where one died, CPython's
                    # broken pool cannot start its replacement ("bad value(s) in fds_to_keep", seen once in CI)
                    raise WorkerError(f"a quantizing worker process died or could not start ({e}); try fewer "
                                      "--threads") from None
                if len(pending) >= IN_FLIGHT * self.workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        except BrokenProcessPool as e:  # (a worker killed: out of memory, a signal)
            raise WorkerError(f"a quantizing worker process died ({e}); try fewer --threads") from None
        finally:  # (the consumer stopped early, or one failed: what has not begun is dropped)
            for future in pending:
                future.cancel()

    def _start(self) -> bool:
        """Start the workers and check that they run; where they cannot (spawn re-imports the main script, which
        a script read from stdin or an embedding interpreter does not have), say so once and go on with one."""
        executor = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        try:
            executor.submit(cores).result()
        except BrokenProcessPool as e:
            executor.shutdown(wait=False, cancel_futures=True)
            print(f"dgemma: quantizing worker processes do not start here ({e}); quantizing in this process",
                  file=sys.stderr, flush=True)
            self.workers = 1
            return False
        self._executor = executor
        return True

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

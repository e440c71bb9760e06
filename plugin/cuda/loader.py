"""Compile csrc/*.cu once per GPU architecture (NVRTC via CuPy, cached on disk by CuPy) and hand out kernels."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Any

MIN_CAPABILITY = (7, 5)
NVRTC_OPTIONS = ("-std=c++17",)


class CudaUnavailable(RuntimeError):
    """What the cuda backend needs and this machine lacks, in one line."""


def csrc_dir() -> Path:
    import dgemma.csrc

    return Path(dgemma.csrc.__file__).parent


@lru_cache(maxsize=1)
def csrc_digest() -> str:
    """16 hex digits of sha256 over every csrc/ source (.cu and .cuh, by path and content)."""
    h = hashlib.sha256()
    root = csrc_dir()
    for p in sorted(root.rglob("*.cu*")):
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def module_source(filename: str) -> str:
    """What the loader gives NVRTC for csrc/<filename>: its text behind a line naming csrc_digest(). CuPy's disk
    cache keys on the source text and the options, not on the headers it includes: without the digest an
    upgrade that changes only a header would load the kernels compiled from the old one."""
    return f'// dgemma csrc {csrc_digest()}\n#line 1 "{filename}"\n' + (csrc_dir() / filename).read_text()


@lru_cache(maxsize=1)
def check_cuda() -> tuple[int, int]:
    """The GPU's compute capability, or CudaUnavailable saying what is missing."""
    try:
        import cupy  # noqa: F401
    except ImportError:
        raise CudaUnavailable("the cuda backend needs CuPy: pip install 'dgemma[cuda12]' (CUDA 12 driver) "
                              "or 'dgemma[cuda13]' (CUDA 13)") from None
    import torch

    if not torch.cuda.is_available():
        raise CudaUnavailable("no CUDA GPU is visible to PyTorch (is the NVIDIA driver installed, and torch a CUDA build?)")
    cap = torch.cuda.get_device_capability()
    if cap < MIN_CAPABILITY:
        raise CudaUnavailable(f"GPU '{torch.cuda.get_device_name()}' has compute capability {cap[0]}.{cap[1]}; "
                              f"the cuda backend needs {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer")
    return cap


@lru_cache(maxsize=None)
def module(filename: str, name_expressions: tuple[str, ...] = ()) -> Any:
    """cupy.RawModule for csrc/<filename>; `name_expressions` instantiates templates by name."""
    check_cuda()
    import cupy

    return cupy.RawModule(code=module_source(filename), options=(*NVRTC_OPTIONS, f"-I{csrc_dir()}"),
                          name_expressions=name_expressions or None)


@lru_cache(maxsize=None)
def kernel(filename: str, name: str, name_expressions: tuple[str, ...] = ()) -> Any:
    """A kernel of csrc/<filename>, fetched once (each launch would otherwise look it up in the module again)."""
    return module(filename, name_expressions).get_function(name)

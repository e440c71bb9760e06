"""Compile csrc/*.cu once per GPU architecture (NVRTC via CuPy, cached on disk by CuPy) and hand out kernels."""

from __future__ import annotations

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

    src = csrc_dir()
    code = (src / filename).read_text()
    return cupy.RawModule(code=code, options=(*NVRTC_OPTIONS, f"-I{src}"), name_expressions=name_expressions or None)


@lru_cache(maxsize=None)
def kernel(filename: str, name: str, name_expressions: tuple[str, ...] = ()) -> Any:
    """A kernel of csrc/<filename>, fetched once (each launch would otherwise look it up in the module again)."""
    return module(filename, name_expressions).get_function(name)

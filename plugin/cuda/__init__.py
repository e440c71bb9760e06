"""The `cuda` backend's kernels: csrc/*.cu compiled at run time by NVRTC (CuPy RawModule), launched on
torch's current stream, tensors shared through DLPack. Importing this package needs neither CuPy nor a
GPU; `check_cuda()` says clearly what is missing."""

from .loader import CudaUnavailable, check_cuda, csrc_dir

__all__ = ["CudaUnavailable", "check_cuda", "csrc_dir"]

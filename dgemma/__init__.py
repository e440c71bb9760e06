"""dgemma: run DiffusionGemma locally (converter, quantizers, CUDA kernels, provider plugin)."""

__version__ = "0.1.0"

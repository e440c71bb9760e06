"""CUDA sources (compiled at run time by NVRTC through CuPy; see dgemma.plugin.cuda)."""

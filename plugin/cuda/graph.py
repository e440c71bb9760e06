"""The decoder pass as a CUDA graph: one replay instead of ~100 kernel launches per layer from Python.

A denoising pass of the 26B-A4B is a few thousand small launches (norms, projections, routing, two grouped
expert GEMMs, attention per layer); launched one by one from Python they cost more host time than the
GPU needs to run them. Within one canvas every pass has the same shapes and reads the same KV cache, so
the pass is captured once into a CUDA graph and replayed with new inputs copied into its static buffers.

`GraphedDecoder(model, cache)(canvas, soft)` equals `model.decode_hidden(canvas, cache, soft)`:
- soft None (a canvas's first pass) runs eagerly;
- the first pass with a given (cache, cache length, shapes) runs eagerly too: it compiles and loads the
  kernels, so that nothing but launches happens during the capture;
- the next one captures the pass and replays it; later ones only replay.
A capture that fails (an op that waits for the host, a library that cannot be captured) is reported once
as a warning and the decoder stays eager for good: `fallback` says why.
"""

from __future__ import annotations

import warnings

import torch

from ..model import DiffusionGemma, KVCache


class GraphedDecoder:
    def __init__(self, model: DiffusionGemma, cache: KVCache, api=torch.cuda) -> None:
        """api: where CUDAGraph, graph() and synchronize() come from (torch.cuda; tests of the bookkeeping
        on the CPU pass a stand-in)."""
        self.model, self.cache, self.api = model, cache, api
        self.key: tuple | None = None  # what the captured graph (or the warm-up) was made for
        self.warm = False
        self.graph = None  # torch.cuda.CUDAGraph
        self.canvas_in = self.soft_in = self.out = None  # the graph's static input and output buffers
        self.captures = self.replays = 0
        self.fallback: str | None = None

    def _eager(self, canvas: torch.Tensor, soft: torch.Tensor | None) -> torch.Tensor:
        return self.model.decode_hidden(canvas, self.cache, soft)

    @torch.inference_mode()
    def __call__(self, canvas: torch.Tensor, soft: torch.Tensor | None) -> torch.Tensor:
        """canvas [1, C] token ids, soft [1, C, D] or None -> the last layer's output [1, C, D]. The result
        of a replay is the graph's output buffer: valid until the next call."""
        if soft is None or self.fallback is not None:
            return self._eager(canvas, soft)
        key = (id(self.cache), self.cache.length, tuple(canvas.shape), canvas.dtype, tuple(soft.shape), soft.dtype)
        if key != self.key:  # a new canvas (the cache grew): warm up, capture on the next pass
            self.key, self.warm, self.graph = key, True, None
            return self._eager(canvas, soft)
        if self.graph is None:
            try:
                self._capture(canvas, soft)
            except RuntimeError as e:
                self.graph, self.fallback = None, str(e).splitlines()[0]
                warnings.warn(f"CUDA graph capture of the decoder failed, running it eagerly: {self.fallback}",
                              RuntimeWarning, stacklevel=2)
                self.api.synchronize()
                return self._eager(canvas, soft)
        self.canvas_in.copy_(canvas)
        self.soft_in.copy_(soft)
        self.graph.replay()
        self.replays += 1
        return self.out

    def _capture(self, canvas: torch.Tensor, soft: torch.Tensor) -> None:
        self.canvas_in, self.soft_in = canvas.clone(), soft.clone()
        graph = self.api.CUDAGraph()
        self.api.synchronize()
        with self.api.graph(graph):
            self.out = self._eager(self.canvas_in, self.soft_in)
        self.graph = graph
        self.captures += 1

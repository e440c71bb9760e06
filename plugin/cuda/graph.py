"""The decoder pass as a CUDA graph: one replay instead of ~100 kernel launches per layer from Python.

A denoising pass of the 26B-A4B is a few thousand small launches (norms, projections, routing, two grouped
expert GEMMs, attention per layer); launched one by one from Python they cost more host time than the
GPU needs to run them. Within one canvas every pass has the same shapes and the same KV cache (the same
buffers, read, and the canvas's keys/values written into their reserved room: KVCache.with_canvas), so
the pass is captured once into a CUDA graph and replayed with new inputs copied into its static buffers.

`GraphedDecoder(model, cache)(canvas, soft)` equals `model.decode_hidden(canvas, cache, soft)`:
- soft None (a canvas's first pass) runs eagerly;
- the first pass with a given (cache version, shapes) runs eagerly too, on the decoder's own stream (the one
  it captures on): it compiles and loads the kernels and sets up each library's per-stream state, so that
  nothing but launches happens during the capture;
- the next one captures the pass and replays it; later ones only replay.
Each decoder captures on its own stream, and only its own thread must not sync meanwhile, so engines in
other threads (the server runs several models at once) go on. A capture that fails (an op that waits for
the host, a library that cannot be captured) is reported as a warning and the decoder stays eager:
`fallback` says why (the engine then stops making graphs).
"""

from __future__ import annotations

import warnings

import torch

from ..kv_cache import KVCache
from ..model import DiffusionGemma


class GraphedDecoder:
    def __init__(self, model: DiffusionGemma, cache: KVCache, stream=None, api=torch.cuda) -> None:
        """stream: where to warm up and capture (default a new one; an engine passes the same one to each
        generation's decoder). api: where CUDAGraph, Stream, stream(), current_stream() and synchronize()
        come from (torch.cuda; tests of the bookkeeping on the CPU pass a stand-in)."""
        self.model, self.cache, self.api = model, cache, api
        self.stream = stream if stream is not None else api.Stream()
        self.key: tuple | None = None  # what the captured graph (or the warm-up) was made for
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
        # the cache's version (store() and extend() bump it; every encode does, so it also moves with the length and the
        # positions): a graph holds the cache buffers' addresses, and writes the canvas into them
        key = (self.cache.version, tuple(canvas.shape), canvas.dtype, tuple(soft.shape), soft.dtype)
        if key != self.key:  # a new canvas (the cache grew): warm up, capture on the next pass
            self.key, self.graph = key, None
            return self._on_own_stream(lambda: self._eager(canvas, soft))
        if self.graph is None:
            try:
                self._capture(canvas, soft)
            except torch.cuda.OutOfMemoryError:  # a shortage now, not a pass that cannot be captured: no fallback
                self.graph = None
                raise
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

    def _on_own_stream(self, fn):
        """fn() on the decoder's stream, ordered after the current stream's work and before its next."""
        current = self.api.current_stream()
        self.stream.wait_stream(current)
        with self.api.stream(self.stream):
            out = fn()
        current.wait_stream(self.stream)
        if isinstance(out, torch.Tensor) and out.is_cuda:
            out.record_stream(current)  # made on the decoder's stream, read on the current one
        return out

    def _capture(self, canvas: torch.Tensor, soft: torch.Tensor) -> None:
        self.canvas_in, self.soft_in = canvas.clone(), soft.clone()
        graph = self.api.CUDAGraph()
        self.api.synchronize()
        # the low-level capture (not torch.cuda.graph, which empties the allocator's cache each time: once
        # per canvas here, for every thread); thread_local: other threads' CUDA work may go on meanwhile
        with self.api.stream(self.stream):
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                self.out = self._eager(self.canvas_in, self.soft_in)
            finally:
                graph.capture_end()
        self.api.current_stream().wait_stream(self.stream)
        self.graph = graph
        self.captures += 1

    def release(self) -> None:
        """Drop the graph, its buffers (its memory pool goes back) and the KV cache; the counts and `fallback`
        stay. The decoder is done with: calling it again is an error."""
        self.key = self.graph = self.canvas_in = self.soft_in = self.out = self.cache = None

"""Experts in host RAM, streamed to the GPU: how a model larger than the GPU's free memory still runs on it.

A denoising pass multiplies 256 canvas rows by top-8 of 128 experts, so nearly every expert of every layer is
read on every pass: running the offloaded experts on the CPU would cost about as much arithmetic as the GPU does
for them (some 25 GFLOP per layer and pass for the 26B-A4B), far past what a CPU does in the GPU's time.
Copying them is cheaper: a layer's experts (0.32-0.52 GiB) cross PCIe in 14-22 ms at 25 GB/s, while a GeForce
card, compute-bound on the canvas, spends about as long on the layers in between. So the experts of some layers
(`host_layers`, spread evenly over the model) stay in page-locked host memory and are copied into one of two VRAM
slots (ExpertStage) on a side stream, the next streamed layer's while the GPU computes, each slot reused only
after the layer that read it has run. Nothing else changes: the staged experts are QuantExperts, run by the same
kernels on the same bytes, so the logits equal those of the model loaded whole (on a GPU up to the experts'
float atomics). CUDA graphs are off with them: a pass then takes tens of milliseconds, and what graphs save is a
fraction of one.
"""

from __future__ import annotations

import mmap
import warnings
import weakref
from collections.abc import Sequence
from pathlib import Path

import torch
from gguf import GGUFReader

# (host_layers_for, spread and vram_saving: the slot math, used through this module by weights.py and the tests)
from dgemma.quant.planner import SLOTS, GiB, expert_sizes, host_layers_for, slot_bytes, spread, vram_saving  # noqa: F401

from ..config import ModelConfig
from ..hostmem import available_ram
from ..model import LayerWeights
from .weights import QuantExperts

PAGE = mmap.PAGESIZE  # host pages: each page-locked range covers only whole pages of its own allocation


def expert_bytes(reader: GGUFReader, n_layer: int) -> list[tuple[int, int]]:
    """Each layer's routed experts in the file, in bytes: (gate_up, down)."""
    return expert_sizes({t.name: int(t.n_bytes) for t in reader.tensors}, n_layer)


def host_ram_shortage(reader: GGUFReader, cfg: ModelConfig, path: str | Path, layers: Sequence[int]) -> str | None:
    """None where the machine's available memory holds these layers' experts (page-locked: no swap), else the
    one-line error saying so."""
    need = sum(sum(size) for i, size in enumerate(expert_bytes(reader, cfg.n_layer)) if i in layers)
    have = available_ram(swap=False)
    if not layers or have is None or need <= have:
        return None
    return (f"{path}: the experts of {len(layers)} layers kept in host RAM need {need / GiB:.2f} GiB, but the machine "
            f"has {have / GiB:.2f} GiB available: free memory, or convert the model for this GPU (dgemma convert ... "
            f"--fit)")


class PageLockError(RuntimeError):
    """cudaHostRegister refused a range (the experts then stay in pageable memory)."""


def _host_register(address: int, size: int) -> None:
    import cupy  # (its runtime calls clear CUDA's last error when they raise, unlike torch's cudart binding)

    try:
        cupy.cuda.runtime.hostRegister(address, size, 1)  # cudaHostRegisterPortable: every context sees it
    except cupy.cuda.runtime.CUDARuntimeError as e:
        raise PageLockError(f"cudaHostRegister of {size} bytes failed ({e})") from None


def _host_unregister(address: int) -> None:
    import cupy

    try:
        cupy.cuda.runtime.hostUnregister(address)
    except cupy.cuda.runtime.CUDARuntimeError:  # (at exit, CUDA may be gone already: nothing left to undo)
        pass


def page_locked(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A copy of the CPU tensor t in page-locked memory, which a copy to the GPU runs from beside the kernels:
    (the copy, its registered address), to be unregistered (_host_unregister) before the memory goes; a
    PageLockError where that is refused. Registered over whole pages of its own allocation with
    cudaHostRegister, not by pin_memory(), whose caching allocator rounds every block up to a power of two (a
    285 MB tensor would lock 512 MiB) and keeps it after it is freed."""
    buf = torch.empty(t.nbytes + 2 * PAGE, dtype=torch.uint8)
    start = -buf.data_ptr() % PAGE
    out = buf[start : start + t.nbytes].view(t.dtype).view(t.shape)
    out.copy_(t)
    _host_register(out.data_ptr(), -(-t.nbytes // PAGE) * PAGE)
    return out, out.data_ptr()


def _release(stream: torch.cuda.Stream | None, addresses: list[int], keep: list[torch.Tensor]) -> None:
    """ExpertStage's finalizer: the copies still running from host memory finish, then each range is
    unregistered; `keep` holds the memory until then."""
    try:
        if stream is not None:
            stream.synchronize()
    except RuntimeError:  # (CUDA already gone, at exit: no copy runs any more)
        pass
    for address in addresses:
        _host_unregister(address)
    keep.clear()


class ExpertStage:
    """The VRAM slots streamed layers' experts are copied into. acquire(layer, gate_up, down) returns the
    layer's experts on the GPU (copied in already, or now) as QuantExperts with the kernel choices of the two
    given, having started the copy of the next streamed layer into the other slot; release(layer) marks its
    slot free once the work queued so far (the layer's) has run. On a GPU the copies run on their own stream,
    ordered by events, from the experts' bytes moved to page-locked memory here (their QuantExperts' data
    replaced; unregistered when the stage goes, after its copies); on the CPU (tests) they are plain copies.
    The stage holds the bytes only, not the weight objects, which hold it: no reference cycle keeps page-locked
    RAM and VRAM after an engine is dropped."""

    def __init__(self, host: dict[int, tuple[QuantExperts, QuantExperts]], device: torch.device | str) -> None:
        self.order, self.device = sorted(host), torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        if self.stream is not None:
            self._lock_pages([e for pair in host.values() for e in pair])
        self.host = {layer: (gate_up.data, down.data) for layer, (gate_up, down) in host.items()}  # [E, N, bytes]
        nbytes = max(slot_bytes(g.nbytes, d.nbytes) for g, d in self.host.values())
        self.buffers = [torch.empty(nbytes, dtype=torch.uint8, device=self.device) for _ in range(min(SLOTS, len(host)))]
        if self.stream is not None:
            for buf in self.buffers:  # freed, a slot waits for the copies queued on the stage's stream
                buf.record_stream(self.stream)
        self.held: list[int | None] = [None] * len(self.buffers)  # the layer each slot holds (or is being filled with)
        self.ready: list[torch.cuda.Event | None] = [None] * len(self.buffers)  # its copy done
        self.free: list[torch.cuda.Event | None] = [None] * len(self.buffers)  # the last work reading it done
        self.last = 0  # the slot of the last acquire
        self.copies = 0  # layers copied in so far

    def _lock_pages(self, weights: list[QuantExperts]) -> None:
        addresses: list[int] = []
        keep: list[torch.Tensor] = []
        weakref.finalize(self, _release, self.stream, addresses, keep)
        try:
            with torch.cuda.device(self.device):  # (the runtime calls go to this GPU's context)
                for experts in weights:
                    experts.data, address = page_locked(experts.data)
                    addresses.append(address)
                    keep.append(experts.data)
        except PageLockError as e:
            warnings.warn(f"streamed experts stay in pageable memory, which makes each copy slower ({e})",
                          RuntimeWarning, stacklevel=3)

    def acquire(self, layer: int, gate_up: QuantExperts, down: QuantExperts) -> tuple[QuantExperts, QuantExperts]:
        slot = self._slot(layer)
        if slot is None:  # not prefetched (the first pass, or an earlier pass ended early)
            slot = (self.last + 1) % len(self.buffers)
            self._copy(layer, slot)
        following = self.order[(self.order.index(layer) + 1) % len(self.order)]
        if len(self.buffers) > 1 and self._slot(following) is None:
            self._copy(following, (slot + 1) % len(self.buffers))
        if self.ready[slot] is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready[slot])
        self.last = slot
        return self._view(slot, 0, gate_up), self._view(slot, slot_bytes(gate_up.data.nbytes, 0), down)

    def release(self, layer: int) -> None:
        slot = self._slot(layer)
        if self.stream is not None and slot is not None:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self.free[slot] = event

    def scratch(self, experts: QuantExperts) -> QuantExperts:
        """One streamed weight copied into the first slot, which then holds no layer: for the tuner to time its
        kernels on, at load (nothing else in flight)."""
        if self.stream is not None:
            self.stream.synchronize()
            torch.cuda.current_stream(self.device).synchronize()
        self.buffers[0][: experts.data.nbytes].copy_(experts.data.reshape(-1))
        self.held[0], self.ready[0], self.free[0] = None, None, None
        return self._view(0, 0, experts)

    def _slot(self, layer: int) -> int | None:
        return self.held.index(layer) if layer in self.held else None

    def _copy(self, layer: int, slot: int) -> None:
        gate_up, down = self.host[layer]
        start = slot_bytes(gate_up.nbytes, 0)
        buf = self.buffers[slot]
        if self.stream is None:
            buf[: gate_up.nbytes].copy_(gate_up.reshape(-1))
            buf[start : start + down.nbytes].copy_(down.reshape(-1))
        else:
            with torch.cuda.stream(self.stream):
                if self.free[slot] is not None:
                    self.stream.wait_event(self.free[slot])  # the layer that read this slot last has run
                buf[: gate_up.nbytes].copy_(gate_up.reshape(-1), non_blocking=True)
                buf[start : start + down.nbytes].copy_(down.reshape(-1), non_blocking=True)
                self.ready[slot] = torch.cuda.Event()
                self.ready[slot].record(self.stream)
        self.held[slot] = layer
        self.copies += 1

    def _view(self, slot: int, start: int, like: QuantExperts) -> QuantExperts:
        """The slot's bytes from `start` as a QuantExperts of like's shape and type, with its kernel choice."""
        data = self.buffers[slot][start : start + like.data.nbytes].view(like.data.shape)
        view = QuantExperts(data, like.qtype, like.n, like.k, like.k_in)
        view.matmul, view.bounded_input = like.matmul, like.bounded_input
        return view


class HostExperts(QuantExperts):
    """A streamed layer's gate_up experts (its `data` in host RAM), standing where the model looks for them
    (LayerWeights.gate_up_exps): grouped() runs the layer's experts from the slot ExpertStage copied them into.
    The layer's down experts (LayerWeights.down_exps) are a QuantExperts in host RAM, which only this reads."""

    def __init__(self, gate_up: QuantExperts, layer: int, stage: ExpertStage) -> None:
        super().__init__(gate_up.data, gate_up.qtype, gate_up.n, gate_up.k, gate_up.k_in)
        self.bounded_input, self.layer, self.stage = gate_up.bounded_input, layer, stage

    def grouped(self, x: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor,
                down: QuantExperts) -> torch.Tensor:
        staged_gate_up, staged_down = self.stage.acquire(self.layer, self, down)
        try:
            return staged_gate_up.grouped(x, rows, weights, counts, staged_down)  # [N, D]
        finally:  # (also after an error: the kernels it queued may still read the slot)
            self.stage.release(self.layer)


def stream_experts(layers: list[LayerWeights], host_layers: Sequence[int], device: torch.device | str) -> ExpertStage | None:
    """Make the experts of `host_layers` (their data already in host RAM) streamed ones: HostExperts in their
    layers' gate_up_exps, one ExpertStage for all (each weight's `stage`). None where there are none."""
    if not host_layers:
        return None
    stage = ExpertStage({i: (layers[i].gate_up_exps, layers[i].down_exps) for i in host_layers}, device)
    for i in host_layers:  # (their data page-locked by now)
        layers[i].gate_up_exps = HostExperts(layers[i].gate_up_exps, i, stage)
        layers[i].down_exps.stage = stage
    return stage

"""The KV cache the encoder fills and the decoder reads (model.DiffusionGemma), and what an engine keeps of it
between generations so that a prompt sharing a prefix with the last one encodes only the rest."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class KVCache:
    """Keys/values of the encoded positions, per layer: [B, KV, T, hd]. Global layers keep every position;
    sliding layers keep only the last sliding_window - 1, all that a later query can see. `dtype`: what
    they are stored in (None: the model's compute dtype; float16 halves the cache). `length` counts every
    encoded position (the next position's index). `reserve`: positions kept free after each layer's cached
    ones, where the decoder writes its canvas's keys and values instead of concatenating them to a copy of
    the cache on every pass (the engine reserves one canvas). `attend`: the dtype attention runs in, the
    encoder's and the decoder's (None: the cache's, so that a float16 cache is read as it is, on tensor
    cores; float32 over a float16 cache casts a copy of it every pass, the way before session 9, kept as
    bench/step_gpu.py's baseline). `until`: the position the encode under way reaches (encode sets it), so
    that a global layer's buffers are made long enough for every chunk at once (KVCache.extend). `spare`:
    sliding layers also keep that many positions from before their window aside (`tails`), so that rewind()
    can go back that far (a chat's next prompt often differs from the last in its final few tokens)."""

    keys: list[torch.Tensor | None] = field(default_factory=list)
    values: list[torch.Tensor | None] = field(default_factory=list)
    length: int = 0
    dtype: torch.dtype | None = None
    reserve: int = 0
    attend: torch.dtype | None = None
    # each layer's (keys, values) buffers [B, KV, T + reserve, hd] (a global layer's longer during an encode:
    # room for its chunks, extend()): keys[i] is buffers[i][0][:, :, :T]
    buffers: list[tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=list, repr=False)
    version: int = 0  # counts store()/extend() calls: what holds the buffers' addresses (a CUDA graph) checks it
    until: int = 0
    spare: int = 0
    keeps: dict[int, int | None] = field(default_factory=dict, repr=False)  # each stored layer's `keep` (store())
    # a sliding layer's positions right before its window, up to `spare` of them: [B, KV, <= spare, hd] twice
    tails: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    def attention_dtype(self, compute: torch.dtype) -> torch.dtype:
        """What attention over this cache runs in, for a model computing in `compute`."""
        return self.attend or self.dtype or compute

    def layer(self, i: int, dtype: torch.dtype | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Layer i's keys and values (None before the first encode), in `dtype` when given."""
        if i >= len(self.keys):
            return None, None
        k, v = self.keys[i], self.values[i]
        return (k, v) if dtype is None else (k.to(dtype), v.to(dtype))

    def store(self, i: int, keys: torch.Tensor, values: torch.Tensor, keep: int | None) -> None:
        """Layer i's keys and values after an encode, trimmed to their last `keep` positions (None: all)."""
        dtype = self.dtype or keys.dtype
        start = keys.shape[2] - keep if keep is not None and keys.shape[2] > keep else 0
        self.keeps[i] = keep
        if start and self.spare:  # what the window drops goes to the end of the tail, which keeps `spare`
            self._add_tail(i, keys[:, :, :start].to(dtype), values[:, :, :start].to(dtype))
        keys, values = keys[:, :, start:], values[:, :, start:]
        if self.reserve:  # copied into buffers with room for the canvas after them
            T = keys.shape[2]
            bufs = self._buffers(keys, values, T + self.reserve, dtype)
            keys, values = bufs[0][:, :, :T], bufs[1][:, :, :T]
        elif start:  # a copy, so that the dropped positions are freed
            keys, values = keys.to(dtype, copy=True), values.to(dtype, copy=True)
            bufs = None
        else:
            keys, values, bufs = keys.to(dtype), values.to(dtype), None
        self._put(i, keys, values, bufs)

    def _add_tail(self, i: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [B, KV, n, hd]: the positions layer i's window has just dropped, after those its tail holds."""
        old = self.tails.get(i)
        if old is not None and k.shape[2] < self.spare:
            k, v = torch.cat([old[0], k], dim=2), torch.cat([old[1], v], dim=2)
        # copies: a view would hold on to the whole concatenation it was cut from
        self.tails[i] = k[:, :, -self.spare :].clone(), v[:, :, -self.spare :].clone()

    def extend(self, i: int, k: torch.Tensor, v: torch.Tensor, keep: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's step: layer i's cached keys/values followed by a chunk's k, v [B, KV, L, hd], in the
        dtype attention runs in ([B, KV, P+L, hd]: what the chunk attends over), stored as the cache trimmed to
        its last `keep` positions (None: all). A layer that keeps every position (global) and attends in the
        dtype it stores writes the chunk after the cached positions in its buffers, made once per encode long
        enough for `until` and the reserve, instead of concatenating the chunk to the cache and copying the
        result into new buffers on every chunk. Otherwise (sliding layers: a chunk sees more than the window
        they keep) the concatenation is stored."""
        dtype = self.attention_dtype(k.dtype)
        past_k, past_v = self.layer(i)
        if past_k is not None and past_k.shape[0] != k.shape[0]:
            raise ValueError(f"KVCache.extend: a chunk of batch {k.shape[0]} over a cache of batch {past_k.shape[0]}")
        k, v = k.to(dtype), v.to(dtype)
        if keep is not None or dtype != (self.dtype or dtype):
            if past_k is None:
                k, v = k.contiguous(), v.contiguous()
            else:
                k, v = torch.cat([past_k.to(dtype), k], dim=2), torch.cat([past_v.to(dtype), v], dim=2)  # [B, KV, P+L, hd]
            self.store(i, k, v, keep)
            return k, v
        P, L = 0 if past_k is None else past_k.shape[2], k.shape[2]
        bufs = self._room(i, P, L + self.reserve, dtype)
        if bufs is None:  # long enough for the rest of this encode and the canvas after it
            size = max(P + L, self.until - self.length + P) + self.reserve
            bufs = self._buffers(k[:, :, :0] if past_k is None else past_k, v[:, :, :0] if past_v is None else past_v,
                                 size, dtype)
        keys, values = self._write(bufs, P, k, v)
        self._put(i, keys, values, bufs)
        return keys, values

    def _room(self, i: int, T: int, L: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Layer i's buffers if L more positions of `dtype` fit after its T cached ones, else None (the callers
        check the batch)."""
        bufs = self.buffers[i] if i < len(self.buffers) else None
        return bufs if bufs is not None and bufs[0].dtype == dtype and bufs[0].shape[2] >= T + L else None

    @staticmethod
    def _buffers(keys: torch.Tensor, values: torch.Tensor, size: int,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """New buffers [B, KV, size, hd] in `dtype` whose first T positions hold keys, values [B, KV, T, hd]."""
        B, KV, T, hd = keys.shape
        bufs = tuple(keys.new_empty((B, KV, size, hd), dtype=dtype) for _ in range(2))
        bufs[0][:, :, :T], bufs[1][:, :, :T] = keys, values
        return bufs

    @staticmethod
    def _write(bufs: tuple[torch.Tensor, torch.Tensor], T: int, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [B, KV, L, hd] written after the first T positions of bufs: views [B, KV, T+L, hd] of them."""
        L = k.shape[2]
        with torch.inference_mode():  # the buffers were made in it (encode), wherever the decoder runs
            bufs[0][:, :, T : T + L], bufs[1][:, :, T : T + L] = k, v
        return bufs[0][:, :, : T + L], bufs[1][:, :, : T + L]

    def _put(self, i: int, keys: torch.Tensor, values: torch.Tensor,
             bufs: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        self.version += 1
        if i < len(self.keys):
            self.keys[i], self.values[i], self.buffers[i] = keys, values, bufs
        else:
            self.keys.append(keys)
            self.values.append(values)
            self.buffers.append(bufs)

    def with_canvas(self, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's cached keys/values followed by the canvas's k, v [B, KV, L, hd], in the dtype attention
        runs in: [B, KV, T + L, hd]. Written into the reserved positions (views of the buffers, valid until
        the next call) where they fit, else concatenated to a copy of the cache. The cache itself (keys[i])
        is unchanged."""
        dtype = self.attention_dtype(k.dtype)
        past_k, past_v = self.layer(i, dtype)
        if past_k is None:
            return k.to(dtype), v.to(dtype)
        if past_k.shape[0] != k.shape[0]:
            raise ValueError(f"KVCache.with_canvas: a canvas of batch {k.shape[0]} over a cache of batch {past_k.shape[0]}")
        T = past_k.shape[2]
        bufs = self._room(i, T, k.shape[2], dtype)
        if bufs is None:
            return torch.cat([past_k, k.to(dtype)], dim=2), torch.cat([past_v, v.to(dtype)], dim=2)
        return self._write(bufs, T, k, v)

    @property
    def nbytes(self) -> int:
        """Bytes of the memory the cache holds: each layer's buffers (or what its keys and values are views of)
        and the tails, each storage once."""
        tensors = [t for bufs in self.buffers if bufs is not None for t in bufs]
        tensors += [t for kv in zip(self.keys, self.values) for t in kv if t is not None]
        tensors += [t for kv in self.tails.values() for t in kv]
        return sum({s.data_ptr(): s.nbytes() for s in (t.untyped_storage() for t in tensors)}.values())

    # ---- going back: the cache of an earlier prefix --------------------------------------------------------
    def _sliding(self) -> list[int]:
        return [i for i, keep in self.keeps.items() if keep is not None]

    def _known(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sliding layer i's every kept position, tail then window: [B, KV, n, hd] twice, ending at `length`."""
        tail = self.tails.get(i)
        if tail is None:
            return self.keys[i], self.values[i]
        return torch.cat([tail[0], self.keys[i]], dim=2), torch.cat([tail[1], self.values[i]], dim=2)

    def _reach(self, end: int, known: dict[int, int]) -> int:
        """The earliest position P the sliding layers' `known` positions (layer: how many, ending at `end`)
        give a whole window before: each must hold position P - keep on, or every position from 0."""
        lo = 0
        for i, n in known.items():
            if end - n > 0:
                lo = max(lo, end - n + self.keeps[i])
        return min(lo, end)

    def reach(self) -> int:
        """The earliest position rewind() can go back to."""
        tails = {i: t[0].shape[2] for i, t in self.tails.items()}
        return self._reach(self.length, {i: self.keys[i].shape[2] + tails.get(i, 0) for i in self._sliding()})

    def rewind(self, P: int) -> bool:
        """Forget positions P.. (0 <= P <= length), as if only the first P had been encoded: global layers keep
        views of their first P, sliding layers the window before P from their window and tail. False, with
        nothing changed, where P is before reach()."""
        if not 0 <= P <= self.length:
            raise ValueError(f"KVCache.rewind: position {P} outside 0..{self.length}")
        if P < self.reach():
            return False
        if P < self.length:
            self._truncate(P, self.length, self._sliding(), self._known)
        return True

    def checkpoint(self) -> KVCheckpoint:
        """The sliding layers' kept positions (tail and window) as they are now, copied to host memory, so that
        restore() can go back to about here after later encodes have moved their windows on (global layers
        keep every position anyway)."""
        return KVCheckpoint(self.length, {i: (k.to("cpu"), v.to("cpu")) for i in self._sliding()
                                          for k, v in [self._known(i)]})

    def restore(self, point: KVCheckpoint, P: int) -> bool:
        """Back to position P from a checkpoint() of this cache taken at point.end (P <= point.end <= length;
        the positions before point.end unchanged since): as rewind(P) where the checkpoint's windows reach P.
        False, with nothing changed, where they do not."""
        if not 0 <= P <= point.end <= self.length:
            raise ValueError(f"KVCache.restore: position {P} and a checkpoint at {point.end} outside 0..{self.length}")
        if P < self._reach(point.end, {i: k.shape[2] for i, (k, _) in point.layers.items()}):
            return False
        self._truncate(P, point.end, list(point.layers),
                       lambda i: tuple(t.to(self.keys[i].device) for t in point.layers[i]))
        return True

    def _truncate(self, P: int, end: int, sliding: list[int],
                  known: Callable[[int], tuple[torch.Tensor, torch.Tensor]]) -> None:
        """The cache of positions ..P-1: known(i) gives sliding layer i's known positions ending at `end`, fetched
        (copied) one layer at a time, so that no more than one layer's are made at once beside the cache."""
        for i in range(len(self.keys)):
            if i in sliding:
                k, v = known(i)
                cut = P - (end - k.shape[2])  # known positions before P
                self.tails.pop(i, None)  # store() makes the new tail of what the window leaves
                self.store(i, k[:, :, :cut], v[:, :, :cut], self.keeps[i])
                del k, v  # (before the next layer's are made)
            else:
                self._put(i, self.keys[i][:, :, :P], self.values[i][:, :, :P], self.buffers[i])
        self.length = self.until = P


@dataclass
class KVCheckpoint:
    """KVCache.checkpoint(): where the cache ended, and each sliding layer's kept keys and values then (host)."""

    end: int
    layers: dict[int, tuple[torch.Tensor, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for kv in self.layers.values() for t in kv)


class PromptCache:
    """What an engine keeps of its last generation for the next, one conversation at a time (as Ollama's and
    llama.cpp's servers keep a slot's): the KV cache, the tokens it holds, and a checkpoint of its sliding
    layers where that generation's prompt ended (taken before the first canvas is encoded after it). A chat's
    next prompt (the conversation so far, the reply, a new message) starts with most of those tokens; only
    the rest is encoded. The template may render the reply differently from how it was generated (Gemma 4's
    drops the empty thought channel of the generation prompt): the cache goes back to the longest common
    prefix, by rewind() where the sliding layers' tails reach, else from the checkpoint."""

    def __init__(self) -> None:
        self.cache: KVCache | None = None
        self.tokens: list[int] = []
        self.point: KVCheckpoint | None = None
        # the cache's bytes as put() last measured them, for /api/ps: read from another thread, which must not walk
        # the cache's lists while a generation changes them; kept while a generation has the cache (take())
        self.nbytes = 0

    def take(self, ids: list[int]) -> tuple[KVCache | None, int]:
        """The kept cache, gone back to hold ids[:n], and n; (None, 0) where nothing of it serves. Either way
        nothing is kept meanwhile (put() gives the cache back): a cache that does not serve is freed before the
        caller makes a new one."""
        cache, tokens, point = self.cache, self.tokens, self.point
        self.cache, self.tokens, self.point = None, [], None
        if cache is None:
            return None, 0
        P = next((n for n, (a, b) in enumerate(zip(tokens, ids)) if a != b), min(len(tokens), len(ids)))
        if cache.rewind(P):
            n = P
        elif point is not None and cache.restore(point, min(P, point.end)):
            n = min(P, point.end)
        else:
            self.nbytes = 0
            return None, 0
        if point is not None and point.end <= n:  # still the cache's past: a later take() may go back to it
            self.point = point
        return cache, n

    def mark(self, cache: KVCache) -> None:
        """Checkpoint the cache where the prompt ends, before an encode moves its sliding windows on."""
        if self.point is None or self.point.end != cache.length:
            self.point = None  # the old one's memory first
            self.point = cache.checkpoint()

    def put(self, cache: KVCache, tokens: list[int]) -> None:
        """Keep `cache`, which holds `tokens`, for the next take()."""
        if cache.length != len(tokens):
            raise ValueError(f"PromptCache.put: a cache of {cache.length} positions for {len(tokens)} tokens")
        self.cache, self.tokens, self.nbytes = cache, list(tokens), cache.nbytes

    def clear(self) -> None:
        self.cache, self.tokens, self.point, self.nbytes = None, [], None, 0

"""The KV cache the encoder fills and the decoder reads (model.DiffusionGemma), and what an engine keeps of it
between generations so that a prompt sharing a prefix with the last one encodes only the rest."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dgemma.quant.planner import GiB, KV_SPARE

from .hostmem import available_ram

DEFAULT_CACHE_RAM = 2 * GiB  # host memory for the KV caches of conversations put aside (PromptCache.limit)


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
    def _buffers(keys: torch.Tensor, values: torch.Tensor, size: int, dtype: torch.dtype,
                 device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """New buffers [B, KV, size, hd] in `dtype` on `device` (None: keys') whose first T positions hold keys,
        values [B, KV, T, hd] (copied straight from wherever they are)."""
        B, KV, T, hd = keys.shape
        bufs = tuple(keys.new_empty((B, KV, size, hd), dtype=dtype, device=device) for _ in range(2))
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

    @property
    def held_nbytes(self) -> int:
        """Bytes of the positions the cache holds (what moved() copies): keys, values and tails, no room after."""
        tensors = [t for kv in zip(self.keys, self.values) for t in kv if t is not None]
        return sum(t.nbytes for t in tensors + [t for kv in self.tails.values() for t in kv])

    def moved(self, device: torch.device | str, room: bool = True) -> KVCache:
        """A copy of this cache on `device`, also where it is there already. Each layer's positions, with `room`
        in buffers with the reserve after them as encode() leaves them; without, only its positions (a conversation
        put aside in host memory, PromptCache)."""
        out = KVCache(length=self.length, dtype=self.dtype, reserve=self.reserve, attend=self.attend,
                      until=self.length, spare=self.spare, keeps=dict(self.keeps))
        with torch.inference_mode():  # as encode() makes them: the decoder writes into the buffers in it
            for i, (k, v) in enumerate(zip(self.keys, self.values)):
                bufs = None
                if k is None:
                    pass
                elif self.reserve and room:  # copied straight into the buffers (no copy on `device` first)
                    T = k.shape[2]
                    bufs = self._buffers(k, v, T + self.reserve, k.dtype, device)
                    k, v = bufs[0][:, :, :T], bufs[1][:, :, :T]
                else:
                    k, v = k.to(device, copy=True), v.to(device, copy=True)
                out._put(i, k, v, bufs)
            out.tails = {i: (k.to(device, copy=True), v.to(device, copy=True)) for i, (k, v) in self.tails.items()}
        return out

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

    def restorable(self, point: KVCheckpoint) -> int:
        """The earliest position restore(point, P) can go back to."""
        return self._reach(point.end, {i: k.shape[2] for i, (k, _) in point.layers.items()})

    def restore(self, point: KVCheckpoint, P: int) -> bool:
        """Back to position P from a checkpoint() of this cache taken at point.end (P <= point.end <= length;
        the positions before point.end unchanged since): as rewind(P) where the checkpoint's windows reach P.
        False, with nothing changed, where they do not."""
        if not 0 <= P <= point.end <= self.length:
            raise ValueError(f"KVCache.restore: position {P} and a checkpoint at {point.end} outside 0..{self.length}")
        if P < self.restorable(point):
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


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many first tokens a and b share."""
    return next((n for n, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@dataclass(eq=False)  # (compared as objects: the fields hold tensors)
class KeptPrompt:
    """One conversation's kept cache: the KV cache, the tokens it holds, how many of them were the prompt of the
    generation that left it, and its checkpoint where that prompt ended (None: none, or no longer its past)."""

    cache: KVCache
    tokens: list[int]
    prompt: int
    point: KVCheckpoint | None

    def serves(self, ids: list[int]) -> int:
        """How many of ids' first tokens the cache can go back to: their common prefix where rewind() reaches it,
        else as far back as the checkpoint's end where restore() reaches that; 0 where neither does."""
        P = common_prefix(self.tokens, ids)
        if P >= self.cache.reach():
            return P
        if self.point is not None and min(P, self.point.end) >= self.cache.restorable(self.point):
            return min(P, self.point.end)
        return 0

    def back_to(self, n: int) -> None:
        """The cache gone back to hold tokens[:n] (n from serves()); the checkpoint dropped where n is before it."""
        if not self.cache.rewind(n) and not (self.point is not None and self.cache.restore(self.point, n)):
            raise ValueError(f"KeptPrompt.back_to: position {n} is out of reach")
        self.tokens = self.tokens[:n]
        self.prompt = min(self.prompt, n)
        if self.point is not None and self.point.end > n:
            self.point = None

    @property
    def nbytes(self) -> int:
        """Its positions' bytes and its checkpoint's (a copy's memory: no room after them; a live cache's copy's)."""
        return self.cache.held_nbytes + (0 if self.point is None else self.point.nbytes)


class PromptCache:
    """What an engine keeps of its generations for the next: the last one's KV cache on the engine's device (as
    Ollama's and llama.cpp's servers keep a slot's), the tokens it holds, and a checkpoint of its sliding layers
    where that generation's prompt ended (taken before the first canvas is encoded after it); and, in host
    memory up to `limit` bytes, copies of the caches of other conversations it was used for before (as
    llama.cpp's server's --cache-ram), the least recently used going first. A chat's next prompt (the
    conversation so far, the reply, a new message) starts with most of the tokens of one of them; only the rest
    is encoded. The template may render the reply differently from how it was generated (Gemma 4's drops the
    empty thought channel of the generation prompt): the cache goes back to the longest common prefix, by
    rewind() where the sliding layers' tails reach, else from the checkpoint. A frontend's requests between a
    chat's turns (Open WebUI's title, tags and follow-up prompts, another user's chat) would otherwise leave the
    conversation to be encoded whole again at its next turn."""

    def __init__(self, limit: int = DEFAULT_CACHE_RAM) -> None:
        self.cache: KVCache | None = None
        self.tokens: list[int] = []
        self.prompt = 0  # how many of tokens the prompt of the generation that left the cache had
        self.point: KVCheckpoint | None = None
        # the cache's bytes as put() last measured them, for /api/ps: read from another thread, which must not walk
        # the cache's lists while a generation changes them; kept while a generation has the cache (take())
        self.nbytes = 0
        self.limit = limit  # host bytes for the copies of other conversations' caches (0: none kept)
        self.saved: list[KeptPrompt] = []  # those copies, the least recently used first
        self.saved_nbytes = 0  # their bytes

    def take(self, ids: list[int], device: torch.device | str = "cpu") -> tuple[KVCache | None, int]:
        """The cache, on `device`, of the kept conversation that serves the most of ids' first tokens, gone back to
        hold ids[:n], and n; (None, 0) where none serves. The live one serves unless a copy serves more than
        KV_SPARE tokens more: then it is put aside (copied to host memory, its device memory freed) before the copy
        comes back to the device. A cache that serves but would be cut back more than KV_SPARE positions into its
        last prompt (another conversation sharing a system prompt, an edited earlier message) stays as it is for
        its own conversation: the live one is put aside first, a copy is copied back and stays saved. Where
        nothing serves, the live one is put aside and the caller makes a new one. Either way nothing live is kept
        meanwhile (put() gives the cache back)."""
        live = None
        if self.cache is not None:
            live = KeptPrompt(self.cache, self.tokens, self.prompt, self.point)
        self.cache, self.tokens, self.prompt, self.point = None, [], 0, None
        n_live = live.serves(ids) if live is not None else 0
        serve = [entry.serves(ids) for entry in self.saved]
        best = max(range(len(serve)), key=lambda j: (serve[j], j), default=None)  # the most recent of equals
        if best is not None and serve[best] - n_live > KV_SPARE:
            saved, n = self.saved[best], serve[best]
            self._drop_saved([saved])  # (out of the list meanwhile: putting the live one aside must not drop it)
            try:
                if live is not None:
                    self._put_aside(live)
                    live = None  # (its device memory, before the copy comes back)
                chosen = KeptPrompt(saved.cache.moved(device), saved.tokens, saved.prompt, saved.point)
            except BaseException:
                self._keep(saved)
                raise
            if saved.prompt - n > KV_SPARE:  # its own conversation may come back: the copy stays
                self._keep(saved)
        elif n_live:
            chosen, n = live, n_live
            if live.prompt - n > KV_SPARE:
                self._put_aside(live)
        else:
            if live is not None:
                self._put_aside(live)
            self.nbytes = 0
            return None, 0
        chosen.back_to(n)
        self.point = chosen.point  # still the cache's past: a later take() may go back to it
        return chosen.cache, n

    def _put_aside(self, entry: KeptPrompt) -> None:
        """A copy of entry's cache in host memory, among the saved ones (the least recently used dropped past
        `limit`); none where it alone is over the limit, where host RAM (without swap) has less than twice its
        size free, or where the copy cannot be allocated (a best effort: the request goes on without it)."""
        size = entry.nbytes
        if size > self.limit or size * 2 > (available_ram(swap=False) or size * 2):
            return
        try:
            cache = entry.cache.moved("cpu", room=False)
        except RuntimeError as e:  # (torch's host allocator: "DefaultCPUAllocator: can't allocate memory ...")
            if "allocat" not in str(e):
                raise
            return
        self._drop_saved([e for e in self.saved if e.tokens == entry.tokens])  # the same conversation, older
        self._keep(KeptPrompt(cache, list(entry.tokens), entry.prompt, entry.point))

    def _keep(self, copy: KeptPrompt) -> None:
        """copy (in host memory) saved as the most recently used; the least recently used go past the limit."""
        self.saved.append(copy)
        self.saved_nbytes += copy.nbytes
        while self.saved_nbytes > self.limit:
            self._drop_saved(self.saved[:1])

    def _drop_saved(self, entries: list[KeptPrompt]) -> None:
        for entry in entries:
            self.saved.remove(entry)  # (by identity: KeptPrompt compares as an object)
            self.saved_nbytes -= entry.nbytes

    def mark(self, cache: KVCache) -> None:
        """Checkpoint the cache where the prompt ends, before an encode moves its sliding windows on."""
        if self.point is None or self.point.end != cache.length:
            self.point = None  # the old one's memory first
            self.point = cache.checkpoint()

    def put(self, cache: KVCache, tokens: list[int], prompt: int | None = None) -> None:
        """Keep `cache`, which holds `tokens` (the first `prompt` of them the generation's prompt; None: all), for
        the next take()."""
        if cache.length != len(tokens):
            raise ValueError(f"PromptCache.put: a cache of {cache.length} positions for {len(tokens)} tokens")
        self.cache, self.tokens, self.nbytes = cache, list(tokens), cache.nbytes
        self.prompt = len(tokens) if prompt is None else prompt

    def drop(self) -> None:
        """Forget the live cache (the copies in host memory stay)."""
        self.cache, self.tokens, self.prompt, self.point, self.nbytes = None, [], 0, None, 0

    def clear(self) -> None:
        """Forget everything: the live cache and the copies."""
        self.drop()
        self._drop_saved(list(self.saved))

    def holds(self, device_type: str, live_on: str) -> bool:
        """Whether anything kept is in memory of `device_type` ("cuda" or "cpu"; the live cache is on `live_on`,
        the copies on "cpu")."""
        return (self.cache is not None and live_on == device_type) or (device_type == "cpu" and bool(self.saved))

    def free(self, device_type: str, live_on: str) -> None:
        """Forget what is kept in memory of `device_type` (as holds())."""
        if live_on == device_type:
            self.drop()
        if device_type == "cpu":
            self._drop_saved(list(self.saved))

"""The KV cache kept between generations (plugin/kv_cache.py): KVCache.rewind / checkpoint / restore against a
cache that only ever saw the shorter prefix, and the engine's PromptCache: a chat's next turn encodes only what
is new, and generates what it would from scratch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SPECS, THOUGHT_CHANNEL_TOKENS, spy_encoder_passes

from dgemma.convert import convert
from dgemma.plugin.engine import DoneEvent, Engine, EngineError, GenerateOptions
from dgemma.plugin.kv_cache import DEFAULT_CACHE_RAM, KeptPrompt, KVCache, PromptCache

KEEP, SPARE = 5, 3  # a sliding layer's window (sliding_window - 1) and the positions kept before it


def positions(n: int, start: int = 0, dtype=torch.float32) -> torch.Tensor:
    """Keys whose values say their position: [1, 2, n, 4], position p filled with p (V: -p)."""
    return torch.arange(start, start + n, dtype=dtype)[None, None, :, None].expand(1, 2, n, 4).clone()


def encoded(chunks: list[int], **kw) -> KVCache:
    """A cache of layer 0 sliding (KEEP) and layer 1 global, extended chunk by chunk."""
    cache = KVCache(spare=SPARE, **kw)
    for n in chunks:
        cache.until = cache.length + n
        for i, keep in ((0, KEEP), (1, None)):
            k = positions(n, cache.length)
            cache.extend(i, k, -k, keep)
        cache.length += n
    return cache


def held(cache: KVCache, i: int) -> list[int]:
    """The positions layer i holds, checked against its values."""
    k, v = cache.keys[i], cache.values[i]
    assert torch.equal(v, -k) and k.shape[:2] == (1, 2)
    return k[0, 0, :, 0].long().tolist()


def tail(cache: KVCache, i: int) -> list[int]:
    t = cache.tails.get(i)
    return [] if t is None else t[0][0, 0, :, 0].long().tolist()


@pytest.mark.parametrize("reserve", [0, 2])
@pytest.mark.parametrize("dtype", [None, torch.float16])
@pytest.mark.parametrize("chunks", [[4], [4, 1, 6], [12, 3], [2, 9, 1, 1]])
def test_rewind_gives_the_cache_of_the_shorter_prefix(chunks, dtype, reserve):
    """After encoding sum(chunks) positions, rewind(P) succeeds exactly from reach() on: where the sliding layer's
    window and tail (SPARE) still hold the KEEP positions before P, or every position from 0; it then holds
    what a cache that only saw positions ..P-1 holds (its tail a suffix of that one's), the global layer its
    first P, and both go on alike when the same positions are encoded after. Where it fails nothing changed."""
    total = sum(chunks)
    for P in range(total + 1):
        cache = encoded(chunks, dtype=dtype, reserve=reserve)
        before = (held(cache, 0), tail(cache, 0), cache.version)
        expect_reach = 0 if total <= KEEP + SPARE else total - SPARE
        assert cache.reach() == expect_reach
        if not cache.rewind(P):
            assert P < expect_reach and (held(cache, 0), tail(cache, 0), cache.version) == before
            continue
        assert P >= expect_reach
        fresh = encoded([P] if P else [], dtype=dtype, reserve=reserve)
        assert cache.length == P and held(cache, 0) == list(range(max(0, P - KEEP), P)) and held(cache, 1) == list(range(P))
        assert cache.keys[0].dtype == cache.tails.get(0, cache.keys)[0].dtype == (dtype or torch.float32)
        if P:
            assert (held(fresh, 0), held(fresh, 1)) == (held(cache, 0), held(cache, 1))
            assert tail(fresh, 0)[len(tail(fresh, 0)) - len(tail(cache, 0)) :] == tail(cache, 0)
        if reserve and P:  # the decoder's room is still after each layer's positions
            assert all(cache.buffers[i][0].shape[2] >= cache.keys[i].shape[2] + reserve for i in (0, 1))
        for c in (cache, fresh):  # and the next encode goes on from P
            for i, keep in ((0, KEEP), (1, None)):
                k = positions(3, P)
                c.extend(i, k, -k, keep)
            c.length += 3
        assert held(cache, 0) == held(fresh, 0) == list(range(max(0, P + 3 - KEEP), P + 3))
        assert held(cache, 1) == held(fresh, 1) == list(range(P + 3))


def test_nbytes_counts_each_storage_once():
    """KVCache.nbytes: the buffers with their reserve, the tails, and after a rewind the global layer's whole
    buffers still (its keys are views of them), each once."""
    cache = encoded([12, 3], reserve=2)
    per_position = 2 * 4 * 4  # [1, 2, n, 4] float32
    window, tail, glob = (KEEP + 2) * per_position, SPARE * per_position, (15 + 2) * per_position
    assert cache.nbytes == 2 * (window + tail + glob)
    assert cache.rewind(13) and cache.nbytes == 2 * (window + tail - 2 * per_position + glob)
    assert KVCache().nbytes == 0


@pytest.mark.parametrize("room", [True, False])
def test_moved_copies_the_positions(room):
    """KVCache.moved: a copy (no storage shared), each layer's positions and the tails equal; with room in buffers
    with the reserve after them again, without only the positions (nbytes == held_nbytes); it goes on as the
    original does, and goes back as far."""
    cache = encoded([12, 3], reserve=2)
    copy = cache.moved("cpu", room=room)
    assert (copy.length, copy.until, copy.keeps, copy.spare, copy.reserve) == (15, 15, cache.keeps, SPARE, 2)
    mine = {t.untyped_storage().data_ptr() for t in cache.keys + cache.values}
    assert not mine & {t.untyped_storage().data_ptr() for t in copy.keys + copy.values}
    assert all(held(copy, i) == held(cache, i) for i in (0, 1)) and tail(copy, 0) == tail(cache, 0)
    assert copy.tails[0][0].untyped_storage().data_ptr() != cache.tails[0][0].untyped_storage().data_ptr()
    if room:
        assert all(copy.buffers[i][0].shape[2] == copy.keys[i].shape[2] + 2 for i in (0, 1))
    else:
        assert copy.buffers == [None, None] and copy.nbytes == copy.held_nbytes < cache.nbytes
    assert copy.reach() == cache.reach() and copy.rewind(12) and held(copy, 1) == list(range(12))
    for c in (cache, copy):
        for i, keep in ((0, KEEP), (1, None)):
            k = positions(3, c.length)
            c.extend(i, k, -k, keep)
        c.length += 3
    assert held(copy, 0) == list(range(15 - KEEP, 15)) and held(copy, 1) == list(range(15))


def test_rewind_refuses_positions_past_the_end():
    cache = encoded([4])
    with pytest.raises(ValueError, match="position 5 outside 0..4"):
        cache.rewind(5)


@pytest.mark.parametrize("prompt", [3, 6, 11])
def test_restore_from_a_checkpoint(prompt):
    """checkpoint() at the prompt's end, then two canvases encoded (the sliding window has moved past the prompt,
    so rewind() cannot go back there): restore() goes back to any position from the checkpoint's reach to its
    end, as if only that prefix had been encoded; the checkpoint itself is in host memory and unchanged."""
    base = encoded([prompt])
    point = base.checkpoint()
    assert point.end == prompt and all(k.device.type == "cpu" for k, _ in point.layers.values())
    assert point.nbytes == sum(t.nbytes for kv in point.layers.values() for t in kv) > 0
    reach = 0 if prompt <= KEEP + SPARE else prompt - SPARE
    for P in range(prompt + 1):
        cache = encoded([prompt])
        point = cache.checkpoint()
        for n in (8, 8):
            cache.until = cache.length + n
            for i, keep in ((0, KEEP), (1, None)):
                k = positions(n, cache.length)
                cache.extend(i, k, -k, keep)
            cache.length += n
        assert not cache.rewind(P)
        ok = cache.restore(point, P)
        assert ok == (P >= reach)
        if ok:
            assert cache.length == P and held(cache, 0) == list(range(max(0, P - KEEP), P)) and held(cache, 1) == list(range(P))
        else:
            assert cache.length == prompt + 16
    with pytest.raises(ValueError, match="checkpoint at 11"):
        encoded([4]).restore(encoded([11]).checkpoint(), 2)


# ---- PromptCache's choice among the live cache and the copies, on caches of one global layer (every position) --

def global_only(n: int) -> KVCache:
    cache = KVCache(reserve=2)
    cache.until = n
    k = positions(n)
    cache.extend(0, k, -k, None)
    cache.length = n
    return cache


def kept_with(convs: list[list[int]]) -> PromptCache:
    """A PromptCache whose copies hold convs[:-1] (oldest first) and whose live cache holds convs[-1] (each the
    prompt of its last generation); the conversations share no first token."""
    kept = PromptCache()
    for tokens in convs:
        assert kept.take(tokens) == (None, 0)  # (puts the live one aside)
        kept.put(global_only(len(tokens)), tokens)
    assert [e.tokens for e in kept.saved] == convs[:-1] and kept.tokens == convs[-1]
    return kept


X, L = [1] + list(range(100, 199)), [2] + list(range(300, 399))  # 100 tokens each


def test_a_copy_that_serves_only_the_start_of_its_conversation_stays_saved():
    """A prompt sharing only X's first 3 tokens (a template's opening: no more than KV_SPARE) does not take X's
    copy: nothing serves it (L, live, is put aside). One sharing X's first 40 tokens (a system prompt, an earlier
    message) is served by X's copy: a copy of it comes back gone back to 40, and X's copy stays saved (now the most
    recently used) for X's own next turn, which then takes all 100 from it (and X's copy, needed no more, goes)."""
    kept = kept_with([X, L])
    assert kept.take(X[:3] + [9] * 50) == (None, 0)
    assert [e.tokens for e in kept.saved] == [X, L]
    cache, n = kept.take(X[:40] + [7] * 10)
    assert n == 40 and held(cache, 0) == list(range(40)) and cache.buffers[0][0].shape[2] == 100 + 2  # (the room)
    assert [e.tokens for e in kept.saved] == [L, X] and kept.saved_nbytes == sum(e.nbytes for e in kept.saved)
    kept.put(cache, X[:40])
    cache, n = kept.take(X)
    assert n == 100 and held(cache, 0) == list(range(100)) and [e.tokens for e in kept.saved] == [L, X[:40]]
    assert kept.saved_nbytes == sum(e.nbytes for e in kept.saved)


def test_putting_aside_a_conversation_already_saved_replaces_its_copy():
    """The older copy of the same tokens goes, wherever it is in the list (a KeptPrompt compares as an object,
    not by its tensors)."""
    B = [3] + list(range(500, 520))
    kept = kept_with([X, B, L])
    kept._put_aside(KeptPrompt(global_only(len(B)), B, len(B), None))
    assert [e.tokens for e in kept.saved] == [X, B] and kept.saved_nbytes == sum(e.nbytes for e in kept.saved)


def test_a_copy_that_cannot_come_back_stays_saved(monkeypatch):
    """Out of GPU memory while X's copy comes back: the error goes to the caller (the engine's one-line error),
    X's copy stays saved, and L, put aside first, is saved too."""
    kept = kept_with([X, L])
    moved = KVCache.moved

    def short(self, device, room=True):
        if room:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return moved(self, device, room)

    monkeypatch.setattr(KVCache, "moved", short)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        kept.take(X + [5])
    assert [e.tokens for e in kept.saved] == [L, X] and kept.cache is None


@pytest.mark.parametrize("why", ["ram", "alloc", "limit"])
def test_no_copy_where_host_memory_is_short(monkeypatch, why):
    """No copy where host RAM without swap has less than twice its size free, where allocating it fails (the
    request goes on: a best effort), or where it alone is over the limit; another error is raised."""
    import dgemma.plugin.kv_cache as kv

    kept = kept_with([X])
    size = kept.cache.held_nbytes
    asked = []
    monkeypatch.setattr(kv, "available_ram", lambda swap=True: asked.append(swap) or 2 * size - (why == "ram"))
    if why == "alloc":
        def fail(self, device, room=True):
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
        monkeypatch.setattr(KVCache, "moved", fail)
    kept.limit = size - 1 if why == "limit" else size
    assert kept.take(L) == (None, 0) and kept.saved == [] and kept.saved_nbytes == 0
    assert asked == ([] if why == "limit" else [False])
    kept.put(global_only(len(X)), X)
    monkeypatch.setattr(KVCache, "moved", lambda self, device, room=True: 1 / 0)
    kept.limit = size
    if why != "ram":
        with pytest.raises(ZeroDivisionError):
            kept.take(L)


def test_cache_ram_sizes():
    """--cache-ram: a size, or a bare number in MiB as llama.cpp's option (0: none, -1: no limit)."""
    import argparse

    from dgemma.plugin.cli import cache_ram_arg

    assert cache_ram_arg("8192") == 8 << 30 and cache_ram_arg("2GiB") == 2 << 30 and cache_ram_arg("512MiB") == 512 << 20
    assert cache_ram_arg("0") == 0 and cache_ram_arg("-1") == sys.maxsize
    with pytest.raises(argparse.ArgumentTypeError, match="size '3x' is not understood"):
        cache_ram_arg("3x")


# ---- the engine keeps its last generation's cache ----------------------------------------------------------

@pytest.fixture(scope="module")
def odd(tmp_path_factory, checkpoint_factory) -> Engine:
    """The "odd" test model in F32: sliding window 8 (KEEP 7), canvas 16."""
    path = tmp_path_factory.mktemp("prompt-cache") / "odd.gguf"
    convert(checkpoint_factory(SPECS["odd"]), path, "F32", quiet=True)
    return Engine.load(path)


def generate(engine: Engine, ids: list[int], seed: int, **kw) -> tuple[DoneEvent, list[int]]:
    """The final event and the token count of each encoder pass."""
    passes = spy_encoder_passes(engine)
    try:
        done = list(engine.generate(ids, GenerateOptions(seed=seed, eos_ids=set(), steps=4, **kw)))[-1]
    finally:
        del engine.model.layer
    assert isinstance(done, DoneEvent)
    return done, passes


def kept_keys(engine: Engine) -> list[torch.Tensor]:
    cache = engine.prompt_cache.cache
    return [t.clone() for t in cache.keys + cache.values]


@pytest.mark.parametrize("canvases", [1, 3])  # one: the cache ends at the prompt; three: two canvases after it
@pytest.mark.parametrize("change,cached", [
    ("extend", 29),  # the next prompt starts with the whole last one: nothing to go back over
    ("drop2", 27),  # its last two tokens differ (Gemma 4's template drops the empty thought channel)
    ("same", 29),  # the same prompt again (regenerate): nothing to encode
    ("other", 0),  # another conversation from its first token on
    ("early", 0),  # the same first 5 tokens only: the sliding windows do not reach back there
])
def test_next_prompt_encodes_only_what_is_new(odd, canvases, change, cached):
    """A generation keeps its KV cache; the next prompt takes the longest prefix the cache can go back to (the
    sliding layers' tails reach KV_SPARE positions back from the end, the checkpoint at the last prompt's end as
    far back from there), encodes the rest in one pass, reports the cached count, and generates the tokens a
    generation from scratch gives, its cache (kept again) within 1e-5 of that one's."""
    g = torch.Generator().manual_seed(canvases)
    vocab = odd.cfg.vocab_size
    first = [2] + torch.randint(3, vocab, (28,), generator=g).tolist()  # longer than the window and KV_SPARE
    new = torch.randint(3, vocab, (7,), generator=g).tolist()
    nxt = {"extend": first + new, "drop2": first[:-2] + new, "same": first, "other": [2, *new, *first[1:]],
           "early": first[:5] + new}[change]
    C = odd.cfg.canvas_length
    odd.prompt_cache.clear()
    done1, passes1 = generate(odd, first, 1, max_tokens=canvases * C)
    assert passes1 == [29] + [C] * (canvases - 1) and done1.prompt_cached_count == 0
    held = 29 + (canvases - 1) * C
    assert odd.prompt_cache.cache.length == len(odd.prompt_cache.tokens) == held
    assert (odd.prompt_cache.point is not None) == (canvases > 1)  # checkpointed before the first canvas's encode

    done2, passes2 = generate(odd, nxt, 2, max_tokens=C)
    assert done2.prompt_cached_count == cached and done2.prompt_eval_count == len(nxt)
    assert passes2 == ([len(nxt) - cached] if cached < len(nxt) else [])
    reused = kept_keys(odd)
    assert odd.prompt_cache.tokens == nxt

    scratch, passes3 = generate(odd, nxt, 2, max_tokens=C, cache_prompt=False)
    assert passes3 == [len(nxt)] and scratch.prompt_cached_count == 0 and odd.prompt_cache.cache is None
    assert done2.token_ids == scratch.token_ids and done2.canvases == scratch.canvases
    odd.prompt_cache.clear()
    generate(odd, nxt, 2, max_tokens=C)
    fresh = kept_keys(odd)
    assert len(fresh) == len(reused) and all(a.shape == b.shape and (a - b).abs().max() < 1e-5 for a, b in zip(fresh, reused))


def test_a_checkpoint_is_dropped_once_the_positions_before_it_change(odd):
    """Three turns: a generation of three canvases (checkpoint at its prompt's end, 29); a prompt that leaves it at
    19, restored from the checkpoint, whose next 40 tokens differ from those the checkpoint saw; then one that
    leaves that at 24. The checkpoint no longer holds the third prompt's positions 19..23 (a cache restored from
    it would attend over the first prompt's), and the live cache's windows do not reach back to 24: all of it is
    encoded, as from scratch."""
    g = torch.Generator().manual_seed(7)
    vocab, C = odd.cfg.vocab_size, odd.cfg.canvas_length
    first = [2] + torch.randint(3, vocab, (28,), generator=g).tolist()
    second = first[:19] + torch.randint(3, vocab, (40,), generator=g).tolist()
    third = second[:24] + torch.randint(3, vocab, (7,), generator=g).tolist()
    odd.prompt_cache.clear()
    generate(odd, first, 1, max_tokens=3 * C)
    assert odd.prompt_cache.point.end == 29
    done, _ = generate(odd, second, 2, max_tokens=C)
    assert done.prompt_cached_count == 19 and odd.prompt_cache.point is None
    done, passes = generate(odd, third, 3, max_tokens=C)
    assert done.prompt_cached_count == 0 and passes == [len(third)]
    assert done.token_ids == generate(odd, third, 3, max_tokens=C, cache_prompt=False)[0].token_ids


def test_a_generation_closed_early_keeps_what_its_cache_holds(odd):
    """A client gone after the first canvas (the generator closed at its first event): the cache holds the prompt
    (the canvas was not encoded yet) and the next turn takes all of it."""
    g = torch.Generator().manual_seed(8)
    first = [2] + torch.randint(3, odd.cfg.vocab_size, (20,), generator=g).tolist()
    odd.prompt_cache.clear()
    events = odd.generate(first, GenerateOptions(seed=1, max_tokens=4 * odd.cfg.canvas_length, eos_ids=set()))
    next(events)
    events.close()
    assert odd.prompt_cache.tokens == first and odd.prompt_cache.cache.length == 21
    done, passes = generate(odd, first + [5, 6, 7], 2, max_tokens=16)
    assert done.prompt_cached_count == 21 and passes == [3]


@pytest.mark.parametrize("where", ["restore", "denoise"])
def test_out_of_memory_keeps_nothing(odd, monkeypatch, where):
    """CUDA's out-of-memory error while the kept cache goes back (restore copies the checkpoint to the GPU) or
    while a canvas is denoised: the one-line EngineError, and no cache kept for the next turn."""
    g = torch.Generator().manual_seed(9)
    first = [2] + torch.randint(3, odd.cfg.vocab_size, (28,), generator=g).tolist()
    odd.prompt_cache.clear()
    generate(odd, first, 1, max_tokens=3 * odd.cfg.canvas_length)

    def short(*a, **kw):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB\nmore")

    opts = GenerateOptions(seed=2, max_tokens=16, eos_ids=set())
    if where == "restore":
        monkeypatch.setattr(KVCache, "restore", short)
    else:
        opts.on_step = short
    with pytest.raises(EngineError, match="^the GPU ran out of memory with [0-9]+ positions in the KV cache"):
        list(odd.generate(first[:-2] + [5, 6], opts))
    assert odd.prompt_cache.cache is None and odd.prompt_cache.point is None


def conversation(seed: int, n: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [2] + torch.randint(3, vocab, (n - 1,), generator=g).tolist()


def test_a_conversation_put_aside_comes_back(odd):
    """Two conversations in turns, as a frontend's background requests (a title, tags) come between a chat's turns:
    A (three canvases: its windows move past its prompt), then B, which no kept cache serves (A's goes to host
    memory, compact: only its positions), then A's next turn, which takes 27 positions from A's copy (B's cache
    going aside in its place) and generates what a generation from scratch does; then B regenerated from B's
    copy, back in buffers with the canvas's room. The copies' bytes are counted."""
    vocab, C = odd.cfg.vocab_size, odd.cfg.canvas_length
    a, b = conversation(11, 29, vocab), conversation(12, 29, vocab)
    new = conversation(13, 8, vocab)[1:]
    kept = odd.prompt_cache
    kept.clear()
    generate(odd, a, 1, max_tokens=3 * C)
    done, passes = generate(odd, b, 2, max_tokens=C)
    assert done.prompt_cached_count == 0 and passes == [29]
    assert len(kept.saved) == 1 and kept.saved[0].tokens[:29] == a and kept.saved[0].prompt == 29
    copy = kept.saved[0].cache
    assert copy.length == 29 + 2 * C and all(bufs is None for bufs in copy.buffers)
    assert all(t.device.type == "cpu" for t in copy.keys + copy.values) and copy.nbytes == copy.held_nbytes
    assert kept.saved_nbytes == sum(e.nbytes for e in kept.saved) > 0

    done, passes = generate(odd, a[:-2] + new, 3, max_tokens=C)  # restored from the copy's checkpoint
    assert done.prompt_cached_count == 27 and passes == [len(new)]
    assert [e.tokens[:29] for e in kept.saved] == [b] and kept.saved_nbytes == kept.saved[0].nbytes
    scratch = generate(odd, a[:-2] + new, 3, max_tokens=C, cache_prompt=False)[0]
    assert done.token_ids == scratch.token_ids and done.canvases == scratch.canvases
    assert [e.tokens[:29] for e in kept.saved] == [b]  # cache_prompt False drops the live cache, not the copies

    done, passes = generate(odd, b, 4, max_tokens=C)  # (regenerate: nothing to encode)
    assert done.prompt_cached_count == 29 and passes == []
    assert all(bufs is not None for bufs in kept.cache.buffers)  # the copy came back with the canvas's room
    assert done.token_ids == generate(odd, b, 4, max_tokens=C, cache_prompt=False)[0].token_ids
    kept.clear()
    assert kept.saved == [] and kept.saved_nbytes == 0 and kept.cache is None


def test_a_branch_cut_from_the_live_cache_is_put_aside_first(odd):
    """A prompt sharing only the first 4 of the last prompt's 22 tokens (an edited early message): the live cache
    serves those 4, but before it goes back a copy of it is put aside (it loses more than KV_SPARE positions of
    its prompt), so that the old branch, asked for again, is served whole. A next turn that loses only a few
    (the chat's usual) puts nothing aside."""
    vocab, C = odd.cfg.vocab_size, odd.cfg.canvas_length
    a = conversation(21, 22, vocab)
    edited = a[:4] + conversation(22, 12, vocab)[1:]
    kept = odd.prompt_cache
    kept.clear()
    generate(odd, a, 1, max_tokens=C)
    done, passes = generate(odd, edited, 2, max_tokens=C)
    assert done.prompt_cached_count == 4 and passes == [len(edited) - 4]
    assert [e.tokens for e in kept.saved] == [a]
    done, passes = generate(odd, a, 3, max_tokens=C)
    assert done.prompt_cached_count == 22 and passes == []
    assert done.token_ids == generate(odd, a, 3, max_tokens=C, cache_prompt=False)[0].token_ids
    kept.clear()
    generate(odd, a, 1, max_tokens=C)
    generate(odd, a[:-3] + [5, 6], 2, max_tokens=C)
    assert kept.saved == []


@pytest.mark.parametrize("copies", [0, 1])
def test_the_copies_stay_within_the_limit(odd, copies):
    """PromptCache.limit: 0 keeps no copy (a conversation put aside is gone, as before copies were kept); room for
    one keeps the most recently put aside (A, B, C in turns: A's copy goes when B's comes; B comes back from its
    copy, A from nothing)."""
    vocab, C = odd.cfg.vocab_size, odd.cfg.canvas_length
    a, b, c = (conversation(s, 29, vocab) for s in (31, 32, 33))  # longer than the windows reach back: none serves another
    kept = odd.prompt_cache
    kept.clear()
    generate(odd, a, 1, max_tokens=C)
    one = odd.prompt_cache.cache.held_nbytes
    kept.limit = copies * one
    try:
        generate(odd, b, 2, max_tokens=C)
        generate(odd, c, 3, max_tokens=C)
        assert [e.tokens for e in kept.saved] == [b][:copies] and kept.saved_nbytes <= kept.limit
        assert generate(odd, b, 4, max_tokens=C)[0].prompt_cached_count == 29 * copies
        assert generate(odd, a, 5, max_tokens=C)[0].prompt_cached_count == 0
    finally:
        kept.limit = DEFAULT_CACHE_RAM
        kept.clear()


def test_a_chat_turn_reuses_the_conversation_so_far(default_gguf):
    """Through the chat template, as a frontend sends a conversation (the default model: canvas 1, so each reply
    token after the first was encoded; its template renders the reply without the empty thought channel the
    generation prompt ends with): the second turn takes all but the last few tokens of the first turn's prompt
    from the cache (its sliding layers, the prompt being shorter than their window, hold every position), and
    replies as it would from scratch."""
    engine = Engine.load(default_gguf)
    chat = [{"role": "user", "content": "Tell me a fortune."}]
    first = list(engine.generate(chat, GenerateOptions(seed=1, max_tokens=12)))[-1]
    reply = engine.tokenizer.decode(first.token_ids, skip_special=True)
    chat += [{"role": "assistant", "content": reply}, {"role": "user", "content": "Another one."}]
    ids1, ids2 = engine.prompt_ids(chat[:1]), engine.prompt_ids(chat)
    common = next(n for n, (a, b) in enumerate(zip(ids1, ids2)) if a != b)
    assert len(ids1) - THOUGHT_CHANNEL_TOKENS < common < len(ids1)  # the thought channel
    second = list(engine.generate(chat, GenerateOptions(seed=2, max_tokens=12)))[-1]
    assert second.prompt_cached_count == common and second.prompt_eval_count == len(ids2)
    scratch = list(engine.generate(chat, GenerateOptions(seed=2, max_tokens=12, cache_prompt=False)))[-1]
    assert scratch.prompt_cached_count == 0 and second.token_ids == scratch.token_ids


def test_stats_count_the_cached_tokens_apart():
    """`--stats` (dgemma run, the chat): the whole prompt, the part from the cache, the rate of the rest."""
    from dgemma.plugin.run import stats_lines

    done = DoneEvent("stop", 30, 4, [], [], [1], 4.0, 0, 3_000_000_000, 0, 1_000_000_000, 2_000_000_000, 27)
    lines = stats_lines(done)
    assert "prompt eval count:    30 token(s) (27 from the kept KV cache)" in lines
    assert "prompt eval duration: 1000.0 ms (3.00 tokens/s)" in lines
    assert "prompt eval count:    30 token(s)" in stats_lines(DoneEvent("stop", 30, 4, [], [], [1], 4.0, 0, 3, 0, 1, 2))


@pytest.mark.parametrize("task", [0, 30])
def test_chat_turns_bench_runs(tmp_path, task):
    """bench/chat_turns.py at the tiny size, two turns: the second takes its prompt but for the new message and
    the generation prompt from the cache; the baseline encodes it whole, and with a task prompt between the turns
    (--task) so does the baseline that keeps only its last generation's cache, while the engine keeping copies
    takes it from the conversation's copy."""
    out = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "bench" / "chat_turns.py"), "--size", "tiny",
                          "--dir", str(tmp_path), "--turns", "2", "--system", "40", "--message", "6", "--steps", "2",
                          "--canvases", "1", "--task", str(task)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if line.split() and line.split()[0] in ("0", "1")]
    # 1 + 40 + 6 + 4; 47 + 16 + 2 + 6 + 4 (canvas 16)
    assert [r[:4] for r in rows] == [["0", "51", "0", "0"], ["1", "75", "0", "47"]]
    assert "conversation:" in out.stdout

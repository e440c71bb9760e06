"""The torch engine against transformers: decoder logits within 1e-4, generate() token for token."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import SPECS, WIDE_SPEC, spy_encoder_passes
from oracle import hf_generate, hf_logits

from dgemma.convert import convert
from dgemma.plugin.engine import DoneEvent, Engine, EngineError, GenerateOptions, TextEvent
from dgemma.plugin.fast_decode import FastDecoder
from dgemma.plugin.kv_cache import KVCache

# three shapes: global layer last / in the middle, 4-8 experts, head dims 16/32 and 32/64, canvas 16 or 32
ENGINE_SPECS = {
    "base": SPECS["base"],
    "odd": SPECS["odd"],
    "wide": WIDE_SPEC,
}


@pytest.fixture(scope="module")
def engines(tmp_path_factory, checkpoint_factory):
    out = tmp_path_factory.mktemp("engine")
    cache: dict[str, tuple[Path, Engine]] = {}

    def get(name: str) -> tuple[Path, Engine]:
        if name not in cache:
            ckpt = checkpoint_factory(ENGINE_SPECS[name])
            path = out / f"{name}.gguf"
            convert(ckpt, path, "F32", quiet=True)
            cache[name] = ckpt, Engine.load(path)
        return cache[name]

    return get


@pytest.mark.parametrize("name", sorted(ENGINE_SPECS))
@pytest.mark.parametrize("prompt_len", [5, 29])  # shorter and longer than every sliding window
def test_decoder_logits_match_transformers(engines, name, prompt_len):
    ckpt, engine = engines(name)
    cfg = engine.cfg
    g = torch.Generator().manual_seed(prompt_len)
    prompt = torch.randint(0, cfg.vocab_size, (1, prompt_len), generator=g)
    canvas = torch.randint(0, cfg.vocab_size, (1, cfg.canvas_length), generator=g)
    cache = KVCache()
    engine.model.encode(prompt, cache)

    ref = hf_logits(ckpt, prompt, canvas)
    sc = ref / 0.65  # a previous step's processed logits; our decoder takes their softmax
    ref_sc = hf_logits(ckpt, prompt, canvas, sc)
    assert isinstance(engine.decode_step.__self__, FastDecoder)  # the engine's step; model.decode: the reference
    for decode in (engine.model.decode, engine.decode_step):
        ours = decode(canvas, cache)
        assert ours.shape == ref.shape == (1, cfg.canvas_length, cfg.vocab_size)
        assert (ours - ref).abs().max().item() < 1e-4
        ours = decode(canvas, cache, torch.softmax(sc, dim=-1, dtype=torch.float32))
        assert (ours - ref_sc).abs().max().item() < 1e-4


def test_logits_after_a_second_encoded_chunk(engines):
    """Multi-canvas: the finished canvas is encoded after the prompt; the sliding cache keeps the window."""
    ckpt, engine = engines("wide")
    cfg = engine.cfg
    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(0, cfg.vocab_size, (1, 9), generator=g)
    chunk = torch.randint(0, cfg.vocab_size, (1, cfg.canvas_length), generator=g)
    canvas = torch.randint(0, cfg.vocab_size, (1, cfg.canvas_length), generator=g)
    cache = KVCache()
    engine.model.encode(prompt, cache)
    engine.model.encode(chunk, cache)
    assert (engine.model.decode(canvas, cache) - hf_logits(ckpt, prompt, canvas, second_chunk=chunk)).abs().max() < 1e-4
    # the cache holds what a later query can see: sliding layers their last window - 1 positions, global all
    seen = [k.shape[2] for k in cache.keys]
    assert seen == [cfg.sliding_window - 1 if swa else 9 + cfg.canvas_length for swa in cfg.is_swa]
    assert cache.length == 9 + cfg.canvas_length > cfg.sliding_window


def encoder_passes(engine: Engine, monkeypatch) -> list[int]:
    """The token count of every encoder pass the engine's model runs from now on (its first layer's input)."""
    return spy_encoder_passes(engine, monkeypatch.setattr)


@pytest.mark.parametrize("chunk", [1, 4, 7, 11])
def test_prompt_encoded_in_chunks(engines, chunk, monkeypatch):
    """encode(chunk=): a 29-token prompt in passes of 1, 4, 7 or 11 tokens (the "odd" model's sliding window
    is 8: shorter chunks see earlier ones only through the trimmed cache, 11 also spans the window) leaves the
    cache and the decoder's logits
    of one pass: transformers' logits within 1e-4, every cached key and value within 1e-4 (float32 GEMMs of other row counts)."""
    ckpt, engine = engines("odd")
    cfg = engine.cfg
    g = torch.Generator().manual_seed(chunk)
    prompt = torch.randint(0, cfg.vocab_size, (1, 29), generator=g)
    canvas = torch.randint(0, cfg.vocab_size, (1, cfg.canvas_length), generator=g)
    whole, parts = KVCache(), KVCache()
    engine.model.encode(prompt, whole)
    passes = encoder_passes(engine, monkeypatch)
    out = engine.model.encode(prompt, parts, chunk=chunk)
    assert passes == [chunk] * (29 // chunk) + ([29 % chunk] if 29 % chunk else [])
    assert out.shape == (1, 29, cfg.n_embd) and parts.length == whole.length == 29
    for a, b in zip(whole.keys + whole.values, parts.keys + parts.values):
        assert a.shape == b.shape and (a - b).abs().max() < 1e-4
    assert (engine.model.decode(canvas, parts) - hf_logits(ckpt, prompt, canvas)).abs().max() < 1e-4


@pytest.mark.parametrize("keep", [None, 5])
@pytest.mark.parametrize("reserve", [0, 3])
@pytest.mark.parametrize("dtype,attend", [(None, None), (torch.float16, None), (torch.float16, torch.float32)])
def test_kv_cache_extend_is_the_concatenation(keep, reserve, dtype, attend):
    """KVCache.extend, the encoder's step, over chunks of 4, 1 and 6 positions (and a second encode of 3):
    what each chunk attends over is every earlier kept position followed by the chunk, in the attention
    dtype, and the cache keeps the last `keep` (None: all), exactly as concatenating and trimming would
    give. A layer keeping every position in the dtype it attends in writes into buffers made once per
    encode (`until`), with the reserve after them; others store the concatenation."""
    g = torch.Generator().manual_seed(3)
    cache = KVCache(dtype=dtype, reserve=reserve, attend=attend)
    att, kept = attend or dtype or torch.float32, dtype or torch.float32  # attended in, stored in
    in_place = keep is None and att == kept
    stored: list[list[torch.Tensor]] = [[], []]  # every position's keys and values so far, as stored
    made: list[tuple] = []  # distinct buffers (held: no address is reused)
    for until, chunks in ((11, (4, 1, 6)), (14, (3,))):
        cache.until = until
        for n in chunks:
            k, v = (torch.randn(2, 3, n, 8, generator=g) for _ in range(2))
            old = cache.layer(0)
            got = cache.extend(0, k, v, keep)
            for o, new, out in zip(old, (k, v), got):
                assert out.dtype == att and torch.equal(out, new.to(att) if o is None else torch.cat([o.to(att), new.to(att)], 2))
            cache.length += n
            for i, (new, have) in enumerate(zip((k, v), (cache.keys[0], cache.values[0]))):
                stored[i].append(new.to(kept))
                assert have.dtype == kept and torch.equal(have, torch.cat(stored[i], dim=2)[:, :, -keep if keep else 0 :])
            bufs = cache.buffers[0]
            assert (bufs is not None) == bool(reserve or in_place)
            if bufs is not None:
                assert cache.keys[0].data_ptr() == bufs[0].data_ptr() and cache.values[0].data_ptr() == bufs[1].data_ptr()
                if not any(b is bufs for b in made):
                    made.append(bufs)
                assert bufs[0].shape[2] == (until if in_place else cache.keys[0].shape[2]) + reserve
    assert cache.version == 4
    if in_place:
        assert len(made) == 2  # one pair of buffers per encode
    with pytest.raises(ValueError, match="a chunk of batch 1 over a cache of batch 2"):
        cache.extend(0, torch.zeros(1, 3, 1, 8), torch.zeros(1, 3, 1, 8), keep)


def test_encoder_writes_global_layers_into_their_buffers(engines, monkeypatch):
    """The engine's cache (reserve = canvas) over a 29-token prompt in chunks of 8: each global layer's
    buffers are made once, long enough for the prompt and a canvas, and every chunk's keys/values are written
    there (sliding layers, which keep less than a chunk sees, store a new concatenation per chunk); keys,
    values and the decoder's logits match a cache filled the concatenating way (attention in float64 there:
    1e-5; 1.2e-6 seen on the logits) and transformers' logits (1e-4)."""
    ckpt, engine = engines("odd")
    cfg, m = engine.cfg, engine.model
    C = cfg.canvas_length
    g = torch.Generator().manual_seed(4)
    prompt = torch.randint(0, cfg.vocab_size, (1, 29), generator=g)
    canvas = torch.randint(0, cfg.vocab_size, (1, C), generator=g)
    concatenated = KVCache(dtype=torch.float32, attend=torch.float64)  # attends in another dtype: concatenates
    m.encode(prompt, concatenated, chunk=8)
    made: dict[int, list[tuple]] = {}  # each layer's distinct buffers (held: no address is reused)
    extend = KVCache.extend

    def spy(self, i, k, v, keep):
        out = extend(self, i, k, v, keep)
        if not any(b is self.buffers[i] for b in made.setdefault(i, [])):
            made[i].append(self.buffers[i])
        return out

    monkeypatch.setattr(KVCache, "extend", spy)
    cache = KVCache(reserve=C)
    m.encode(prompt, cache, chunk=8)
    glob = [i for i in range(cfg.n_layer) if not cfg.is_swa[i]]
    assert glob and all(len(made[i]) == 1 and cache.buffers[i][0].shape[2] == 29 + C for i in glob)
    assert all(len(made[i]) == 4 and cache.buffers[i][0].shape[2] == cfg.sliding_window - 1 + C
               for i in range(cfg.n_layer) if cfg.is_swa[i])
    for a, b in zip(cache.keys + cache.values, concatenated.keys + concatenated.values):
        assert a.shape == b.shape and (a - b).abs().max().item() < 1e-5
    want = m.decode(canvas, concatenated)  # attention in float64 over the same float32 keys and values
    got = m.decode(canvas, cache)
    assert (got - hf_logits(ckpt, prompt, canvas)).abs().max().item() < 1e-4
    assert (got - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("lookahead,made_at", [(4, [0, 5]), (2, [0, 3, 5])])
def test_a_generation_makes_the_global_layers_buffers_every_few_canvases(engines, monkeypatch, lookahead, made_at):
    """Engine.generate sizes the global layers' KV buffers for the prompt and up to KV_LOOKAHEAD canvases
    encoded after it, and makes them again only when they are full: over 6 canvases (5 encoded after the
    prompt) with a lookahead of 4, once at the prompt and once at the 5th canvas; of 2, at the prompt, the 3rd and
    the 5th canvas. Each is sized for the canvases still to come, at most lookahead of them (before: new buffers
    for every canvas; presizing for the whole max_tokens took a server request's whole num_ctx up front)."""
    import dgemma.plugin.engine as engine_module

    _, engine = engines("odd")
    cfg, C = engine.cfg, engine.cfg.canvas_length
    monkeypatch.setattr(engine_module, "KV_LOOKAHEAD", lookahead)
    made: dict[int, list[tuple[int, tuple]]] = {}  # per layer: (canvases encoded before, buffers), held
    extend, encoded = KVCache.extend, []

    def spy(self, i, k, v, keep):
        out = extend(self, i, k, v, keep)
        if self.buffers[i] is not None and not any(b is self.buffers[i] for _, b in made.setdefault(i, [])):
            made[i].append((len(encoded), self.buffers[i]))
        return out

    encode = engine.model.encode
    monkeypatch.setattr(KVCache, "extend", spy)
    monkeypatch.setattr(engine.model, "encode", lambda *a, **kw: (encode(*a, **kw), encoded.append(1))[0])
    events = list(engine.generate([2, 5, 7, 9, 11], GenerateOptions(max_tokens=6 * C, seed=3, eos_ids=set(), steps=2,
                                                                            cache_prompt=False)))
    assert len(events[-1].canvases) == 6
    glob = [i for i in range(cfg.n_layer) if not cfg.is_swa[i]]
    for i in glob:
        assert [n for n, _ in made[i]] == made_at, i  # canvases encoded before each pair was made (0: the prompt)
        for n, (k, _) in made[i]:
            room = min(6 - n if n else 5, lookahead)  # canvases still to encode, at most the lookahead
            assert k.shape[2] == 5 + max(n - 1, 0) * C + room * C + C, (i, n, k.shape)  # + the decoder's reserve


def test_float16_kv_cache(engines, monkeypatch):
    """kv_cache f16 (the cuda backend's default): half the bytes, the same trimming, and attention over it
    runs in float16, the encoder's and the decoder's (q and the new keys rounded too): logits within 0.05
    of the float32 cache's (0.003-0.006 on the default model over three prompts; 0.0013-0.003 there with
    `attend` float32, the cache cast every pass)."""
    _, engine = engines("wide")
    cfg, m = engine.cfg, engine.model
    g = torch.Generator().manual_seed(8)
    prompt = torch.randint(0, cfg.vocab_size, (1, 40), generator=g)
    canvas = torch.randint(0, cfg.vocab_size, (1, cfg.canvas_length), generator=g)
    full, half = KVCache(), KVCache(dtype=torch.float16, reserve=cfg.canvas_length)
    cast = KVCache(dtype=torch.float16, attend=torch.float32)
    cast_reserved = KVCache(dtype=torch.float16, attend=torch.float32, reserve=cfg.canvas_length)  # room of another dtype
    for cache in (full, half, cast, cast_reserved):
        m.encode(prompt, cache)
    assert all(h.dtype == torch.float16 and h.shape == f.shape for h, f in zip(half.keys + half.values, full.keys + full.values))
    import dgemma.plugin.model as model_module

    dtypes = []
    attention = model_module.grouped_attention
    monkeypatch.setattr(model_module, "grouped_attention", lambda q, *a: dtypes.append(q.dtype) or attention(q, *a))
    want = m.decode(canvas, full)
    diffs = [(m.decode(canvas, c) - want).abs().max().item() for c in (half, cast)]
    assert dtypes == [torch.float32] * cfg.n_layer + [torch.float16] * cfg.n_layer + [torch.float32] * cfg.n_layer
    assert torch.equal(m.decode(canvas, cast_reserved), m.decode(canvas, cast))  # concatenated in float32
    dtypes.clear()
    m.encode(canvas, half)  # a finished canvas: the encoder
    assert dtypes == [torch.float16] * cfg.n_layer
    assert 0 < diffs[1] < diffs[0] < 0.05, diffs
    f16 = Engine.load(engine.path, kv_cache="f16")
    assert f16.kv_dtype == torch.float16 and generate_ids(f16, [2, 10, 11], seed=1, max_tokens=20).eval_count > 0
    with pytest.raises(EngineError, match="kv_cache 'q8' is not available"):
        Engine.load(engine.path, kv_cache="q8")


def test_decoder_writes_its_canvas_into_the_reserved_positions(engines, monkeypatch):
    """KVCache(reserve=C), the engine's: each layer's cache lies in buffers with room for one canvas, and the
    decoder (model.decode and the engine's FastDecoder) writes its canvas's keys and values there instead of
    concatenating them to a copy of the cache on every pass. Its attention reads the buffers themselves; the
    logits equal the unreserved cache's (1e-6) and transformers' (1e-4); a pass leaves the cache as it was;
    a second canvas, and one after a finished canvas was encoded (prompt longer than the sliding windows,
    chunked), read what they should; a canvas longer than the room falls back to the copy."""
    ckpt, engine = engines("odd")
    cfg, m = engine.cfg, engine.model
    C = cfg.canvas_length
    g = torch.Generator().manual_seed(9)
    prompt = torch.randint(0, cfg.vocab_size, (1, 29), generator=g)
    canvases = [torch.randint(0, cfg.vocab_size, (1, C), generator=g) for _ in range(3)]
    plain, res, short = KVCache(), KVCache(reserve=C), KVCache(reserve=C - 1)
    for cache in (plain, res, short):
        m.encode(prompt, cache, chunk=8)
    shared: dict[int, list[bool]] = {id(plain): [], id(res): [], id(short): []}
    with_canvas = KVCache.with_canvas

    def spy(self, i, k, v):
        keys, values = with_canvas(self, i, k, v)
        bufs = self.buffers[i]
        shared.setdefault(id(self), []).append(bufs is not None and keys.data_ptr() == bufs[0].data_ptr()
                                              and values.data_ptr() == bufs[1].data_ptr())
        return keys, values

    monkeypatch.setattr(KVCache, "with_canvas", spy)
    before = [t.clone() for t in res.keys + res.values]
    for j, canvas in enumerate(canvases[:2]):
        for decode in (m.decode, engine.decode_step):
            want = decode(canvas, plain)
            assert (decode(canvas, res) - want).abs().max().item() < 1e-6
            assert (decode(canvas, short) - want).abs().max().item() < 1e-6
        if j == 0:
            assert (want - hf_logits(ckpt, prompt, canvas)).abs().max().item() < 1e-4
    assert all(torch.equal(a, b) for a, b in zip(before, res.keys + res.values))
    assert shared[id(res)] == [True] * 4 * cfg.n_layer  # 2 canvases x 2 decoders x every layer
    assert not any(shared[id(plain)] + shared[id(short)])
    for cache in (plain, res):
        m.encode(canvases[0], cache)  # the finished canvas: the next one's context
    assert all(torch.equal(a, b) for a, b in zip(plain.keys + plain.values, res.keys + res.values))
    assert all(b[0].shape[2] == k.shape[2] + C for b, k in zip(res.buffers, res.keys))
    got = m.decode(canvases[2], res)
    assert (got - m.decode(canvases[2], plain)).abs().max().item() < 1e-6
    assert (got - hf_logits(ckpt, prompt, canvases[2], second_chunk=canvases[0])).abs().max().item() < 1e-4
    with pytest.raises(ValueError, match="a canvas of batch 2 over a cache of batch 1"):
        m.decode(canvases[0].repeat(2, 1), res)
    k = torch.ones(1, cfg.n_head_kv[0], C, cfg.head_dim[0])  # outside inference mode, into buffers made in it
    assert torch.equal(res.with_canvas(0, k, k)[0][:, :, -C:], k)
    shared.clear()
    list(engine.generate([2, 10, 11], GenerateOptions(seed=1, max_tokens=2 * C)))
    assert len(shared) == 1 and all(next(iter(shared.values())))  # the engine's cache reserves its canvas


def generate_ids(engine: Engine, prompt: list[int], seed: int, **opts) -> DoneEvent:
    events = list(engine.generate(prompt, GenerateOptions(seed=seed, **opts)))
    assert isinstance(events[-1], DoneEvent)
    return events[-1]


@pytest.mark.parametrize("seed,num_batch", [(0, None), (1, None), (2, 4)])
def test_generate_matches_transformers_token_for_token(engines, seed, num_batch, monkeypatch):
    """num_batch 4: the 9-token prompt encoded in three chunks, transformers' in one."""
    ckpt, engine = engines("base")
    prompt = [2, 105, 40, 41, 42, 106, 107, 105, 60]
    passes = encoder_passes(engine, monkeypatch)
    done = generate_ids(engine, prompt, seed, max_tokens=48, eos_ids={1}, num_batch=num_batch, cache_prompt=False)
    C = engine.cfg.canvas_length  # then each finished canvas but the last is encoded in one pass
    assert passes == ([4, 4, 1] if num_batch else [9]) + [C] * (len(done.canvases) - 1)
    ref, ref_tpf = hf_generate(ckpt, prompt, seed, max_new_tokens=48)
    assert sum(done.canvases, []) == ref
    assert done.steps_per_canvas == [48, 48, 48]
    assert done.tokens_per_forward == pytest.approx(ref_tpf)


def test_generate_matches_with_early_stopping_and_eos(engines):
    """With stability off and a loose confidence threshold every canvas stops after one step; an EOS id in
    the first canvas ends generation (transformers pads what follows it)."""
    ckpt, engine = engines("wide")
    prompt = [2, 105, 50, 51, 52, 53, 106]
    kw = dict(confidence_threshold=100.0, stability_threshold=0)
    saved = engine.cfg.sampler
    engine.cfg.sampler = replace(saved, confidence_threshold=100.0, stability_threshold=0)
    try:
        done = generate_ids(engine, prompt, 5, max_tokens=96, eos_ids={1})
        ref, _ = hf_generate(ckpt, prompt, 5, max_new_tokens=96, **kw)
        assert sum(done.canvases, []) == ref and done.steps_per_canvas == [1, 1, 1]
        eos = done.canvases[1][5]
        done = generate_ids(engine, prompt, 5, max_tokens=96, eos_ids={eos})
        ref, _ = hf_generate(ckpt, prompt, 5, max_new_tokens=96, eos_token_id=eos, pad_token_id=0, **kw)
    finally:
        engine.cfg.sampler = saved
    cut = sum(done.canvases, []).index(eos)
    assert done.token_ids == sum(done.canvases, [])[:cut] and done.done_reason == "stop"
    assert ref[: cut + 1] == sum(done.canvases, [])[: cut + 1] and set(ref[cut + 1 :]) <= {0}


def test_events_text_stats_and_limits(engines):
    _, engine = engines("base")
    events = list(engine.generate([2, 105, 40], GenerateOptions(seed=3, max_tokens=20, steps=4, eos_ids=set())))
    texts = [e for e in events if isinstance(e, TextEvent)]
    done = events[-1]
    assert isinstance(done, DoneEvent) and done.done_reason == "length"
    assert len(texts) == 2 and done.eval_count == 20 and len(done.token_ids) == 20  # 16 + 4 of the second canvas
    assert done.steps_per_canvas == [4, 4] and done.tokens_per_forward == pytest.approx(20 / 8)
    assert "".join(t.text for t in texts) == engine.tokenizer.decode(done.token_ids, skip_special=True)
    assert done.prompt_eval_count == 3 and done.seed == 3
    assert done.total_duration >= done.prompt_eval_duration + done.eval_duration > 0


def test_stop_string_and_cancellation(engines):
    _, engine = engines("base")
    done = generate_ids(engine, [2, 105, 40], 4, max_tokens=32, eos_ids=set())
    full = engine.tokenizer.decode(done.token_ids, skip_special=True)
    stop = full[20:23]
    events = list(engine.generate([2, 105, 40], GenerateOptions(seed=4, max_tokens=32, eos_ids=set(), stop=[stop])))
    text = "".join(e.text for e in events if isinstance(e, TextEvent))
    assert events[-1].done_reason == "stop" and text == full[: full.index(stop)]

    seen = []
    opts = GenerateOptions(seed=4, max_tokens=64, eos_ids=set(), on_step=seen.append, cancel=lambda: len(seen) >= 3)
    events = list(engine.generate([2, 105, 40], opts))
    assert events[-1].done_reason == "cancelled" and len(seen) == 3 and events[-1].steps_per_canvas == [3]


@pytest.mark.parametrize("at", [1, 2])  # the prompt's encode, or the first canvas's after it was sent
def test_running_out_of_gpu_memory_mid_generation_is_one_line(engines, monkeypatch, at):
    """CUDA's out-of-memory error while encoding (the KV cache grows) ends the generation with an EngineError of
    one line saying how far it got and what needs less, chained to nothing (CUDA's error would keep its frames'
    tensors alive); the next generation runs."""
    _, engine = engines("base")
    encode, calls = engine.model.encode, []

    def short_of_memory(tokens, cache, **kw):
        calls.append(tokens.shape[1])
        if len(calls) == at:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB (GPU 0; ...)\nmore")
        return encode(tokens, cache, **kw)

    monkeypatch.setattr(engine.model, "encode", short_of_memory)
    engine.prompt_cache.clear()  # (an earlier test's generation of the same prompt: its encode would be skipped)
    events = []
    with pytest.raises(EngineError) as e:
        for event in engine.generate([2, 105, 40], GenerateOptions(seed=4, max_tokens=48, eos_ids=set())):
            events.append(event)
    msg = str(e.value)
    got = "0 positions in the KV cache (the prompt and 0" if at == 1 else "3 positions in the KV cache (the prompt and 16"
    assert "\n" not in msg and msg.startswith(f"the GPU ran out of memory with {got} tokens generated)")
    assert "num_ctx" in msg and e.value.__context__ is None and e.value.__cause__ is None
    assert calls == [3, 16][:at] and len(events) == at - 1 and all(isinstance(x, TextEvent) for x in events)
    assert engine.prompt_cache.cache is None  # nothing of it kept
    monkeypatch.setattr(engine.model, "encode", encode)
    assert generate_ids(engine, [2, 105, 40], 4, max_tokens=48, eos_ids=set()).eval_count == 48


def test_bad_prompts_are_refused(engines):
    _, engine = engines("base")
    with pytest.raises(EngineError, match="outside the vocabulary"):
        list(engine.generate([2, 99999]))
    with pytest.raises(EngineError, match="steps must be at least 1"):
        list(engine.generate([2, 3], GenerateOptions(steps=0)))
    with pytest.raises(EngineError, match="num_batch must be at least 1"):
        list(engine.generate([2, 3], GenerateOptions(num_batch=0)))


@pytest.mark.parametrize("H,KV,L,P,window", [(4, 2, 5, 0, None), (6, 2, 7, 9, 4), (3, 3, 4, 6, None), (8, 1, 3, 0, 2),
                                             (4, 2, 1, 6, 3)])  # L = 1: the fold is a view, not a copy
def test_grouped_attention_equals_sdpa_with_grouped_heads(H, KV, L, P, window):
    """model.grouped_attention (query heads folded into rows, for the GPU's fused kernels) is SDPA with
    enable_gqa: the decoder's unmasked form and the encoder's causal, sliding-window mask over P cached
    positions. Distinct heads and positions, so a fold that paired the wrong query and KV heads fails."""
    import torch.nn.functional as F

    from dgemma.plugin.model import grouped_attention

    g = torch.Generator().manual_seed(H * 100 + L)
    q = torch.randn(2, H, L, 8, generator=g, dtype=torch.float64) * 2
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # as the model's: a transposed view of [B, L, H, hd]
    k, v = (torch.randn(2, KV, P + L, 8, generator=g, dtype=torch.float64) for _ in range(2))
    q_pos, k_pos = torch.arange(P, P + L)[:, None], torch.arange(P + L)[None, :]
    mask = k_pos <= q_pos
    if window:
        mask &= q_pos - k_pos < window
    for m in (None, mask):
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=1.0, enable_gqa=True)
        got = grouped_attention(q, k, v, m)
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-12, rtol=0)

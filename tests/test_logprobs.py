"""Logprobs of the generated tokens (plugin/logprobs.py): the engine's against the log softmax of the decoder's own
logits, the fused sampler path's (the cuda backend's, its kernels as references) against the torch backend's, and
the wire shapes through a real `dgemma serve` and the official ollama and openai clients."""

from __future__ import annotations

import itertools
import math

from types import SimpleNamespace

import httpx
import ollama
import openai
import pytest
import torch

from dgemma.plugin.engine import DoneEvent, Engine, EngineError, GenerateOptions, TextEvent
from dgemma.plugin.logprobs import LOGPROB_ROWS, MAX_TOP_LOGPROBS, TokenLogprob

TOP = 4


def _recorded(engine: Engine) -> list[torch.Tensor]:
    """Every decoder pass's logits [1, C, V] the engine's sampler gets, in order."""
    calls: list[torch.Tensor] = []
    step = engine.decode_step

    def decode(*args):
        out = step(*args)
        calls.append(out.detach().clone())
        return out

    engine.decode_step = decode
    return calls


def _generate(engine: Engine, **kw) -> tuple[list[TextEvent], DoneEvent]:
    opts = GenerateOptions(seed=3, max_tokens=40, raw=True, eos_ids=set(), logprobs=TOP, **kw)
    *events, done = engine.generate("abc", opts)
    assert isinstance(done, DoneEvent)
    return events, done


@pytest.mark.parametrize("rng", ["torch", "counter"])
def test_a_tokens_logprob_is_its_canvas_last_pass_log_softmax(canvas16_gguf, rng):
    """Three canvases of 16 (the last cut to 8 by max_tokens): each token's logprob and top alternatives are those
    of log_softmax of the logits of its canvas's last pass (whose argmax the canvas is), the token first among
    them; the stream's per-canvas lists make up the final one, one per generated token."""
    engine = Engine.load(canvas16_gguf, rng=rng)
    calls = _recorded(engine)
    events, done = _generate(engine)
    C = engine.cfg.canvas_length
    assert len(done.logprobs) == done.eval_count == 40 and len(done.canvases) == 3
    assert list(itertools.chain.from_iterable(e.logprobs for e in events)) == done.logprobs
    assert all(len(e.logprobs) == len(e.token_ids) for e in events)
    assert len(calls) == sum(done.steps_per_canvas)
    for c, last in enumerate(itertools.accumulate(done.steps_per_canvas)):
        want = torch.log_softmax(calls[last - 1][0].float(), dim=-1)  # [C, V]
        for pos, item in enumerate(done.logprobs[c * C : (c + 1) * C]):
            assert item.id == done.token_ids[c * C + pos] == done.canvases[c][pos]
            assert abs(item.logprob - float(want[pos, item.id])) < 1e-5
            values, ids = want[pos].topk(TOP)
            assert [i for i, _ in item.top] == ids.tolist() and item.top[0][0] == item.id
            assert max(abs(a - float(b)) for (_, a), b in zip(item.top, values)) < 1e-5
    # earlier passes differ: the logprobs are not those of the first pass
    first = torch.log_softmax(calls[0][0].float(), dim=-1)
    assert any(abs(t.logprob - float(first[p, t.id])) > 1e-3 for p, t in enumerate(done.logprobs[:C]))


def test_no_logprobs_unless_asked_and_no_alternatives_at_zero(default_gguf):
    engine = Engine.load(default_gguf)
    *events, done = engine.generate("Hi", GenerateOptions(seed=1, max_tokens=6))
    assert done.logprobs is None and all(e.logprobs == [] for e in events)
    *_, zero = engine.generate("Hi", GenerateOptions(seed=1, max_tokens=6, logprobs=0))
    assert zero.token_ids == done.token_ids and len(zero.logprobs) == zero.eval_count
    assert all(t.top == [] and t.logprob <= 0 for t in zero.logprobs)
    for bad in (-1, MAX_TOP_LOGPROBS + 1):
        with pytest.raises(EngineError, match="top_logprobs must be between 0 and 20"):
            list(engine.generate("Hi", GenerateOptions(max_tokens=2, logprobs=bad)))


def test_the_fused_path_gives_the_torch_backends_logprobs_by_rows(canvas16_gguf, kernels_as_references,
                                                                   monkeypatch):
    """The cuda backend's sampler path (the fused head, rng counter) on the CPU, its kernels as their references:
    the same tokens and, within float rounding of the quantized matmul, the logprobs of the torch backend with
    rng counter; the vocabulary head multiplies at most LOGPROB_ROWS positions at a time (no [C, V] logits)."""
    from cuda_util import cpu_cuda_weights

    from dgemma.plugin.cuda import ops
    from dgemma.plugin.model import DiffusionGemma

    ref = Engine.load(canvas16_gguf, rng="counter")
    V = ref.cfg.vocab_size
    fused = Engine(canvas16_gguf, ref.cfg, ref.tokenizer, DiffusionGemma(ref.cfg, cpu_cuda_weights(canvas16_gguf)[0]),
                   0, torch.device("cpu"), rng="counter")
    qmatmul, head_rows = ops.qmatmul, []

    def watched(x, w, qtype, k):
        if w.shape[0] == V:
            head_rows.append(x.shape[0])
        return qmatmul(x, w, qtype, k)

    monkeypatch.setattr(ops, "qmatmul", watched)
    _, want = _generate(ref)
    _, got = _generate(fused)
    assert got.canvases == want.canvases and [t.id for t in got.logprobs] == [t.id for t in want.logprobs]
    assert max(abs(a.logprob - b.logprob) for a, b in zip(got.logprobs, want.logprobs)) < 1e-3
    assert [[i for i, _ in a.top] for a in got.logprobs] == [[i for i, _ in b.top] for b in want.logprobs]
    assert head_rows and max(head_rows) <= LOGPROB_ROWS and sum(head_rows) == 40  # only for the tokens kept


# ---- the server ------------------------------------------------------------------------------------------------
def _alone(engine: Engine, messages, n: int, top: int) -> list[TokenLogprob]:
    """The logprobs the engine gives a chat with no server in between."""
    from dgemma.plugin.server.serving import generate_options

    opts = generate_options(engine, {"seed": 7, "num_predict": n})
    opts.logprobs = top
    done = list(engine.generate(messages, opts))[-1]
    assert len(done.logprobs) == done.eval_count
    return done.logprobs


def _same(wire: list, want: list[TokenLogprob], tok, top: int, raw: bool = False) -> None:
    """Wire entries against the engine's logprobs: text, value (within the float rounding another process's torch
    threads sum in), alternatives, and the bytes (raw: entries as JSON dicts; else the clients' objects, whose bytes
    only openai's keep: the ollama client's models drop the field)."""
    assert len(wire) == len(want) > 0
    for got, t in zip(wire, want):
        if raw:
            got = SimpleNamespace(**{**got, "top_logprobs": [SimpleNamespace(**a) for a in got.get("top_logprobs", [])]})
        assert got.token == tok.token_text(t.id) and math.isclose(got.logprob, t.logprob, abs_tol=1e-4)
        if raw or hasattr(got, "bytes"):
            assert got.bytes == list(tok.decode_bytes([t.id]))
        alternatives = got.top_logprobs or []
        assert [a.token for a in alternatives] == [tok.token_text(i) for i, _ in t.top] and len(alternatives) == top


def test_ollama_clients_logprobs(server, engine):
    client = ollama.Client(host=server)
    tok = engine.tokenizer
    messages = [{"role": "user", "content": "Hello there"}]
    want = _alone(engine, messages, 12, 3)
    full = client.chat(model="default", messages=messages, options={"seed": 7, "num_predict": 12}, logprobs=True,
                       top_logprobs=3)
    _same(full.logprobs, want, tok, 3)
    parts = list(client.chat(model="default", messages=messages, options={"seed": 7, "num_predict": 12},
                             logprobs=True, top_logprobs=3, stream=True))
    _same([x for p in parts for x in (p.logprobs or [])], want, tok, 3)
    assert parts[-1].done and not parts[-1].logprobs
    gen = client.generate(model="default", prompt="Hello there", options={"seed": 7, "num_predict": 12}, logprobs=True)
    _same(gen.logprobs, _alone(engine, "Hello there", 12, 0), tok, 0)
    # the bytes, which the ollama client drops, as the server sends them
    body = httpx.post(f"{server}/api/chat", json={"model": "default", "messages": messages, "stream": False,
                                                   "options": {"seed": 7, "num_predict": 12}, "logprobs": True,
                                                   "top_logprobs": 3}, timeout=60).json()
    _same(body["logprobs"], want, tok, 3, raw=True)
    # top_logprobs alone is ignored on Ollama's API; over 20 alternatives is a 400 before the model loads
    assert client.generate(model="default", prompt="Hi", options={"num_predict": 2}, top_logprobs=2).logprobs is None
    for path, body in (("/api/generate", {"prompt": "Hi"}), ("/api/chat", {"messages": messages})):
        r = httpx.post(f"{server}{path}", json={"model": "default", **body, "logprobs": True, "top_logprobs": 21},
                       timeout=60)
        assert r.status_code == 400 and r.json()["error"] == "top_logprobs must be between 0 and 20 (got 21)"


def test_openai_clients_logprobs(server, engine):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    tok = engine.tokenizer
    messages = [{"role": "user", "content": "Hello there"}]
    want = _alone(engine, messages, 10, 2)
    r = client.chat.completions.create(model="default", messages=messages, max_tokens=10, seed=7, logprobs=True,
                                       top_logprobs=2)
    _same(r.choices[0].logprobs.content, want, tok, 2)
    chunks = list(client.chat.completions.create(model="default", messages=messages, max_tokens=10, seed=7,
                                                 logprobs=True, top_logprobs=2, stream=True))
    _same([x for c in chunks if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.content], want,
          tok, 2)
    plain = client.chat.completions.create(model="default", messages=messages, max_tokens=4, seed=7)
    assert plain.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        client.chat.completions.create(model="default", messages=messages, top_logprobs=2)

    raw = list(engine.generate("Once upon", GenerateOptions(seed=2, max_tokens=9, raw=True, logprobs=2)))[-1]
    done = client.completions.create(model="default", prompt="Once upon", max_tokens=9, seed=2, logprobs=2)
    lp = done.choices[0].logprobs
    assert lp.tokens == [tok.token_text(t.id) for t in raw.logprobs]
    assert all(math.isclose(a, t.logprob, abs_tol=1e-4) for a, t in zip(lp.token_logprobs, raw.logprobs))
    assert [list(d) for d in lp.top_logprobs] == [[tok.token_text(i) for i, _ in t.top] for t in raw.logprobs]
    text = done.choices[0].text
    assert lp.text_offset == [len(tok.decode([t.id for t in raw.logprobs[:k]], skip_special=True))
                              for k in range(len(raw.logprobs))] and lp.text_offset[-1] < len(text)
    streamed = [c.choices[0].logprobs for c in client.completions.create(
        model="default", prompt="Once upon", max_tokens=9, seed=2, logprobs=2, stream=True) if c.choices[0].logprobs]
    assert [t for s in streamed for t in s.tokens] == lp.tokens
    assert [o for s in streamed for o in s.text_offset] == lp.text_offset
    for kw, needle in (({"logprobs": 6}, "between 0 and 5"), ({"logprobs": 1, "echo": True}, "echo")):
        with pytest.raises(openai.BadRequestError, match=needle):
            client.completions.create(model="default", prompt="Once", max_tokens=2, **kw)


def test_wire_shapes_of_a_byte_token(default_gguf):
    """A byte token (part of a character) is U+FFFD as text and its byte in `bytes`; alternatives only where asked."""
    from dgemma.plugin.logprobs import completion_wire, wire

    tok = Engine.load(default_gguf).tokenizer
    b, word = tok.byte_ids[0xE2], tok.encode("Hello")[0]
    items = [TokenLogprob(b, -0.5, [(b, -0.5), (word, -1.5)]), TokenLogprob(word, -0.25, [(word, -0.25), (b, -2.0)])]
    got = wire(tok, items, top=True)
    assert got[0] == {"token": "\ufffd", "logprob": -0.5, "bytes": [0xE2], "top_logprobs": [
        {"token": "\ufffd", "logprob": -0.5, "bytes": [0xE2]},
        {"token": tok.token_text(word), "logprob": -1.5, "bytes": list(tok.decode_bytes([word]))}]}
    assert "top_logprobs" not in wire(tok, items, top=False)[1]
    legacy = completion_wire(tok, items)
    # the lone byte is a character of its own (U+FFFD) in the text, as the reply decodes it
    assert legacy["tokens"] == ["\ufffd", tok.token_text(word)] and legacy["text_offset"] == [0, 1]
    assert legacy["top_logprobs"][1] == {tok.token_text(word): -0.25, "\ufffd": -2.0}
    # "é" in two byte tokens, then a control token (no text) and a word: the character begins where its first byte is
    e1, e2, eos = tok.byte_ids[0xC3], tok.byte_ids[0xA9], tok.eos_id
    ids = [word, e1, e2, eos, word]
    got = completion_wire(tok, [TokenLogprob(i, -1.0) for i in ids])["text_offset"]
    n = len(tok.token_text(word))
    assert got == [0, n, n, n + 1, n + 1] and tok.decode(ids, skip_special=True) == tok.token_text(word) + "é" + tok.token_text(word)

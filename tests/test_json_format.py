"""JSON mode (plugin/json_format.py): the JSON-object prefix automaton against Python's json module, the canvas
read-out on made-up logits (the model's own tokens where they fit, the object closed within the budget, across
canvases), and replies that parse through the engine and a real `dgemma serve` with the official clients."""

from __future__ import annotations

import json
import random

import ollama
import openai
import pytest
import torch

from dgemma.plugin.engine import Engine, GenerateOptions
from dgemma.plugin.json_format import JsonPrefix, read_canvas

DOCS = ['{"a": 1, "b": [true, false, null, -0.5e+3, "x\\u00e9\\n\\"q\\""], "c": {"d": [[], {}, 0, 12.25E-2]}}',
        ' {\n "key" : "val\\\\ue", "n": -0, "e": "é ü", "nested": {"x": [1, [2, [3]]]}} ', "{}"]


def _accepts(text: str) -> tuple[bool, bool]:
    state = JsonPrefix()
    ok = state.feed(text.encode())
    return ok, ok and state.complete


def _is_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text, parse_constant=lambda c: 1 / 0), dict)
    except (ValueError, ZeroDivisionError):
        return False


def mutated(text: str, rng: random.Random, alphabet: list[str]) -> str:
    """text with one character changed, dropped or added (from alphabet) at random."""
    chars = list(text)
    at, kind = rng.randrange(len(chars)), rng.randrange(3)
    if kind == 0:
        chars[at] = rng.choice(alphabet)
    elif kind == 1:
        del chars[at]
    else:
        chars.insert(at, rng.choice(alphabet))
    return "".join(chars)


@pytest.mark.parametrize("doc", DOCS)
def test_every_prefix_of_an_object_goes_on_and_closes(doc):
    for i in range(len(doc) + 1):
        state = JsonPrefix()
        assert state.feed(doc[:i].encode()), doc[:i]
        closed = doc[:i].encode() + state.closing()
        assert _is_object(closed.decode()), (doc[:i], state.closing())
        assert _accepts(closed.decode()) == (True, True)
    assert _accepts(doc) == (True, True)


def test_the_automaton_agrees_with_json_loads_on_mutated_documents():
    """One character changed, dropped or added at random, 3000 times: a text the automaton takes whole (and calls
    complete) is exactly one that json.loads reads as an object."""
    rng = random.Random(0)
    alphabet = list('{}[]",:. -+0123456789eEtrufalsn\\\n x') + ["é"]
    agree = 0
    for _ in range(3000):
        text = mutated(rng.choice(DOCS), rng, alphabet)
        whole, complete = _accepts(text)
        assert (whole and complete) == _is_object(text), text
        agree += whole and complete
    assert 100 < agree < 3000  # both kinds were met


def test_nesting_is_bounded():
    from dgemma.plugin.json_format import MAX_DEPTH

    state = JsonPrefix()
    assert state.feed(b'{"a":' + b"[" * (MAX_DEPTH - 1)) and not state.copy().feed(b"[")
    assert state.closing() == b"]" * (MAX_DEPTH - 1) + b"}" and _is_object('{"a":' + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1) + "}")


def test_what_is_refused():
    for text in ('[1]', '"a"', '1', '{"a":01}', '{"a":1,}', '{,}', '{"a" 1}', '{"a":tru}', '{"a":"\x01"}', '{"a":-}',
                 '{"a":1.}', '{"a":"\\x"}', '{"a":"\\u12g4"}', '{}}', '{} {}', '{"a":1]'):
        assert not _accepts(text)[1], text
        assert not _is_object(text)


@pytest.fixture(scope="module")
def tok(default_gguf):
    return Engine.load(default_gguf).tokenizer


def _logits(tok, wanted: list[int], decoys: dict[int, list[int]], length: int):
    """Made-up logits: position i ranks wanted[i] first, after the decoys given for it (each more likely still)."""
    V = tok.vocab_size
    z = torch.randn(length, V, generator=torch.Generator().manual_seed(1)) * 0.1
    for i, t in enumerate(wanted[:length]):
        z[i, t] = 10.0
        for k, d in enumerate(decoys.get(i, [])):
            z[i, d] = 20.0 - k
    return lambda rows: z[rows].clone()


def test_the_read_out_takes_the_best_token_that_fits(tok):
    target = tok.encode('{"name": "Ada", "age": 36}')
    eos = tok.eos_id
    # more likely: before the object opens, a closing brace, an end of generation and a control token; within the
    # key's string (position 2), a newline (which a string must escape)
    assert tok.decode(target[:2]) == '{"' and tok.decode(target[:3]).startswith('{"n')
    decoys = {0: [tok.encode("}")[0], eos, tok.ids["<|turn>"]], 2: [tok.encode("\n")[0]]}
    state = JsonPrefix()
    got = read_canvas(_logits(tok, target, decoys, 40), 40, state, tok, {eos}, budget=100)
    n = len(target)
    assert got[:n] == target and got[n:] == [eos] * (40 - n) and state.complete
    # a budget too small for the whole object: closed within it
    for budget in range(2, n + 1):
        state = JsonPrefix()
        got = read_canvas(_logits(tok, target, {}, 40), 40, state, tok, {eos}, budget=budget)
        kept = got[:budget]
        text = tok.decode(kept[: kept.index(eos)] if eos in kept else kept)
        assert _is_object(text) and state.complete, (budget, text)


def test_a_fence_before_the_object_is_read_as_whitespace(tok):
    """A canvas denoised as ```json, newline, the object, ```: with the denoised canvas given, the fence's positions
    are read as whitespace and the object comes out where the model put it, whole."""
    fence, obj = tok.encode("```json\n"), tok.encode('{"name": "Ada", "age": 36}')
    wanted = fence + obj + tok.encode("\n```")
    eos, n = tok.eos_id, len(wanted)
    got = read_canvas(_logits(tok, wanted, {}, n), n, JsonPrefix(), tok, {eos}, budget=100, argmax=wanted)
    assert got[len(fence):len(fence) + len(obj)] == obj and set(got[len(fence) + len(obj):]) == {eos}
    assert tok.decode(got[:len(fence)]).strip() == "" and json.loads(tok.decode(got[:got.index(eos)])) == {
        "name": "Ada", "age": 36}
    # no object anywhere in the canvas: read as before (the best candidates that fit; here the object closed)
    prose = tok.encode("There is no JSON here at all, sorry.")
    got = read_canvas(_logits(tok, prose, {}, len(prose)), len(prose), JsonPrefix(), tok, {eos}, 100, argmax=prose)
    assert _is_object(tok.decode(got[:got.index(eos)]))


def test_the_read_out_goes_on_across_canvases(tok):
    """Canvases of 3 positions: the object goes on from one to the next, and a closing that spills past a canvas
    comes first in the next."""
    target = tok.encode('{"a": [1, 2, 3], "b": {"c": "d"}}')
    eos, state, out = tok.eos_id, JsonPrefix(), []
    for c in range(20):
        canvas = read_canvas(_logits(tok, target[3 * c:], {}, 3), 3, state, tok, {eos}, budget=100 - len(out))
        assert len(canvas) == 3
        out += canvas
        if eos in canvas:
            break
    assert tok.decode(out[: out.index(eos)]) == tok.decode(target) and state.complete
    # a budget that ends mid-object, in canvases of 2: the closing spills over canvases and still fits the budget
    state, out, budget = JsonPrefix(), [], 9
    for c in range(20):
        canvas = read_canvas(_logits(tok, target[2 * c:], {}, 2), 2, state, tok, {eos}, budget=budget - len(out))
        out += canvas
        if eos in canvas or len(out) >= budget:
            break
    kept = out[:budget]
    assert _is_object(tok.decode(kept[: kept.index(eos)] if eos in kept else kept))


def test_the_reply_ends_where_the_object_closes(default_gguf):
    """The default model's canvas is one token: the object closes on a canvas's last position, and no canvas follows
    (none denoised only to be filled with end tokens); a budget too small for "{}" is refused."""
    from dgemma.plugin.engine import EngineError

    engine = Engine.load(default_gguf)
    for seed in (1, 2, 3):
        done = list(engine.generate("JSON", GenerateOptions(seed=seed, max_tokens=50, format="json")))[-1]
        text = engine.tokenizer.decode(done.token_ids, skip_special=True)
        assert _is_object(text) and done.done_reason == "stop" and len(done.canvases) == done.eval_count
    with pytest.raises(EngineError, match="JSON mode needs room for 2 tokens"):
        list(engine.generate("JSON", GenerateOptions(max_tokens=1, format="json")))
    assert list(engine.generate("JSON", GenerateOptions(max_tokens=0, format="json")))[-1].eval_count == 0


@pytest.mark.parametrize("max_tokens", [5, 16, 40])
def test_the_engine_answers_a_json_object(canvas16_gguf, max_tokens):
    engine = Engine.load(canvas16_gguf)
    for seed in (1, 2):
        *events, done = engine.generate("Reply in JSON.", GenerateOptions(seed=seed, max_tokens=max_tokens,
                                                                          format="json"))
        text = "".join(e.text for e in events)
        assert _is_object(text), text
        assert done.eval_count <= max_tokens and text == engine.tokenizer.decode(done.token_ids, skip_special=True)


def test_the_server_answers_json_objects(server):
    client = ollama.Client(host=server)
    r = client.generate(model="default", prompt="Reply in JSON.", format="json", options={"seed": 1, "num_predict": 30})
    assert _is_object(r.response)
    c = client.chat(model="default", messages=[{"role": "user", "content": "JSON please"}], format="json",
                    options={"seed": 2, "num_predict": 30})
    assert _is_object(c.message.content)
    with pytest.raises(ollama.ResponseError, match="JSON mode leaves out the thought channel"):
        client.chat(model="default", messages=[{"role": "user", "content": "x"}], format="json", think=True)
    o = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    r = o.chat.completions.create(model="default", messages=[{"role": "user", "content": "JSON please"}],
                                  response_format={"type": "json_object"}, max_tokens=30, seed=3)
    assert _is_object(r.choices[0].message.content)
    resp = o.responses.create(model="default", input="JSON please", text={"format": {"type": "json_object"}},
                              max_output_tokens=30)
    assert _is_object(resp.output_text) and resp.text.format.type == "json_object"

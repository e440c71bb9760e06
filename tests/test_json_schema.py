"""Structured output with JSON schemas (plugin/json_schema.py, plugin/json_format.py): the automaton against the
`jsonschema` validator (every text it takes whole is valid; valid documents are taken; every prefix closes into a
valid one; random walks through it close into valid ones), the schema errors, the canvas read-out, and replies that
follow a pydantic model's schema through the engine, a real `dgemma serve` with the official clients, and the CLI."""

from __future__ import annotations

import json
import random
from typing import Literal, Optional

import jsonschema
import ollama
import openai
import pydantic
import pytest
import torch

from dgemma.plugin.engine import Engine, EngineError, GenerateOptions, TextEvent
from dgemma.plugin.json_format import JsonPrefix, read_canvas
from dgemma.plugin.json_schema import SchemaError, compile_schema
from test_json_format import mutated


class Address(pydantic.BaseModel):
    street: str
    zip: Optional[int] = None


class Person(pydantic.BaseModel):
    name: str
    age: int
    tags: list[str]
    kind: Literal["a", "b"]
    home: Address
    friends: list["Person"] = []


PERSON = Person.model_json_schema()  # $defs, $ref (recursive), anyOf with null, enum, defaults
SCHEMAS = {
    "person": (PERSON, [{"name": "Al", "age": 3, "tags": ["x", "y z"], "kind": "b", "home": {"street": "é", "zip": None},
                         "friends": [{"name": "B", "age": -1, "tags": [], "kind": "a", "home": {"street": ""}}]}]),
    "scalars": ({"type": "object", "properties": {
        "n": {"type": "number"}, "i": {"type": "integer"}, "b": {"type": "boolean"}, "z": {"type": "null"},
        "e": {"enum": [1, "two", None, [3]]}, "c": {"const": {"k": [True]}}, "t": {"type": ["string", "integer"]},
        "o": {"type": ["string", "null"]}}, "required": ["n", "i", "b", "c"]},
        [{"n": -1.5e3, "i": 7, "b": False, "c": {"k": [True]}, "z": None, "e": [3], "t": 4, "o": None},
         {"t": "s", "c": {"k": [True]}, "b": True, "i": 0, "n": 0.25, "e": "two"}]),
    "arrays": ({"type": "object", "properties": {
        "few": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3},
        "pair": {"type": "array", "prefixItems": [{"type": "string"}, {"type": "boolean"}]},
        "words": {"type": "array", "items": {"type": "string", "minLength": 2, "maxLength": 4}}},
        "required": ["few", "pair"], "additionalProperties": {"type": "integer"}},
        [{"few": [1, 2, 3], "pair": ["x", True], "words": ["ab", "abcd", "ééé"], "other": 5},
         {"pair": ["", False], "few": [0]}]),
    "root array": ({"type": "array", "items": {"anyOf": [{"type": "number"}, {"$ref": "#"}]}, "minItems": 2},
                   [[1, [2, [3, 4]], 5], [[0, 1], [2, 3]]]),
    "root number": ({"type": "number"}, [12.5, -3]),
    "any object": ({"type": "object"}, [{"a": [1, {"b": None}], "": "x"}, {}]),
    # constraints beside a combinator apply to each alternative; a required key not in properties takes any value
    "alternatives": ({"type": "object", "properties": {"a": {"type": "integer"}, "c": {"type": "string"}},
                      "anyOf": [{"required": ["a"]}, {"required": ["b"], "properties": {"d": {"type": "null"}}}]},
                     [{"a": 1, "c": "x"}, {"b": "x", "a": 2, "d": None}]),
    # more alternatives than the automaton follows threads (an enum's scalars are one); the type beside it applies
    "enum": ({"type": "string", "enum": [f"v{i:02}" for i in range(40)] + [1, None]}, ["v39", "v00"]),
    # references round a loop of alternatives; a key with an escape in it
    "cycle": ({"$defs": {"A": {"anyOf": [{"$ref": "#/$defs/B"}, {"type": "integer"}]},
                         "B": {"anyOf": [{"$ref": "#/$defs/A"}, {"type": "string", "maxLength": 2}]}},
               "type": "object", "properties": {"x": {"$ref": "#/$defs/A"}, "k\tey": {"type": "null"}},
               "required": ["x"], "additionalProperties": {"type": "boolean"}},
              [{"x": 1, "k\tey": None, "other": True}, {"x": "s"}]),
}
# what jsonschema checks instead where it would recurse without end (its anyOf loops round references)
ORACLE = {"cycle": {"type": "object", "properties": {"x": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 2}]},
                                                      "k\tey": {"type": "null"}},
                    "required": ["x"], "additionalProperties": {"type": "boolean"}}}


def _check(schema: dict, text: str) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def _takes(root, text: str) -> bool:
    state = JsonPrefix(root)
    return state.feed(text.encode()) and (state.complete or state.closing() == b"")


def _texts(doc) -> list[str]:
    return [json.dumps(doc, ensure_ascii=False), json.dumps(doc, ensure_ascii=False, indent=1, separators=(",", " : ")),
            json.dumps(doc, separators=(",", ":"))]


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_valid_documents_are_taken_and_every_prefix_closes_into_a_valid_one(name):
    schema, docs = SCHEMAS[name]
    root, schema = compile_schema(schema), ORACLE.get(name, schema)
    assert _check(schema, root.shortest.decode()), root.shortest
    for doc in docs:
        jsonschema.validate(doc, schema)  # (the examples themselves)
        for text in _texts(doc):
            assert _takes(root, text), text
            data = text.encode()
            for i in range(len(data) + 1):  # (a cut inside a character reads as U+FFFD, as the tokenizer reads it)
                state = JsonPrefix(root)
                assert state.feed(data[:i])
                closing = state.close()
                assert state.complete and _check(schema, (data[:i] + closing).decode(errors="replace")), (data[:i], closing)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_what_the_automaton_takes_whole_is_valid(name):
    """Each example changed at random 600 times (a character changed, dropped or added): where the automaton takes
    the text whole, jsonschema finds it valid."""
    schema, docs = SCHEMAS[name]
    root, rng, schema = compile_schema(schema), random.Random(0), ORACLE.get(name, schema)
    alphabet = list('{}[]",:. -+0123456789eEtrufalsn\\\n xabcé') + ['"a"', '"few"', '"name"', "null"]
    taken = 0
    for _ in range(600):
        text = mutated(rng.choice(_texts(rng.choice(docs))), rng, alphabet)
        if _takes(root, text):
            taken += 1
            assert _check(schema, text), text
    assert taken > 5


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_random_walks_close_into_valid_documents(name):
    """200 walks of up to 60 pieces, each the first of a shuffled alphabet the automaton takes, then closed: every
    text so made is valid (the walks reach keys half-written, escapes, nested alternatives); the closings the walk
    asked for on its way (kept in the state's memo, as the read-out asks them) change nothing: a fresh state fed the
    same text closes it the same."""
    schema, _ = SCHEMAS[name]
    root, rng, schema = compile_schema(schema), random.Random(1), ORACLE.get(name, schema)
    pieces = list('{}[]",:-.0123456789eE\\ukvtd ') + [
        "tr", "ue", "fals", "e", "nu", "ll", "é", "ab", '"few"', '"pair"', '"name"', '"age"', '"tags"', '"kind"', '"home"',
        '"street"', '"zip"', '"k\\tey"', "\\t", "\\u006", "\\ud83d", "\\ude00"]
    for _ in range(200):
        state, text = JsonPrefix(root), b""
        for _ in range(rng.randrange(61)):
            state.copy().closing()
            for p in rng.sample(pieces, len(pieces)):
                if state.feed(p.encode()):
                    text += p.encode()
                    break
            else:
                break
        fresh = JsonPrefix(root)
        assert fresh.feed(text) and not fresh.memo
        closing = state.close()
        assert closing == fresh.closing()
        closed = (text + closing).decode()
        assert state.complete and _check(schema, closed), closed


@pytest.mark.parametrize("schema, needle", [
    ({"type": "objekt"}, "format: at #: type: expected one of object, array"),
    ({"properties": {"a": {"$ref": "#/$defs/b"}}}, "at #/properties/a: $ref '#/$defs/b' names nothing"),
    ({"$ref": "http://example.com/s.json"}, "only references into the schema itself"),
    ({"enum": []}, "enum: expected a non-empty array"),
    ({"type": "array", "minItems": 3, "maxItems": 2}, "minItems 3 is more than maxItems 2"),
    ({"type": "string", "maxLength": -1}, "maxLength: expected a whole number"),
    ({"allOf": [{"type": "string"}, {"minLength": 1}]}, "allOf of more than one schema"),
    ({"properties": {"a": False}, "required": ["a"]}, "at #/properties/a: the schema false admits no value"),
    ({"$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}}, "required": ["next"]}},
      "$ref": "#/$defs/n"}, "no JSON value of at most 65536 bytes satisfies"),
    ([1], "expected a schema (an object)"),
    ({"type": "array", "minItems": 10 ** 12}, "minItems 1000000000000 is more than dgemma writes"),
    ({"type": "string", "minLength": None}, "minLength: expected a whole number"),
    ({"type": "array", "items": {"type": "array", "minItems": 4096, "items": {"type": "string", "minLength": 4096}},
      "minItems": 1}, "no JSON value of at most 65536 bytes"),
    ({"items": json.loads('{"items": ' * 400 + "{}" + "}" * 400)}, "nested too deeply"),
    ({"type": "object", "required": ["a"], "additionalProperties": False}, "required property 'a' is not in properties"),
    ({"$ref": "#/$defs/x", "maxLength": 2, "$defs": {"x": {"type": "string"}}}, "$ref with maxLength beside it"),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "anyOf": [{"properties": {"a": {}}}]},
     "properties both beside"),
    ({"type": "string", "anyOf": [{"type": "integer"}]}, "no alternative of anyOf is of the type beside it"),
])
def test_schemas_that_cannot_be_followed(schema, needle):
    with pytest.raises(SchemaError, match=needle.replace("$", r"\$").replace("(", r"\(").replace(")", r"\)")):
        compile_schema(schema)


def test_recursion_and_unused_unsatisfiable_branches():
    """A recursive list ends (its optional next may be left out); an alternative that can never end is never begun
    (the other one is taken)."""
    linked = {"$defs": {"n": {"type": "object", "properties": {"v": {"type": "integer"}, "next": {"$ref": "#/$defs/n"}},
                              "required": ["v"]}}, "$ref": "#/$defs/n"}
    root = compile_schema(linked)
    assert root.shortest == b'{"v":0}' and _takes(root, '{"v":1,"next":{"v":2,"next":{"v":3}}}')
    endless = {"type": "object", "properties": {"loop": {"$ref": "#/$defs/e"}}, "required": ["loop"]}
    root = compile_schema({"$defs": {"e": endless}, "anyOf": [{"$ref": "#/$defs/e"}, {"type": "null"}]})
    assert root.shortest == b"null" and not JsonPrefix(root).feed(b"{")


def test_closings_end_escapes_and_surrogates():
    """Closings that end through loops of references, finish a key's escape the declared key's way, open a container
    past MAX_DEPTH; escaped keys are the keys they read as; \\uD... escapes in a string with a length bound."""
    from dgemma.plugin.json_format import MAX_DEPTH

    nested = {"type": "array", "items": {"anyOf": [{"$ref": "#"}, {"type": "object", "required": ["k"],
                                                                   "properties": {"k": {"type": "object"}}}]}}
    never = {"additionalProperties": {"type": "object", "required": ["x"],
                                      "properties": {"x": {"$ref": "#/additionalProperties"}}}}
    for schema, fed, oracle in (
            # (jsonschema recurses without end on the loop: checked as what it comes to)
            ({"anyOf": [{"$ref": "#"}, {"type": "null"}]}, " ", {"type": "null"}),
            ({"properties": {"a\tb": {"type": "null"}}}, '{"a\\', None),
            ({"properties": {"\u0001": {"type": "null"}}}, '{"\\u00', None),
            (never, "{", None),
            (nested, "[" * (MAX_DEPTH - 1) + "{", None)):
        state = JsonPrefix(compile_schema(schema))
        assert state.feed(fed.encode()), fed
        text = fed + state.close().decode()
        assert _check(oracle or schema, text), text
    root = compile_schema({"properties": {"a": {"type": "integer"}}, "additionalProperties": True})
    assert not _takes(root, '{"\\u0061":"x"}') and not _takes(root, '{"a":1,"\\u0061":2}')
    assert _takes(root, '{"\\u0061":1,"\\u0062":"x"}')
    bounded = compile_schema({"type": "string", "minLength": 2})
    assert not _takes(bounded, '"\\ud83d\\ude00"') and _takes(compile_schema({"type": "string"}), '"\\ud83d\\ude00"')


def test_keys_come_in_any_order_once_and_only_declared_ones():
    root = compile_schema({"type": "object", "properties": {"a": {"type": "integer"}, "ab": {"type": "integer"}},
                           "required": ["ab"]})
    assert _takes(root, '{"ab":1,"a":2}') and _takes(root, '{"a":2,"ab":1}')
    for text in ('{"a":2}', '{"ab":1,"ab":2}', '{"abc":1}', '{"ab":1.5}', '{"ab":1,}'):
        assert not _takes(root, text), text
    state = JsonPrefix(root)
    assert state.feed(b'{"a') and state.closing() == b'":0,"ab":0}'  # (either key: the shorter text)


def _logits(tok, wanted: list[int], length: int, seed: int):
    """Made-up logits: position i ranks wanted[i] first, the rest at random."""
    z = torch.randn(length, tok.vocab_size, generator=torch.Generator().manual_seed(seed))
    for i, t in enumerate(wanted[:length]):
        z[i, t] = 30.0
    return lambda rows: z[rows].clone()


@pytest.fixture(scope="module")
def tok(default_gguf):
    return Engine.load(default_gguf).tokenizer


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_the_read_out_follows_the_schema(tok, name):
    """The model's own document where it writes one (in canvases of 5), and random logits read out into valid
    documents within the budget."""
    schema, docs = SCHEMAS[name]
    root, schema = compile_schema(schema), ORACLE.get(name, schema)
    eos = tok.eos_id
    wanted = tok.encode(_texts(docs[0])[0], parse_special=False)
    state, out = JsonPrefix(root), []
    while eos not in out and len(out) < 400:
        out += read_canvas(_logits(tok, wanted[len(out):], 5, len(out)), 5, state, tok, {eos}, budget=400 - len(out))
    assert tok.decode(out[: out.index(eos)]) == _texts(docs[0])[0]
    for seed in range(4):
        budget = len(tok.encode(root.shortest.decode(), parse_special=False)) + 3 * seed
        state, out = JsonPrefix(root), []
        while eos not in out and len(out) < budget:
            out += read_canvas(_logits(tok, [], 4, 100 + seed * 10 + len(out)), 4, state, tok, {eos}, budget - len(out))
        kept = out[:budget]
        text = tok.decode(kept[: kept.index(eos)] if eos in kept else kept)
        assert _check(schema, text), (budget, text)


def test_the_engine_follows_a_schema(canvas16_gguf):
    engine = Engine.load(canvas16_gguf)
    for seed, max_tokens in ((1, 70), (2, 150)):
        *events, done = engine.generate("A person, in JSON.", GenerateOptions(seed=seed, max_tokens=max_tokens,
                                                                               format=PERSON))
        Person.model_validate_json("".join(e.text for e in events))
        assert done.eval_count <= max_tokens
    least = len(engine.tokenizer.encode(compile_schema(PERSON).shortest.decode(), parse_special=False))
    with pytest.raises(EngineError, match=f"JSON mode needs room for {least} tokens"):
        list(engine.generate("x", GenerateOptions(max_tokens=least - 1, format=PERSON)))
    with pytest.raises(EngineError, match="format: at #: type"):
        list(engine.generate("x", GenerateOptions(format={"type": 5})))


def test_the_server_follows_schemas(server):
    client = ollama.Client(host=server)
    r = client.generate(model="default", prompt="A person.", format=PERSON, options={"seed": 1, "num_predict": 60})
    Person.model_validate_json(r.response)
    c = client.chat(model="default", messages=[{"role": "user", "content": "A person."}], format=Address.model_json_schema(),
                    options={"seed": 2, "num_predict": 30})
    Address.model_validate_json(c.message.content)
    with pytest.raises(ollama.ResponseError, match="format: at #/properties/a: \\$ref"):
        client.chat(model="default", messages=[{"role": "user", "content": "x"}],
                    format={"properties": {"a": {"$ref": "#/nowhere"}}})
    o = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    parsed = o.chat.completions.parse(model="default", messages=[{"role": "user", "content": "A person."}],
                                      response_format=Address, max_tokens=30, seed=3)
    assert isinstance(parsed.choices[0].message.parsed, Address)
    for schema, needle in (({"enum": []}, "at #: enum"), (None, "at #: expected a schema \\(an object\\), got null")):
        with pytest.raises(openai.BadRequestError, match=f"response_format.schema: {needle}"):
            o.chat.completions.create(model="default", messages=[{"role": "user", "content": "x"}], response_format={
                "type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    fmt = {"type": "json_schema", "name": "address", "schema": Address.model_json_schema(), "strict": False}
    resp = o.responses.create(model="default", input="An address.", text={"format": fmt}, max_output_tokens=30)
    Address.model_validate_json(resp.output_text)
    assert resp.text.format.type == "json_schema" and resp.text.format.name == "address"


def test_run_with_a_schema(models, tmp_path):
    """`dgemma run --format` with a schema's file or its text: the reply the engine gives, valid; a bad schema is one
    line naming where."""
    from test_run_cli import run_cli

    engine = Engine.load(models / "default.gguf")
    events = engine.generate("An address", GenerateOptions(seed=4, max_tokens=30, format=Address.model_json_schema()))
    expected = "".join(e.text for e in events if isinstance(e, TextEvent))
    path = tmp_path / "address.json"
    path.write_text(json.dumps(Address.model_json_schema()))
    for fmt in (str(path), path.read_text()):
        proc = run_cli(models, "default", "An address", "--seed", "4", "--max-tokens", "30", "--format", fmt)
        assert proc.returncode == 0 and proc.stdout == expected + "\n", proc.stderr
    Address.model_validate_json(expected)
    bad = run_cli(models, "default", "x", "--format", '{"type": "objekt"}')
    assert bad.returncode != 0 and "--format: at #: type: expected one of" in bad.stderr
    missing = run_cli(models, "default", "x", "--format", str(tmp_path / "nope.json"))
    assert missing.returncode != 0 and "is neither a file nor JSON" in missing.stderr

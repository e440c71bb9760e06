"""JSON schemas for structured output (Ollama's `format: {schema}`, OpenAI's `json_schema` response format), compiled
into the graph of `Node`s that plugin/json_format.py's automaton follows while it reads a canvas out.

Enforced: `type` (one or a list), `properties` / `required` / `additionalProperties`, `items` / `prefixItems` /
`minItems` / `maxItems`, `minLength` / `maxLength`, `enum`, `const`, `anyOf` / `oneOf` (as either alternative),
`allOf` of one schema (a combinator's other constraints beside it apply to each alternative), and `$ref` into the
schema itself ("#", "#/$defs/…", any JSON pointer; recursion included; only annotations beside it). An object's keys
come in any order, each declared one once (an escaped key is the key it reads as); where `properties` are given and
`additionalProperties` is not, no other key is written (as llama.cpp's json-schema-to-grammar; a bare
`{"type": "object"}` takes any keys). `prefixItems` without `items` is a tuple of exactly those. Left to the model
(not enforced): `pattern`, `format`, `minimum` / `maximum`, `multipleOf`, `uniqueItems`, `minProperties` /
`maxProperties`, `not`, `if` / `then` / `else`; `oneOf` is not made to match only one. The strings and numbers of
`enum` and `const` values are written as Python's json.dumps writes them (non-ASCII as it is, 1.0 not 1), those of
another `type` beside them left out. A string with `minLength` or `maxLength` writes no `\\uD...` escape (a surrogate
pair would count as two characters). Refused (SchemaError): what cannot be followed or would never end, `minItems` /
`minLength` over MAX_LOW, a shortest value over MAX_SHORTEST bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

JSON_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
ENFORCED = {"type", "properties", "required", "additionalProperties", "items", "prefixItems", "additionalItems",
            "minItems", "maxItems", "minLength", "maxLength", "enum", "const", "anyOf", "oneOf", "allOf", "$ref"}
MAX_LOW = 1 << 12  # minItems, minLength at most
MAX_SHORTEST = 1 << 16  # bytes: a schema whose shortest value is longer is refused


class SchemaError(ValueError):
    """A schema that cannot be followed; the message names where in it (a JSON pointer) and what was expected."""


@dataclass(eq=False)  # (compared and hashed by identity: the automaton's states hold nodes)
class Node:
    kind: str  # any, object, array, string, number, integer, literal, union
    props: dict[bytes, Node] = field(default_factory=dict)  # object: a key, as written between its quotes → value
    required: tuple[bytes, ...] = ()  # object: keys it must have, in the schema's order
    extra: Node | None = None  # object: the value of any other key (None: no other key)
    prefix: tuple[Node, ...] = ()  # array: its first items
    items: Node | None = None  # array: the items after prefix (None: none)
    low: int = 0  # array: minItems; string: minLength
    high: int | None = None  # array: maxItems; string: maxLength (None: no bound)
    texts: tuple[bytes, ...] = ()  # literal: the JSON texts it may be (an enum's scalars: one node)
    options: tuple[Node, ...] = ()  # union: the alternatives
    best: Node | None = None  # union: the alternative its shortest text is of (closing follows these: they end)
    shortest: bytes | None = None  # the shortest JSON text it takes (None: none, e.g. endlessly recursive)

    def item(self, index: int) -> Node | None:
        """array: the schema of item `index` (None: there is none)."""
        return self.prefix[index] if index < len(self.prefix) else self.items


def literal(*values: Any) -> Node:
    return _literals(json.dumps(v, ensure_ascii=False).encode() for v in values)


def _literals(texts: Any) -> Node:
    texts = tuple(dict.fromkeys(texts))
    return Node("literal", texts=texts, shortest=min(texts, key=len))


def _type_of(value: Any) -> set[str]:
    """The JSON types a value is of."""
    if value is None:
        return {"null"}
    if isinstance(value, bool):
        return {"boolean"}
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return {"integer", "number"}
    return {"number"} if isinstance(value, float) else {"string"} if isinstance(value, str) else \
        {"array"} if isinstance(value, list) else {"object"}


def _types_meet(a: Any, b: Any) -> list[str] | Any:
    """Two `type`s both applying: the types of both (an integer is a number); a malformed one as it is."""
    a, b = ([t] if isinstance(t, str) else t for t in (a, b))
    if not isinstance(a, list) or not isinstance(b, list):
        return a if not isinstance(a, list) else b
    return [t for t in JSON_TYPES if (t in a or (t == "integer" and "number" in a)) and
            (t in b or (t == "integer" and "number" in b))]


ANY = Node("any", shortest=b"null")  # any JSON value
ANY_OBJECT = Node("object", extra=ANY, shortest=b"{}")  # JSON mode: any object
ANY_ARRAY = Node("array", items=ANY, shortest=b"[]")
ANY_STRING = Node("string", shortest=b'""')


def key_text(name: str) -> bytes:
    """A key as a schema's keys are written between quotes (and matched): json.dumps's escapes, UTF-8."""
    return json.dumps(name, ensure_ascii=False)[1:-1].encode(errors="surrogatepass")  # (\\ud800 alone: as it is)


def output_schema(fmt: Any, where: str = "format") -> Node | None:
    """A structured-output ask as the automaton's root: None (free text), "json" (any object: JSON mode), a JSON
    schema (dict or bool), or a Node already compiled."""
    if fmt is None or isinstance(fmt, Node):
        return fmt
    if fmt == "json":
        return ANY_OBJECT
    if isinstance(fmt, (dict, bool)):
        return compile_schema(fmt, where)
    raise SchemaError(f'{where}: expected "json" or a JSON schema (an object), got {json.dumps(fmt)[:40]}')


def compile_schema(schema: Any, where: str = "format") -> Node:
    """The schema's graph of nodes; SchemaError naming where it cannot be followed."""
    c = _Compiler(schema, where)
    try:
        root = c.node(schema, "#")
    except RecursionError:
        raise SchemaError(f"{where}: the schema is nested too deeply") from None
    _shortest(c.nodes)
    for n in c.nodes:  # (other keys whose value never ends: none)
        if n.kind == "object" and n.extra is not None and n.extra.shortest is None:
            n.extra = None
    if root.shortest is None:
        raise SchemaError(f"{where}: no JSON value of at most {MAX_SHORTEST} bytes satisfies the schema (a required "
                          "property or item that always recurses?)")
    return root


class _Compiler:
    def __init__(self, root: Any, where: str):
        self.root, self.where = root, where
        self.refs: dict[str, Node] = {}
        self.nodes: list[Node] = []

    def fail(self, path: str, what: str) -> SchemaError:
        return SchemaError(f"{self.where}: at {path}: {what}")

    def new(self, kind: str, **kw) -> Node:
        n = Node(kind, **kw)
        self.nodes.append(n)
        return n

    def node(self, s: Any, path: str) -> Node:
        if s is True:
            return ANY
        if s is False:
            raise self.fail(path, "the schema false admits no value")
        if not isinstance(s, dict):
            raise self.fail(path, f"expected a schema (an object), got {json.dumps(s)[:40]}")
        types = s.get("type")
        if types is not None:
            types = [types] if isinstance(types, str) else types
            if not isinstance(types, list) or not types or any(t not in JSON_TYPES for t in types):
                raise self.fail(path, f"type: expected one of {', '.join(JSON_TYPES)} or a list of them, "
                                f"got {json.dumps(s['type'])[:40]}")
        if "$ref" in s:
            beside = sorted(ENFORCED & s.keys() - {"$ref"})
            if beside:
                raise self.fail(path, f"$ref with {', '.join(beside)} beside it is not supported (with annotations "
                                "such as title or description: it is)")
            return self.ref(s["$ref"], path)
        if "const" in s or "enum" in s:
            values = [s["const"]] if "const" in s else s["enum"]
            if not isinstance(values, list) or not values:
                raise self.fail(path, "enum: expected a non-empty array")
            if types is not None:
                values = [v for v in values if _type_of(v) & set(_types_meet(types, list(JSON_TYPES)))]
                if not values:
                    raise self.fail(path, f"no {'enum' if 'enum' in s else 'const'} value is of the type beside it")
            return self.union([self.const(v) for v in values])
        for word in ("anyOf", "oneOf", "allOf"):
            if word in s:
                subs = s[word]
                if not isinstance(subs, list) or not subs:
                    raise self.fail(path, f"{word}: expected a non-empty array of schemas")
                if word == "allOf" and len(subs) > 1:
                    raise self.fail(path, "allOf of more than one schema is not supported (of one: it is)")
                beside = {k: v for k, v in s.items() if k in ENFORCED and k != word}
                paths = [f"{path}/{word}/{i}" for i in range(len(subs))]
                alts = [(self.merged(beside, x, p), p) for x, p in zip(subs, paths)]
                alts = [(x, p) for x, p in alts if x is not None]
                if not alts:
                    raise self.fail(path, f"no alternative of {word} is of the type beside it")
                return self.union([self.node(x, p) for x, p in alts])
        if types is None:
            types = ["object"] if {"properties", "additionalProperties", "required"} & s.keys() else \
                ["array"] if {"items", "prefixItems"} & s.keys() else None
        if types is None:
            return ANY
        return self.union([self.typed(t, s, path) for t in types])

    def const(self, value: Any) -> Node:
        """Exactly `value`: an object's or array's structure (whitespace and key order free), a scalar's text."""
        if isinstance(value, dict):
            props = {key_text(k): self.const(v) for k, v in value.items()}
            return self.new("object", props=props, required=tuple(props))
        if isinstance(value, list):
            return self.new("array", prefix=tuple(self.const(v) for v in value), low=len(value))
        return literal(value)

    def merged(self, beside: dict, alt: Any, path: str) -> Any:
        """A combinator's alternative with the constraints beside the combinator (both apply); None: no value can
        be of both types."""
        if not beside or alt is False:
            return alt
        if alt is True:
            return dict(beside)
        if not isinstance(alt, dict):
            return alt  # (refused where it is compiled)
        if "$ref" in alt:
            raise self.fail(path, f"a $ref alternative with {', '.join(sorted(beside))} beside the combinator is not "
                            "supported")
        out = dict(alt)
        for k, v in beside.items():
            w = out.get(k)
            if k not in out or w == v:
                out[k] = v
            elif k == "type":
                out[k] = _types_meet(v, w)
                if not out[k]:
                    return None
            elif k == "required" and isinstance(v, list) and isinstance(w, list):
                out[k] = list(dict.fromkeys(v + w))
            elif k == "properties" and isinstance(v, dict) and isinstance(w, dict) and not v.keys() & w.keys() and \
                    "additionalProperties" not in beside:
                out[k] = {**v, **w}
            else:
                raise self.fail(path, f"{k} both beside the combinator and in its alternative is not supported")
        return out

    def union(self, options: list[Node]) -> Node:
        if len(options) > 1 and all(o.kind == "literal" for o in options):  # an enum's scalars: one node
            return _literals(t for o in options for t in o.texts)
        return options[0] if len(options) == 1 else self.new("union", options=tuple(options))

    def typed(self, t: str, s: dict, path: str) -> Node:
        if t == "null":
            return literal(None)
        if t == "boolean":
            return self.union([literal(True), literal(False)])
        if t in ("number", "integer"):
            return self.new(t)
        if t == "string":
            low, high = self.bounds(s, "minLength", "maxLength", path)
            return self.new("string", low=low, high=high)
        if t == "array":
            return self.array(s, path)
        return self.object(s, path)

    def bounds(self, s: dict, lo: str, hi: str, path: str) -> tuple[int, int | None]:
        for name in (lo, hi):
            v = s.get(name, 0)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise self.fail(path, f"{name}: expected a whole number ≥ 0, got {json.dumps(v)[:40]}")
        low, high = s.get(lo, 0), s.get(hi)
        if low > MAX_LOW:
            raise self.fail(path, f"{lo} {low} is more than dgemma writes ({MAX_LOW})")
        if high is not None and low > high:
            raise self.fail(path, f"{lo} {low} is more than {hi} {high}")
        return low, high

    def array(self, s: dict, path: str) -> Node:
        low, high = self.bounds(s, "minItems", "maxItems", path)
        prefix, items = s.get("prefixItems", []), s.get("items")
        if isinstance(items, list):  # draft 4's tuples
            prefix, items = items, s.get("additionalItems", True)
        if not isinstance(prefix, list):
            raise self.fail(path, "prefixItems: expected an array of schemas")
        if items is None:
            items = False if prefix else True
        n = self.new("array", low=low, high=high)
        n.prefix = tuple(self.node(x, f"{path}/prefixItems/{i}") for i, x in enumerate(prefix))
        n.items = None if items is False else self.node(items, f"{path}/items")
        return n

    def object(self, s: dict, path: str) -> Node:
        props, required = s.get("properties", {}), s.get("required", [])
        if not isinstance(props, dict):
            raise self.fail(path, "properties: expected an object of schemas")
        if not isinstance(required, list) or not all(isinstance(k, str) for k in required):
            raise self.fail(path, "required: expected an array of strings")
        extra = s.get("additionalProperties", False if "properties" in s else True)
        n = self.new("object")
        n.props = {key_text(k): self.node(v, f"{path}/properties/{k}") for k, v in props.items()}
        n.extra = None if extra is False else self.node(extra, f"{path}/additionalProperties")
        for k in required:  # a required key the properties do not give: any value (the extra one's)
            if key_text(k) not in n.props and s.get("additionalProperties") is False:
                raise self.fail(path, f"required property {k!r} is not in properties, and additionalProperties is "
                                "false")
            n.props.setdefault(key_text(k), n.extra or ANY)
        n.required = tuple(dict.fromkeys(key_text(k) for k in required))
        return n

    def ref(self, ref: Any, path: str) -> Node:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise self.fail(path, f"$ref: only references into the schema itself (#/…) are followed, got "
                            f"{json.dumps(ref)[:60]}")
        if ref not in self.refs:
            self.refs[ref] = placeholder = self.new("union")  # (filled below: a reference may recurse)
            target = self.root
            for part in filter(None, ref[1:].split("/")):
                part = part.replace("~1", "/").replace("~0", "~")
                if isinstance(target, dict) and part in target:
                    target = target[part]
                elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                    target = target[int(part)]
                else:
                    raise self.fail(path, f"$ref {ref!r} names nothing in the schema")
            placeholder.options = (self.node(target, ref),)
        return self.refs[ref]


def _shortest(nodes: list[Node]) -> None:
    """Each node's shortest text (of at most MAX_SHORTEST bytes), to a fixed point (references may recurse); a
    union's `best` changes only where its text gets shorter, so that following them always ends."""
    changed = True
    while changed:
        changed = False
        for n in nodes:
            if n.kind == "union":
                best = min((o for o in n.options if o.shortest is not None), key=lambda o: len(o.shortest),
                           default=None)
                text = None if best is None else best.shortest
            else:
                best, text = None, _shortest_of(n)
            if text is not None and len(text) <= MAX_SHORTEST and (n.shortest is None or len(text) < len(n.shortest)):
                n.shortest, n.best, changed = text, best, True


def _shortest_of(n: Node) -> bytes | None:
    if n.kind in ("number", "integer"):
        return b"0"
    if n.kind == "string":
        return b'"' + b" " * n.low + b'"'
    if n.kind == "array":
        items = [n.item(i) for i in range(n.low)]
        texts = [None if i is None else i.shortest for i in items]
        return None if None in texts else b"[" + b",".join(texts) + b"]"
    if n.kind == "object":
        texts = [n.props[k].shortest for k in n.required]
        if None in texts:
            return None
        return b"{" + b",".join(b'"' + k + b'":' + t for k, t in zip(n.required, texts)) + b"}"
    return n.shortest  # (any and literals: given where they are made)

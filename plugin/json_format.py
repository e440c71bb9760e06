"""Structured output on a diffusion canvas: JSON mode (Ollama's `format: "json"`, OpenAI's `json_object`) and JSON
schemas (Ollama's `format: {schema}`, OpenAI's `json_schema`; what of a schema is enforced: plugin/json_schema.py).

An autoregressive runtime masks, token by token, what a grammar does not allow next. A canvas is denoised as a
whole, so the grammar is applied where the canvas is read out: once its denoising is done, its positions are read
left to right from the distribution of its last pass (the one whose argmax the canvas would be, as
plugin/logprobs.py reads it), each taking the most likely of its CANDIDATES tokens that keeps the text so far the
start of a JSON value the schema takes (`JsonPrefix`, on bytes: the structure is ASCII, anything else goes inside
strings; JSON mode's schema: any object). The value complete, the next position ends the reply (an
end-of-generation token). Where none of a position's candidates fits, or the reply's token budget would run out
first, the shortest text that completes the value is written instead (`JsonPrefix.close`). The canvas so read is
what the next canvas is encoded after. So the reply is always such a value (as with llama.cpp's grammars): where
the model writes one, its own tokens. (read_canvas reads out a forced tool call the same way: plugin/call_format.py's
CallPrefix has JsonPrefix's token-level interface.)
"""

from __future__ import annotations

import json
from typing import Any

from dgemma.convert import constants as C

from .json_schema import ANY_ARRAY, ANY_OBJECT, ANY_STRING, Node, key_text, literal
from .logprobs import LOGPROB_ROWS
from .sampler import RowLogits
from .tokenizer import Tokenizer

CANDIDATES = 64  # the most likely tokens of a position tried, in order, before the value is completed instead
WHITESPACE = b" \t\n\r"
MAX_DEPTH = 128  # nested objects and arrays (Python's json.loads gives up near 1000)
MAX_THREADS = 32  # a schema's alternatives followed side by side, at most
MAX_MEMO = 1 << 16  # closings kept (a state's copies share them), at most
SPECIAL = (C.TokenType.CONTROL, C.TokenType.USER_DEFINED)  # tokens that are markup, not text
_NUMBER_END = {"int", "zero", "frac", "exp"}  # number states that may end here
# any value: the node its first byte begins
_ANY_START = {0x7B: ANY_OBJECT, 0x5B: ANY_ARRAY, 0x22: ANY_STRING,
              **dict.fromkeys(b"-0123456789", Node("number", shortest=b"0")),
              **{w.texts[0][0]: w for w in (literal(True), literal(False), literal(None))}}
# a number's state after a character (digits: _NUMBER_DIGIT); states: "", minus, zero, int, dot, frac, e, esign, exp
_NUMBER_NEXT = {("", "-"): "minus", ("", "0"): "zero", ("minus", "0"): "zero", ("zero", "."): "dot",
                ("int", "."): "dot", ("zero", "e"): "e", ("int", "e"): "e", ("frac", "e"): "e", ("e", "-"): "esign",
                ("e", "+"): "esign"}
_NUMBER_DIGIT = {"": "int", "minus": "int", "int": "int", "dot": "frac", "frac": "frac", "e": "exp", "esign": "exp",
                 "exp": "exp"}
_HEX, _ESCAPES = frozenset(b"0123456789abcdefABCDEF"), frozenset(b'"\\/bfnrt')
_QUOTE, _BACKSLASH, _COLON, _COMMA = 0x22, 0x5C, 0x3A, 0x2C
_DONE = ("done",)

# A thread: (frame, the stack under it or None, how many objects and arrays are open). Frames: ("v", node) a value
# to come; ("o", node, phase, declared keys seen, key so far, escape) an object, phase open (after "{"), key (after
# ","), inkey, colon, after (a value); ("a", node, phase, items) an array, phase open or after; ("s", node, escape,
# characters) a string; ("n", integer, state) a number; ("l", rests) a literal (what each text it may be still
# needs); _DONE. Escape: 1 after a backslash, 2..5 the \u's hex digits still to come + 1.
Thread = tuple


class JsonPrefix:
    """Whether bytes so far are the start of a JSON value (RFC 8259) that `schema` takes (default: any object, JSON
    mode), fed a piece at a time. A nondeterministic pushdown automaton: each thread is a stack of frames, one per
    value being written; a schema's alternatives (anyOf, a list of types) are threads side by side."""

    def __init__(self, schema: Node | None = None):
        self.schema = schema or ANY_OBJECT
        self.threads: list[Thread] = [(("v", self.schema), None, 0)]
        self.started = False  # a byte other than whitespace taken
        self.pending: list[int] = []  # read_canvas: closing tokens fed here, for the next canvas
        # thread → its closing and the thread then: a thread's stack under its top frame is the one the positions
        # before it closed through, so each closing walks only what changed
        self.memo: dict[Thread, tuple[bytes, Thread]] = {}

    def copy(self) -> "JsonPrefix":
        c = JsonPrefix.__new__(JsonPrefix)  # (threads are never changed in place: shared)
        c.schema, c.threads, c.started, c.pending, c.memo = self.schema, self.threads, self.started, [], self.memo
        return c

    @property
    def complete(self) -> bool:
        return any(t[0] is _DONE for t in self.threads)

    def feed(self, data: bytes) -> bool:
        """Take data; False (the state then as it was) where it cannot go on a value the schema takes."""
        threads, started = self.threads, self.started
        for b in data:
            after = dict.fromkeys(u for t in threads for u in _step(t, b))
            if not after:
                return False
            threads, started = list(after)[:MAX_THREADS], started or b not in WHITESPACE
        self.threads, self.started = threads, started
        return True

    @property
    def at_key(self) -> bool:
        """Where an object's key may begin (after its "{" or a ",")."""
        return any(t[0][0] == "o" and t[0][2] in ("open", "key") for t in self.threads)

    # ---- a token at a time (read_canvas's interface, shared with plugin/call_format.py's CallPrefix) ----------
    def take(self, token: int, tok: Tokenizer) -> bool:
        """Take a token where it is text (no special token) that goes on with the value."""
        return tok.types[token] not in SPECIAL and self.feed(tok.decode_bytes([token]))

    def after(self, token: int, tok: Tokenizer) -> "JsonPrefix | None":
        """A copy that took `token`, or None where it does not go on."""
        trial = self.copy()
        return trial if trial.take(token, tok) else None

    def close_ids(self, tok: Tokenizer) -> list[int]:
        """close(), as tokens."""
        return tok.encode(self.close().decode(), parse_special=False)

    def closing(self) -> bytes:
        """The shortest bytes that complete the value from here (one thread's; none of them may be the shortest)."""
        return min((_closing(t, self.memo)[0] for t in self.threads), key=len)

    def close(self) -> bytes:
        """closing(), taken: the value is complete."""
        text, done = min((_closing(t, self.memo) for t in self.threads), key=lambda c: len(c[0]))
        self.threads, self.started = [done], True
        return text


def _step(t: Thread, b: int, deep: int = MAX_DEPTH) -> list[Thread]:
    """The threads a thread becomes on byte b (none: b does not go on it); deep: the objects and arrays open at
    most."""
    frame, parent, depth = t
    kind = frame[0]
    if kind == "s":
        return _string(t, b)
    if kind == "o" and frame[2] == "inkey":
        return _key(t, b)
    if kind == "n":
        state = _number(frame[1], frame[2], b)
        if state is not None:
            return [(("n", frame[1], state), parent, depth)]
        return _step(_finish(parent), b, deep) if frame[2] in _NUMBER_END else []
    if kind == "l":
        return _literal(frame[1], b, parent, depth)
    if b in WHITESPACE:
        return [t]
    if kind == "v":
        return _value(frame[1], parent, depth, b, set(), deep)
    if kind == "o":
        return _object(t, b)
    if kind == "a":
        return _array(t, b, deep)
    return []  # done


def _finish(parent: Thread | None) -> Thread:
    """The thread once a value is complete, on the stack under it."""
    if parent is None:
        return (_DONE, None, 0)
    frame, under, depth = parent
    if frame[0] == "a":
        return (("a", frame[1], "after", frame[3] + 1), under, depth)
    return parent  # an object: after its value already


def _value(node: Node, parent: Thread | None, depth: int, b: int, seen: set, deep: int) -> list[Thread]:
    """A value of `node` starting with byte b."""
    kind = node.kind
    if node.shortest is None:  # (nothing that ends: not begun)
        return []
    if kind == "union":
        if node in seen:  # (an alternative that is itself, through references)
            return []
        seen.add(node)
        return [u for o in node.options for u in _value(o, parent, depth, b, seen, deep)]
    if kind == "any":
        sub = _ANY_START.get(b)
        return [] if sub is None else _value(sub, parent, depth, b, seen, deep)
    if kind == "object":
        return [(("o", node, "open", frozenset(), b"", 0), parent, depth + 1)] if b == 0x7B and depth < deep \
            else []
    if kind == "array":
        return [(("a", node, "open", 0), parent, depth + 1)] if b == 0x5B and depth < deep else []
    if kind == "string":
        return [(("s", node, 0, 0), parent, depth)] if b == _QUOTE else []
    if kind in ("number", "integer"):
        state = _number(kind == "integer", "", b)
        return [] if state is None else [(("n", kind == "integer", state), parent, depth)]
    return _literal(node.texts, b, parent, depth)


def _literal(texts: tuple[bytes, ...], b: int, parent: Thread | None, depth: int) -> list[Thread]:
    """Byte b of one of a literal's texts: the value complete (where one of them ends), or going on."""
    rests = tuple(t[1:] for t in texts if t[0] == b)
    going = tuple(r for r in rests if r)
    return ([_finish(parent)] if b"" in rests else []) + ([(("l", going), parent, depth)] if going else [])


def _keys_left(node: Node, seen: frozenset) -> list[bytes]:
    """An object's declared keys it has not had (and can have: their values end)."""
    return [k for k, v in node.props.items() if k not in seen and v.shortest is not None]


def _more_keys(node: Node, seen: frozenset) -> bool:
    return node.extra is not None or bool(_keys_left(node, seen))


def _other_key(node: Node, key: bytes) -> bytes:
    """What makes `key` (so far, no escape open) one of an object's other keys: nothing, or an underscore or more
    where it is a declared one (had already)."""
    end = b""
    while _canonical(key + end) in node.props:
        end += b"_"
    return end


def _canonical(key: bytes) -> bytes:
    """A key as the schema's keys are written (json_schema.key_text): its escapes read (\\u0061 is a)."""
    if b"\\" not in key:
        return key
    try:
        return key_text(json.loads(b'"' + key + b'"'))
    except ValueError:  # (a character cut by a byte token, before the escape)
        return key


def _object(t: Thread, b: int) -> list[Thread]:
    (_, node, phase, seen, key, escape), parent, depth = t
    if phase == "colon":
        if b != _COLON:
            return []
        value = node.props[key] if key in node.props else node.extra
        return [(("v", value), (("o", node, "after", seen, b"", 0), parent, depth), depth)]
    if b == ord("}") and phase in ("open", "after"):
        return [_finish(parent)] if all(k in seen for k in node.required) else []
    if (b == _COMMA and phase == "after") or (b == _QUOTE and phase in ("open", "key")):
        ok = _more_keys(node, seen)
        return [(("o", node, "key" if b == _COMMA else "inkey", seen, b"", 0), parent, depth)] if ok else []
    return []


def _key(t: Thread, b: int) -> list[Thread]:
    """A byte of an object's key: one it has not had of its declared keys, or (where it takes others) any other."""
    (_, node, _, seen, key, escape), parent, depth = t
    if escape == 0 and b == _QUOTE:
        key = _canonical(key)
        if key in node.props:
            if key in seen or node.props[key].shortest is None:
                return []
            seen = seen | {key}
        elif node.extra is None:
            return []
        return [(("o", node, "colon", seen, key, 0), parent, depth)]
    escape = _escape(escape, b)
    key += bytes([b])
    if escape is None or (node.extra is None and not any(k.startswith(key) for k in _keys_left(node, seen))):
        return []
    return [(("o", node, "inkey", seen, key, escape), parent, depth)]


def _array(t: Thread, b: int, deep: int) -> list[Thread]:
    (_, node, phase, count), parent, depth = t
    if b == ord("]"):
        return [_finish(parent)] if count >= node.low else []
    if phase == "after" and b != _COMMA:
        return []
    item = _next_item(node, count)
    if item is None:
        return []
    under = (("a", node, "after", count), parent, depth)
    return [(("v", item), under, depth)] if phase == "after" else _value(item, under, depth, b, set(), deep)


def _next_item(node: Node, count: int) -> Node | None:
    """An array's item after `count` of them, where it may have one more."""
    item = None if node.high is not None and count >= node.high else node.item(count)
    return item if item is not None and item.shortest is not None else None


def _escape(escape: int, b: int) -> int | None:
    """A string's escape state after byte b (not its closing quote); None: b cannot be there."""
    if escape == 1:
        return 5 if b == ord("u") else 0 if b in _ESCAPES else None
    if escape > 1:
        return (0 if escape == 2 else escape - 1) if b in _HEX else None
    if b == _BACKSLASH:
        return 1
    return 0 if b >= 0x20 else None  # control characters must be escaped


def _string(t: Thread, b: int) -> list[Thread]:
    (_, node, escape, n), parent, depth = t
    if escape == 0 and b == _QUOTE:
        return [_finish(parent)] if n >= node.low else []
    after = _escape(escape, b)
    if after is None or (escape == 5 and b in b"dD" and (node.low or node.high is not None)):  # (\uD...: a
        return []  # surrogate pair would count as two characters)
    if escape == 0 and b & 0xC0 != 0x80:  # a character starts (an escape is one)
        n += 1
        if node.high is not None and n > node.high:
            return []
    return [(("s", node, after, n), parent, depth)]


def _number(integer: bool, s: str, b: int) -> str | None:
    """A number's state after byte b, or None where b does not go on it (an integer: no fraction, no exponent)."""
    state = _NUMBER_NEXT.get((s, chr(b).lower()))
    if state is not None:
        return None if integer and state in ("dot", "e") else state
    return _NUMBER_DIGIT.get(s) if 0x30 <= b <= 0x39 else None


def _escape_end(escape: int) -> bytes:
    return {0: b"", 1: b"n"}.get(escape, b"0" * (escape - 1))


def _closing(t: Thread, memo: dict[Thread, tuple[bytes, Thread]]) -> tuple[bytes, Thread]:
    """The shortest text that completes one thread's value (each frame finished the shortest way, top down), and
    the thread then; memo: the closings of threads met before (those on the way are added)."""
    out, way = b"", []
    while True:
        if t in memo:
            text, done = memo[t]
            out += text
            break
        frame, parent, depth = t
        kind = frame[0]
        if frame is _DONE:
            done = t
            break
        way.append((t, len(out)))
        if kind == "n" and frame[2] in _NUMBER_END:  # a number ends where it is
            t = _finish(parent)
            continue
        if kind == "v" and frame[1].kind == "union":  # the alternative with the shortest text
            t = (("v", frame[1].best), parent, depth)
            continue
        if kind == "a" and frame[2] == "open" and frame[3] < frame[1].low:  # the first item, as "[" and it would
            t = (("v", frame[1].item(0)), (("a", frame[1], "after", 0), parent, depth), depth)
            continue
        piece = _piece(frame)
        for b in piece:  # (a piece goes on one way, the value complete first where a literal may end or go on; it
            t = _step(t, b, deep=1 << 30)[0]  # may open a container at MAX_DEPTH: json.loads takes a few more)
        out += piece
    if len(memo) > MAX_MEMO:
        memo.clear()
    memo.update((u, (out[at:], done)) for u, at in way)
    return out, done


def _piece(frame: tuple) -> bytes:
    """The next bytes towards finishing a thread's top frame."""
    kind = frame[0]
    if kind == "v":
        node = frame[1]
        return node.shortest[:1] if node.kind in ("object", "array", "string") else node.shortest
    if kind == "s":
        return _escape_end(frame[2]) + b" " * max(0, frame[1].low - frame[3]) + b'"'
    if kind == "n":
        return b"0"
    if kind == "l":
        return min(frame[1], key=len)
    if kind == "a":
        return b"," if frame[2] == "after" and frame[3] < frame[1].low else b"]"
    _, node, phase, seen, key, escape = frame
    if phase == "colon":
        return b":"
    if phase == "inkey":  # (a declared key's rest finishes an escape the declared way)
        ends = [(k[len(key):], node.props[k]) for k in _keys_left(node, seen) if k.startswith(key)]
        if node.extra is not None:
            end = _escape_end(escape)
            ends.append((end + _other_key(node, key + end), node.extra))
        return min(ends, key=lambda e: len(e[0]) + len(e[1].shortest))[0] + b'"'
    missing = [k for k in node.required if k not in seen]
    if phase in ("open", "after"):
        if not missing:
            return b"}"
        return (b"," if phase == "after" else b"") + b'"' + missing[0] + b'":'
    if missing:  # after a comma
        return b'"' + missing[0] + b'":'
    keys = [(k, node.props[k]) for k in _keys_left(node, seen)]
    if node.extra is not None:
        keys.append((_other_key(node, b""), node.extra))
    return b'"' + min(keys, key=lambda e: len(e[0]) + len(e[1].shortest))[0] + b'":'


def read_canvas(logits: RowLogits, length: int, state: Any, tok: Tokenizer, eog: set[int],
                budget: int, argmax: list[int] | None = None) -> list[int]:
    """A finished canvas of `length` positions read out as the next part of a JSON value (state: the reply's so far,
    advanced; or call_format.CallPrefix), from the logits of its last pass. At most `budget` tokens count (the
    reply's max_tokens left): a token is taken only where the text that would complete the value after it still
    fits (one token per byte at most). Once the value is complete the rest is an end-of-generation token (the engine cuts there); closing tokens
    past the canvas's end go first in the next one (state.pending). argmax: the canvas as denoised; where the value
    has not begun and a later position of it begins one, what comes before (a code fence, a sentence) is read as
    whitespace, so that the value starts where the model starts it (not at a lower-ranked "{" that shifts it)."""
    end = min(eog) if eog else tok.eos_id
    out, state.pending = state.pending[:length], state.pending[length:]
    start = len(out)
    opens = _opening(argmax, start, state, tok) if argmax is not None else None
    while start < length and not state.complete:
        rows = logits(slice(start, min(length, start + LOGPROB_ROWS)))  # [r, V]
        for ranked in rows.topk(min(CANDIDATES, rows.shape[-1]), dim=-1).indices.tolist():
            pick = None
            if opens is not None and len(out) < opens and not state.started and \
                    1 + len(state.closing()) <= budget - len(out):  # (room for it and the shortest value)
                pick = _whitespace(ranked, state, tok)
            pick = pick if pick is not None else _choose(ranked, state, tok, eog, budget - len(out))
            if pick is None:  # nothing fits: complete the value here
                closing = state.close_ids(tok)
                out, state.pending = out + closing[: length - len(out)], closing[length - len(out):]
            elif pick in eog:  # the value may end where it is (a number at the root): the reply does
                state.close()
            else:
                out.append(pick)
                state.take(pick, tok)
            if state.complete:
                break
        start = len(out)
    if state.complete and not state.pending:
        out += [end] * (length - len(out))
    return out


def _opening(argmax: list[int], start: int, state: JsonPrefix, tok: Tokenizer) -> int | None:
    """Where the value has not begun: the first position from `start` whose denoised token begins it, or None."""
    if state.started:
        return None
    for p in range(start, len(argmax)):
        trial = state.after(argmax[p], tok)
        if trial is not None and trial.started:
            return p
    return None


def _whitespace(ranked: list[int], state: JsonPrefix, tok: Tokenizer) -> int | None:
    """Before the value begins: the position's own token where it fits (whitespace), else its most likely
    whitespace token, else a newline."""
    if state.after(ranked[0], tok) is not None:
        return ranked[0]
    for t in ranked:
        data = tok.decode_bytes([t])
        if tok.types[t] not in SPECIAL and data and all(b in WHITESPACE for b in data):
            return t
    newline = tok.encode("\n", parse_special=False)
    return newline[0] if len(newline) == 1 else None


def _choose(ranked: list[int], state: JsonPrefix, tok: Tokenizer, eog: set[int], room: int) -> int | None:
    """The first of a position's ranked tokens that goes on with the value and leaves room (tokens) for the text
    that would complete it then (no other special token; an end of generation only where the value may end there,
    as a number at the root may), or None."""
    for t in ranked:
        if t in eog:
            if state.closing() == b"":
                return t
            continue
        trial = state.after(t, tok)
        if trial is not None and 1 + len(b"" if trial.complete else trial.closing()) <= room:
            return t
    return None


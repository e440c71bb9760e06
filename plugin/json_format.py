"""JSON mode (Ollama's `format: "json"`, OpenAI's `response_format: {"type": "json_object"}`) on a diffusion canvas.

An autoregressive runtime masks, token by token, what a grammar does not allow next. A canvas is denoised as a
whole, so the grammar is applied where the canvas is read out: once its denoising is done, its positions are read
left to right from the distribution of its last pass (the one whose argmax the canvas would be, as
plugin/logprobs.py reads it), each taking the most likely of its CANDIDATES tokens that keeps the text so far the
start of a JSON object (`JsonPrefix`, on bytes: the structure is ASCII, anything else goes inside strings). The
object closed, the next position ends the reply (an end-of-generation token). Where none of a position's candidates
fits, or the reply's token budget would run out first, the shortest text that closes the object is written
instead (`JsonPrefix.closing`). The canvas so read is what the next canvas is encoded after. So the reply is always
a JSON object (as llama.cpp's json grammar, whose root is an object): where the model writes one, its own tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dgemma.convert import constants as C

from .logprobs import LOGPROB_ROWS
from .sampler import RowLogits
from .tokenizer import Tokenizer

CANDIDATES = 64  # the most likely tokens of a position tried, in order, before the object is closed instead
WHITESPACE = b" \t\n\r"
MAX_DEPTH = 128  # nested objects and arrays (Python's json.loads gives up near 1000)
SPECIAL = (C.TokenType.CONTROL, C.TokenType.USER_DEFINED)  # tokens that are markup, not text
_NUMBER_END = {"int", "zero", "frac", "exp"}  # number states that may end here


@dataclass
class JsonPrefix:
    """Whether bytes so far are the start of one JSON object (RFC 8259), fed a piece at a time."""

    mode: str = "start"  # start, value, first (value or "]"), key_or_close, key, colon, after, string, number, literal, done
    stack: list[str] = field(default_factory=list)  # "{" / "[" of the open containers
    key: bool = False  # the string is an object's key
    escape: int = 0  # in a string: 1 after a backslash, 2..5 the \u's hex digits still to come + 1
    number: str = ""  # in a number: minus, zero, int, dot, frac, e, esign, exp
    rest: bytes = b""  # in a literal: what it still needs
    pending: list[int] = field(default_factory=list)  # read_canvas: closing tokens fed here, for the next canvas

    def copy(self) -> "JsonPrefix":
        return JsonPrefix(self.mode, list(self.stack), self.key, self.escape, self.number, self.rest)  # (no pending)

    @property
    def complete(self) -> bool:
        return self.mode == "done"

    def feed(self, data: bytes) -> bool:
        """Take data; False (and the state is then not to be used) where it cannot go on a JSON object."""
        return all(self._byte(b) for b in data)

    def _byte(self, b: int) -> bool:
        c = bytes([b])
        m = self.mode
        if m == "string":
            return self._string(b)
        if m == "number":
            if self._number(c):
                return True
            if self.number not in _NUMBER_END:
                return False
            self.mode = "after"
            return self._byte(b)
        if m == "literal":
            if c != self.rest[:1]:
                return False
            self.rest = self.rest[1:]
            if not self.rest:
                self.mode = "after"
            return True
        if c in WHITESPACE:
            return True
        if m == "done":
            return False
        if m == "start":
            return c == b"{" and self._open(c)
        if m in ("value", "first"):
            if m == "first" and c == b"]":
                return self._close(c)
            return self._value(c)
        if m in ("key_or_close", "key"):
            if m == "key_or_close" and c == b"}":
                return self._close(c)
            if c != b'"':
                return False
            self.mode, self.key, self.escape = "string", True, 0
            return True
        if m == "colon":
            if c != b":":
                return False
            self.mode = "value"
            return True
        # after a value
        if c == b",":
            self.mode = "key" if self.stack[-1] == "{" else "value"
            return True
        return c in b"}]" and self._close(c)

    def _open(self, c: bytes) -> bool:
        if len(self.stack) >= MAX_DEPTH:
            return False
        self.stack.append(c.decode())
        self.mode = "key_or_close" if c == b"{" else "first"
        return True

    def _close(self, c: bytes) -> bool:
        if not self.stack or self.stack[-1] != {b"}": "{", b"]": "["}[c]:
            return False
        self.stack.pop()
        self.mode = "after" if self.stack else "done"
        return True

    def _value(self, c: bytes) -> bool:
        if c in b"{[":
            return self._open(c)
        if c == b'"':
            self.mode, self.key, self.escape = "string", False, 0
            return True
        if c == b"-" or c.isdigit():
            self.mode, self.number = "number", ""
            return self._number(c)
        for word in (b"true", b"false", b"null"):
            if c == word[:1]:
                self.mode, self.rest = "literal", word[1:]
                return True
        return False

    def _string(self, b: int) -> bool:
        if self.escape == 1:
            if bytes([b]) == b"u":
                self.escape = 5
                return True
            self.escape = 0
            return bytes([b]) in b'"\\/bfnrt'
        if self.escape > 1:
            self.escape = 0 if self.escape == 2 else self.escape - 1
            return bytes([b]) in b"0123456789abcdefABCDEF"
        if b == 0x5C:  # backslash
            self.escape = 1
            return True
        if b == 0x22:  # the closing quote
            self.mode = "colon" if self.key else "after"
            return True
        return b >= 0x20  # control characters must be escaped

    def _number(self, c: bytes) -> bool:
        digit, s = c.isdigit(), self.number
        nxt = {("", "-"): "minus", ("", "0"): "zero", ("minus", "0"): "zero", ("zero", "."): "dot", ("int", "."): "dot",
               ("zero", "e"): "e", ("int", "e"): "e", ("frac", "e"): "e", ("e", "-"): "esign", ("e", "+"): "esign"}
        key = c.decode("latin-1").lower() if c in b"eE" else c.decode("latin-1")
        if (s, key) in nxt:
            self.number = nxt[(s, key)]
            return True
        if digit:
            step = {"": "int", "minus": "int", "int": "int", "dot": "frac", "frac": "frac", "e": "exp", "esign": "exp",
                    "exp": "exp"}.get(s)
            if step:
                self.number = step
                return True
        return False

    def closing(self) -> bytes:
        """The shortest bytes that complete the object from here."""
        out = b""
        if self.mode == "string":
            out += {0: b"", 1: b"n"}.get(self.escape, b"0" * (self.escape - 1)) + b'"' + (b":null" if self.key else b"")
        elif self.mode == "number" and self.number not in _NUMBER_END:
            out += b"0"
        elif self.mode == "literal":
            out += self.rest
        elif self.mode == "start":
            return b"{}"
        elif self.mode == "colon":
            out += b":null"
        elif self.mode == "value":
            out += b"null"
        elif self.mode == "key":
            out += b'"":null'
        return out + b"".join(b"}" if c == "{" else b"]" for c in reversed(self.stack))


def read_canvas(logits: RowLogits, length: int, state: JsonPrefix, tok: Tokenizer, eog: set[int],
                budget: int, argmax: list[int] | None = None) -> list[int]:
    """A finished canvas of `length` positions read out as the next part of a JSON object (state: the reply's so far,
    advanced), from the logits of its last pass. At most `budget` tokens count (the reply's max_tokens left): a
    token is taken only where the text that would close the object after it still fits (one token per byte at most).
    Once the object is closed the rest is an end-of-generation token (the engine cuts there); closing tokens past
    the canvas's end go first in the next one (state.pending). argmax: the canvas as denoised; where the object is
    not open yet and a later position of it opens one, what comes before (a code fence, a sentence) is read as
    whitespace, so that the object starts where the model starts it (not at a lower-ranked "{" that shifts it)."""
    end = min(eog) if eog else tok.eos_id
    out, state.pending = state.pending[:length], state.pending[length:]
    start = len(out)
    opens = _opening(argmax, start, state, tok) if argmax is not None else None
    while start < length and not state.complete:
        rows = logits(slice(start, min(length, start + LOGPROB_ROWS)))  # [r, V]
        for ranked in rows.topk(min(CANDIDATES, rows.shape[-1]), dim=-1).indices.tolist():
            pick = None
            if opens is not None and len(out) < opens and state.mode == "start" and \
                    1 + len(state.closing()) <= budget - len(out):  # (room for it and "{}")
                pick = _whitespace(ranked, state, tok)
            pick = pick if pick is not None else _choose(ranked, state, tok, eog, budget - len(out))
            if pick is None:  # nothing fits: close the object here
                closing_text = state.closing()
                closing = tok.encode(closing_text.decode(), parse_special=False)
                state.feed(closing_text)
                out, state.pending = out + closing[: length - len(out)], closing[length - len(out):]
            else:
                out.append(pick)
                state.feed(tok.decode_bytes([pick]))
            if state.complete:
                break
        start = len(out)
    if state.complete and not state.pending:
        out += [end] * (length - len(out))
    return out


def _opening(argmax: list[int], start: int, state: JsonPrefix, tok: Tokenizer) -> int | None:
    """Where the object is not open yet: the first position from `start` whose denoised token opens it, or None."""
    if state.mode != "start":
        return None
    for p in range(start, len(argmax)):
        trial = _after(state, argmax[p], tok)
        if trial is not None and trial.mode != "start":
            return p
    return None


def _whitespace(ranked: list[int], state: JsonPrefix, tok: Tokenizer) -> int | None:
    """Before the object opens: the position's own token where it fits (whitespace), else its most likely
    whitespace token, else a newline."""
    if _after(state, ranked[0], tok) is not None:
        return ranked[0]
    for t in ranked:
        data = tok.decode_bytes([t])
        if tok.types[t] not in SPECIAL and data and all(b in WHITESPACE for b in data):
            return t
    newline = tok.encode("\n", parse_special=False)
    return newline[0] if len(newline) == 1 else None


def _choose(ranked: list[int], state: JsonPrefix, tok: Tokenizer, eog: set[int], room: int) -> int | None:
    """The first of a position's ranked tokens that goes on with the object and leaves room (tokens) for the text
    that would close it then (no end of generation before it is closed, no other special token), or None."""
    for t in ranked:
        trial = None if t in eog else _after(state, t, tok)
        if trial is not None and 1 + len(b"" if trial.complete else trial.closing()) <= room:
            return t
    return None


def _after(state: JsonPrefix, token: int, tok: Tokenizer) -> JsonPrefix | None:
    """The state after `token` where it is text (no special token) that goes on with the object, else None."""
    trial = state.copy()
    return trial if tok.types[token] not in SPECIAL and trial.feed(tok.decode_bytes([token])) else None

"""Forced tool calls: OpenAI's `tool_choice` "required" or a named function (and the Responses API's), on a
diffusion canvas.

The reply is then one call or more, each `<|tool_call>call:NAME{key:value,...}<tool_call|>` in Gemma 4's call
syntax (plugin/reply.py reads it): keys bare (or between `<|"|>` tokens), strings between `<|"|>` tokens and written
as they are (no escapes), numbers, booleans, null, lists and objects as in JSON. Two things make it so:

- the prompt ends with the call's opening, `<|tool_call>call:` (and `NAME{` where one function may be called): the
  model denoises its canvas knowing it writes a call's arguments (`CallFormat.prefill`);
- the canvas is read out as plugin/json_format.py reads a JSON value (`read_canvas`), each position's most likely
  token that keeps the call the start of one the tools take (`CallPrefix`): the name one of theirs, the arguments
  a value of its `parameters` schema (plugin/json_schema.py: what of a schema is enforced). The arguments are
  followed by a JSON automaton (`JsonPrefix`) fed the JSON they read as: a string's `<|"|>` as `"`, its text
  escaped, a bare key quoted. Where no candidate fits, or the budget would run out, the shortest rest of the call
  is written (its keys and strings between `<|"|>` tokens), then `<tool_call|>`. After a call: another
  `<|tool_call>` (parallel calls) or the end of the generation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from dgemma.convert import constants as C

from .json_format import JsonPrefix
from .json_schema import Node, SchemaError, compile_schema
from .tokenizer import Tokenizer

CALL = b"call:"  # a call's text begins with it, then NAME{
OUT, STR, BARE = "out", "string", "bare key"  # where in the arguments: between values, in a <|"|> string, in a bare key
PREFIX, NAME, ARGS, AFTER, DONE = "prefix", "name", "arguments", "after", "done"  # a call's phases (ARGS: to its
# <tool_call|>)
_BARE_STOP = frozenset(b'{}[],:"') | frozenset(range(0x20)) - frozenset(b"\t\n\r")  # bytes no bare key has
_SPACE = frozenset(b" \t\n\r")  # (a bare key neither begins nor ends with them: the parser strips them)
_ESCAPED = {b: json.dumps(chr(b))[1:-1].encode() for b in range(0x80)}  # a string's byte as JSON writes it
_QUOTE = None  # in a closing's pieces: the <|"|> token
_QUOTE_TEXT = C.TOOL_QUOTE.encode()


@dataclass(frozen=True, eq=False)
class CallFormat:
    """GenerateOptions.format for a forced call: the functions that may be called (name → its compiled
    `parameters`); parallel: more than one call may come."""
    tools: tuple[tuple[str, Node], ...]
    parallel: bool = True

    @property
    def prefill(self) -> str:
        """What the prompt ends with: the call opened, and its name where there is one function."""
        one = self.tools[0][0] + "{" if len(self.tools) == 1 else ""
        return C.TOOL_CALL_START + CALL.decode() + one

    @cached_property
    def shortest(self) -> tuple[tuple[bytes, list[bytes | None]], ...]:
        """Per function: `NAME{` and the shortest rest of its call (CallPrefix._pieces), worked out once."""
        out = []
        for name, params in self.tools:
            fresh = JsonPrefix(params)
            fresh.feed(b"{")
            out.append((name.encode() + b"{", _dialect(fresh.closing(), OUT)))
        return tuple(out)

    def start(self, tok: Tokenizer) -> "CallPrefix":
        return CallPrefix(self, tok)

    def least(self, tok: Tokenizer) -> tuple[int, str]:
        """The fewest tokens a reply can be, and its text (the shortest call)."""
        state = self.start(tok)
        ids = state.close_ids(tok)
        return len(ids), tok.decode(ids)


def call_format(tools: list[dict[str, Any]], choice: Any, parallel: bool | None = None,
                where: str = "tool_choice") -> CallFormat | None:
    """A request's tool_choice (OpenAI's: "none", "auto", "required", {"type": "function", "function": {"name":
    ...}}; the Responses API's {"type": "function", "name": ...} and {"type": "allowed_tools", "mode": ..., "tools":
    [...]}) over its checked tools (chat completion shapes) as a forced call, or None (free: "auto", "none",
    absent). SchemaError: a choice that names no tool of the request's, a function's parameters that cannot be
    followed."""
    if choice in (None, "auto", "none"):
        return None
    names = [t["function"]["name"] for t in tools or []]
    if choice == "required":
        wanted = names
    elif isinstance(choice, dict) and choice.get("type") == "function":
        fn = choice.get("function") if isinstance(choice.get("function"), dict) else choice
        wanted = [fn.get("name")]
    elif isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        if choice.get("mode", "auto") == "auto":
            return None
        allowed = choice.get("tools")
        if choice.get("mode") != "required" or not isinstance(allowed, list):
            raise SchemaError(f"{where}: allowed_tools expects mode 'auto' or 'required' and a list of tools")
        wanted = [(t.get("function") or t).get("name") if isinstance(t, dict) else None for t in allowed]
    else:
        raise SchemaError(f"{where}: expected 'none', 'auto', 'required' or a function "
                          f'({{"type": "function", "function": {{"name": ...}}}}), got {json.dumps(choice)[:60]}')
    if not names:
        raise SchemaError(f"{where}: {json.dumps(choice)[:60]} needs tools to call (the request has none)")
    unknown = [n for n in wanted if n not in names]
    if unknown or not wanted:
        raise SchemaError(f"{where}: no function {json.dumps(unknown[0] if unknown else None)} among the request's "
                          f"tools ({', '.join(names)})")
    out = []
    for i, name in enumerate(names):
        if name in wanted:
            params = tools[i]["function"].get("parameters") or {"type": "object"}
            out.append((name, _arguments(params, f"tools[{i}].function.parameters")))
    return CallFormat(tuple(out), parallel is not False)


def _arguments(params: Any, where: str) -> Node:
    """A function's parameters, compiled; an object's schema (the arguments are one)."""
    node = compile_schema(params, where)
    if not JsonPrefix(node).feed(b"{"):
        raise SchemaError(f"{where}: expected the schema of an object (a function's arguments are one)")
    return node


class CallPrefix:
    """Whether the tokens so far (after CallFormat.prefill) go on to calls the format takes; read_canvas's state
    (the interface JsonPrefix has: take, after, closing, close_ids, complete, started, pending)."""

    def __init__(self, fmt: CallFormat, tok: Tokenizer) -> None:
        self.fmt, self.started, self.pending = fmt, True, []
        self.quote, self.open, self.end = (tok.ids[t] for t in (C.TOOL_QUOTE, C.TOOL_CALL_START, C.TOOL_CALL_END))
        self.phase, self.text, self.args, self.mode, self.space, self.tail = NAME, b"", None, OUT, False, b""
        if len(fmt.tools) == 1:  # (the prefill named it)
            self._begin(fmt.tools[0][1])

    def _begin(self, params: Node) -> None:
        self.phase, self.text, self.args, self.mode = ARGS, b"", JsonPrefix(params), OUT
        self.args.feed(b"{")

    def copy(self) -> "CallPrefix":
        c = CallPrefix.__new__(CallPrefix)
        c.__dict__.update(self.__dict__)
        c.pending = []
        if self.args is not None:
            c.args = self.args.copy()
        return c

    @property
    def complete(self) -> bool:
        return self.phase == DONE

    # ---- taking tokens -----------------------------------------------------------------------------------
    def take(self, token: int, tok: Tokenizer) -> bool:
        """Take a token where it goes on with the calls (the state then as it was where it does not)."""
        trial = self.after(token, tok)
        if trial is None:
            return False
        self.__dict__.update({k: v for k, v in trial.__dict__.items() if k != "pending"})
        return True

    def after(self, token: int, tok: Tokenizer) -> "CallPrefix | None":
        t = self.copy()
        if token == self.quote:
            ok = t._quote()
        elif token == self.end:
            ok = t.phase == ARGS and t.mode == OUT and t.args.complete
            t.phase = AFTER if ok else t.phase
        elif token == self.open:
            ok = t.phase == AFTER and self.fmt.parallel
            t.phase, t.text = PREFIX, b""
        elif tok.types[token] in (C.TokenType.CONTROL, C.TokenType.USER_DEFINED):
            ok = False
        else:
            data = tok.decode_bytes([token])
            ok = bool(data) and all(t._byte(b) for b in data)
        return t if ok else None

    def _quote(self) -> bool:
        """A <|"|> token: a string (or a key) opens or closes."""
        if self.phase != ARGS or self.mode == BARE:
            return False
        if not self.args.feed(b'"'):
            return False
        self.mode, self.tail = STR if self.mode == OUT else OUT, b""
        return True

    def _byte(self, b: int) -> bool:
        if self.phase == PREFIX:
            self.text += bytes([b])
            if not CALL.startswith(self.text):
                return False
            if self.text == CALL:
                self.phase, self.text = NAME, b""
            return True
        if self.phase == NAME:
            self.text += bytes([b])
            heads = [(n, p) for n, p in self.fmt.tools if (n.encode() + b"{").startswith(self.text)]
            whole = [p for n, p in heads if n.encode() + b"{" == self.text]
            if whole:
                self._begin(whole[0])
            return bool(heads)
        if self.phase != ARGS:
            return False
        args = self.args
        if self.mode == STR:  # (its text never writes <|"|>, which the parser would read as its end)
            self.tail = (self.tail + bytes([b]))[-len(_QUOTE_TEXT):]
            return self.tail != _QUOTE_TEXT and args.feed(_ESCAPED.get(b, bytes([b])))
        if self.mode == BARE:
            if b == 0x3A:  # the key ends at its ':'
                self.mode = OUT
                return not self.space and args.feed(b'":')
            self.space = b in _SPACE
            return b not in _BARE_STOP and args.feed(_ESCAPED.get(b, bytes([b])))
        if args.complete:  # after the arguments: <tool_call|> (whitespace before it)
            return args.feed(bytes([b]))
        if args.at_key and b not in _BARE_STOP and b not in _SPACE:
            self.mode, self.space = BARE, False
            return args.feed(b'"' + _ESCAPED.get(b, bytes([b])))
        return b != 0x22 and args.feed(bytes([b]))  # (a string opens with <|"|>: a bare '"' is text)

    # ---- closing -----------------------------------------------------------------------------------------
    def _pieces(self) -> list[bytes | None]:
        """The shortest rest of the calls: text and <|"|> tokens (None), <tool_call|> left out."""
        if self.phase == ARGS:
            return _dialect(self.args.closing(), self.mode)
        prefix = CALL[len(self.text):] if self.phase == PREFIX else b""
        typed = self.text if self.phase == NAME else b""
        return min(([prefix + head[len(typed):]] + rest for head, rest in self.fmt.shortest if head.startswith(typed)),
                   key=_length)

    def closing(self) -> bytes:
        """The shortest rest of the calls as text (an upper bound of its tokens: one per byte at most); b"" where
        the reply may end here."""
        if self.phase in (AFTER, DONE):
            return b""
        return b"".join(_QUOTE_TEXT if p is _QUOTE else p for p in self._pieces()) + \
            C.TOOL_CALL_END.encode()

    def close_ids(self, tok: Tokenizer) -> list[int]:
        """The shortest rest of the calls, taken, as tokens: the reply is complete."""
        ids: list[int] = []
        if self.phase not in (AFTER, DONE):
            for p in self._pieces():
                ids += [self.quote] if p is _QUOTE else tok.encode(p.decode(errors="replace"), parse_special=False)
            ids.append(self.end)
        self.phase = DONE
        return ids

    def close(self) -> bytes:
        """closing(), taken (read_canvas: an end of generation where the reply may end)."""
        text, self.phase = self.closing(), DONE
        return text


def _length(pieces: list[bytes | None]) -> int:
    return sum(1 if p is _QUOTE else len(p) for p in pieces)


def _string_end(text: bytes, i: int) -> int:
    """The index of the quote that ends a JSON string whose text goes on at i."""
    while text[i] != 0x22:
        i += 2 if text[i] == 0x5C else 1
    return i


def _unescaped(text: bytes) -> bytes:
    """A JSON string's text (between its quotes) as the text it is."""
    return json.loads(b'"' + text + b'"').encode(errors="surrogatepass")


def _dialect(closing: bytes, mode: str) -> list[bytes | None]:
    """A JSON closing (JsonPrefix.closing) in the call syntax, from where the arguments are (mode): its strings
    between <|"|> tokens, written as they are; a key bare where it can be (a bare key's rest: bare)."""
    out: list[bytes | None] = []
    i = 0
    if mode != OUT:
        end = _string_end(closing, 0)
        out += [_unescaped(closing[:end])] + ([_QUOTE] if mode == STR else [])
        i = end + 1
    while i < len(closing):
        if closing[i] == 0x22:
            end = _string_end(closing, i + 1)
            text = _unescaped(closing[i + 1:end])
            key = closing[end + 1:end + 2] == b":" and text and text[0] not in _SPACE and text[-1] not in _SPACE \
                and not any(b in _BARE_STOP for b in text)
            out += [text] if key else [_QUOTE, text, _QUOTE]  # (a key bare, as the chat template writes them)
            i = end + 1
        else:
            out.append(closing[i:i + 1])
            i += 1
    return [p for p in out if p != b""]

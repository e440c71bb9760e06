"""The parts of a Gemma 4 reply: the answer, the thought channel and tool calls, from the generated tokens.

Gemma 4 reasons in a channel before it answers, `<|channel>thought\\n ... <channel|>`, and calls a tool as
`<|tool_call>call:NAME{key:value,...}<tool_call|>` (then `<|tool_response>`, which ends the generation). In a call
a string stands between two `<|"|>` tokens; keys, numbers, booleans and null are written bare, lists as `[...]`
and objects as `{...}` (the chat template's `format_argument`, which renders the calls of earlier turns).

`ReplyParser` takes a generation's tokens canvas by canvas and gives what each canvas adds: answer text,
thinking text (whole UTF-8 characters, each part decoded on its own) and the tool calls it finished. A call
that cannot be read is given back as answer text, markers and all, so that nothing the model wrote is lost.
Without either part asked for it is the plain decoder: every special token left out of the text.
"""

from __future__ import annotations

import codecs
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from dgemma.convert import constants as C

from .tokenizer import Tokenizer

Q = C.TOOL_QUOTE
MAX_DEPTH = 32  # nested lists and objects in one call's arguments
_NUMBER = re.compile(r"-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?")
_BARE_END = ",}]"


class ToolCallError(ValueError):
    """A tool call's text is not `call:NAME{...}` with readable arguments."""


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass
class ReplyDelta:
    content: str = ""
    thinking: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    # per call, the length `content` had when the call ended (a stop string in the answer cuts the calls after it)
    call_at: list[int] = field(default_factory=list, compare=False, repr=False)

    def __bool__(self) -> bool:
        return bool(self.content or self.thinking or self.tool_calls)

    def extend(self, other: "ReplyDelta") -> None:
        self.call_at += [len(self.content) + at for at in other.call_at]
        self.content += other.content
        self.thinking += other.thinking
        self.tool_calls += other.tool_calls


# ---- one call's text -------------------------------------------------------------------------------
class _Reader:
    def __init__(self, text: str) -> None:
        self.s, self.i = text, 0

    def fail(self, what: str) -> ToolCallError:
        return ToolCallError(f"tool call {self.s!r}: {what} at character {self.i}")

    def ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i].isspace():
            self.i += 1

    def take(self, literal: str) -> bool:
        self.ws()
        if self.s.startswith(literal, self.i):
            self.i += len(literal)
            return True
        return False

    def quoted(self) -> str:
        end = self.s.find(Q, self.i)
        if end < 0:
            raise self.fail("a string without its closing quote")
        text, self.i = self.s[self.i:end], end + len(Q)
        return text

    def key(self) -> str:
        if self.take(Q):
            return self.quoted()
        end = self.s.find(":", self.i)
        name = self.s[self.i:end].strip() if end >= 0 else ""
        if not name or any(c in name for c in "{}[],"):
            raise self.fail("expected a key and ':'")
        self.i = end
        return name

    def value(self, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise self.fail(f"arguments nested deeper than {MAX_DEPTH}")
        if self.take(Q):
            return self.quoted()
        if self.take("{"):
            return self.items("}", depth + 1, keyed=True)
        if self.take("["):
            return self.items("]", depth + 1, keyed=False)
        start = self.i
        while self.i < len(self.s) and self.s[self.i] not in _BARE_END and not self.s.startswith(Q, self.i):
            self.i += 1
        word = self.s[start:self.i].strip()
        if not word or any(c in word for c in ":{["):
            raise self.fail("expected a value" if not word else "expected ',' between two values")
        if word in ("true", "false", "null"):
            return {"true": True, "false": False, "null": None}[word]
        if _NUMBER.fullmatch(word):
            try:
                number = json.loads(word)
            except (ValueError, OverflowError):  # past int's digit limit
                return word
            if not isinstance(number, float) or math.isfinite(number):
                return number
        return word  # a bare word (or a number no float holds, 1e999): a string the model did not quote

    def items(self, close: str, depth: int, keyed: bool) -> Any:
        """The rest of an object (keyed) or a list, its opening bracket read."""
        out: Any = {} if keyed else []
        if self.take(close):
            return out
        while True:
            if keyed:
                k = self.key()
                if not self.take(":"):
                    raise self.fail("expected ':' after a key")
                out[k] = self.value(depth)
            else:
                out.append(self.value(depth))
            if self.take(close):
                return out
            if not self.take(","):
                raise self.fail(f"expected ',' or '{close}'")


def parse_call(text: str) -> ToolCall:
    """One call, `call:NAME{...}`: the text between <|tool_call> and <tool_call|>, quotes as `<|"|>`."""
    r = _Reader(text)
    if not r.take("call:"):
        raise r.fail("expected 'call:'")
    brace = text.find("{", r.i)
    name = text[r.i:brace].strip() if brace >= 0 else ""
    if not name or any(c.isspace() for c in name):
        raise r.fail("expected a function name and '{'")
    r.i = brace + 1
    arguments = r.items("}", 1, keyed=True)
    r.ws()
    if r.i != len(text):
        raise r.fail("text after the arguments")
    return ToolCall(name, arguments)


# ---- a generation, canvas by canvas ----------------------------------------------------------------
CONTENT, CHANNEL_NAME, THINKING, CALL = "content", "channel name", "thinking", "call"


class ReplyParser:
    """A generation's tokens in, the reply's parts out. thinking: the thought channel goes to `thinking` (else
    its markers are dropped and its text stays in the answer, as the plain decoder gives it); tools: tool calls
    are read, also inside the thought channel, which goes on after them (else their markers are dropped and their
    text stays in the answer)."""

    def __init__(self, tok: Tokenizer, *, thinking: bool = False, tools: bool = False) -> None:
        self.tok = tok
        wanted = ([C.CHANNEL_START, C.CHANNEL_END] if thinking else []) + \
                 ([C.TOOL_CALL_START, C.TOOL_CALL_END, Q] if tools else [])
        self.marks = {tok.ids[t]: t for t in wanted if t in tok.ids}
        self.turn_id = tok.ids.get(C.TURN_START)
        self.mode = CONTENT
        self.decoder = self._new_decoder()
        self.name_line = ""  # the channel's name so far (up to its newline)
        self.call = ""  # the call's text so far
        self.resume = CONTENT  # where the text goes on after the call

    @staticmethod
    def _new_decoder():
        return codecs.getincrementaldecoder("utf-8")(errors="replace")

    def prime(self, prompt: list[int]) -> None:
        """Start where the prompt leaves the model's turn: in an open thought channel where the generation
        prompt opened one, after a tool response where the turn goes on. Reads the prompt's tokens after its
        last <|turn> and drops what they give."""
        if self.marks and self.turn_id in prompt:
            last = len(prompt) - 1 - prompt[::-1].index(self.turn_id)
            self.feed(prompt[last + 1:], final=False)
            self.decoder = self._new_decoder()

    def feed(self, ids: list[int], final: bool = False) -> ReplyDelta:
        out = ReplyDelta()
        start = 0  # each run of ids between markers decoded at once (other special tokens left out, as HF's
        # skip_special_tokens)
        for at in [k for k, i in enumerate(ids) if i in self.marks] + [len(ids)]:
            self._text(out, self.decoder.decode(self.tok.decode_bytes(ids[start:at], skip_special=True)))
            if at < len(ids):
                self._text(out, self.decoder.decode(b"", final=True))
                self.decoder = self._new_decoder()
                self._mark(out, self.marks[ids[at]])
            start = at + 1
        if final:
            self._text(out, self.decoder.decode(b"", final=True))
            self.decoder = self._new_decoder()
            if self.mode == CALL:  # cut before its end: read what there is
                self._end_call(out, ended=False)
            if self.mode == CHANNEL_NAME:  # cut before the name's newline
                out.thinking += self.name_line
                self.mode, self.name_line = THINKING, ""
        return out

    def _text(self, out: ReplyDelta, text: str) -> None:
        if not text:
            return
        if self.mode == CONTENT:
            out.content += text
        elif self.mode == THINKING:
            out.thinking += text
        elif self.mode == CALL:
            self.call += text
        else:  # the channel's name, up to its newline; then its text
            self.name_line += text
            if "\n" in self.name_line:
                rest = self.name_line.split("\n", 1)[1]
                self.mode, self.name_line = THINKING, ""
                out.thinking += rest

    def _mark(self, out: ReplyDelta, mark: str) -> None:
        if self.mode == CALL:
            if mark == Q:
                self.call += Q
            elif mark == C.TOOL_CALL_END:
                self._end_call(out, ended=True)
            else:
                self.call += mark  # a marker inside a call: kept, so that it fails to read and shows
        elif mark == C.CHANNEL_START and self.mode == CONTENT:
            self.mode, self.name_line = CHANNEL_NAME, ""
        elif mark == C.CHANNEL_END and self.mode in (CHANNEL_NAME, THINKING):
            self.mode = CONTENT
        elif mark == C.TOOL_CALL_START:
            self.resume = THINKING if self.mode in (CHANNEL_NAME, THINKING) else CONTENT
            self.mode, self.call = CALL, ""

    def _end_call(self, out: ReplyDelta, ended: bool) -> None:
        """The call read; else its text, as the model wrote it, where the text goes on."""
        self.mode = self.resume
        try:
            out.tool_calls.append(parse_call(self.call))
            out.call_at.append(len(out.content))
        except ToolCallError:
            self._text(out, C.TOOL_CALL_START + self.call + (C.TOOL_CALL_END if ended else ""))
        self.call = ""


class TextAssembler:
    """Turns canvases of token ids into the reply's new parts (ReplyParser's): whole UTF-8 characters only, the
    answer cut at stop strings, holding back a tail of it that could be the start of a stop string split across
    canvases."""

    def __init__(self, parser: ReplyParser, stop: list[str]) -> None:
        self.parser, self.stop = parser, [x for x in stop if x]
        self.text, self.emitted = "", 0

    def add(self, ids: list[int], final: bool) -> tuple[ReplyDelta, bool]:
        new = self.parser.feed(ids, final=final)
        base = len(self.text)
        self.text += new.content
        for s in self.stop:
            at = self.text.find(s, max(0, self.emitted - len(s) + 1))
            if at != -1:
                self.text = self.text[:at]
                # the calls made before the stop string stay; those after it are cut with the answer
                kept = [k for k, c in enumerate(new.call_at) if base + c <= at]
                new.tool_calls, new.call_at = [new.tool_calls[k] for k in kept], [new.call_at[k] for k in kept]
                new.content = self._flush(len(self.text))
                return new, True
        hold = 0 if final or not self.stop else max(len(s) for s in self.stop) - 1
        new.content = self._flush(max(self.emitted, len(self.text) - hold))
        return new, False

    def _flush(self, upto: int) -> str:
        piece = self.text[self.emitted : upto]
        self.emitted = max(self.emitted, upto)
        return piece

"""Gemma 4's tokenizer, rebuilt from GGUF metadata alone (no tokenizer.json at run time).

Encoding follows Hugging Face's `GemmaTokenizer` (the model was trained with it):
1. split the text on added tokens (CONTROL and USER_DEFINED ones), leftmost-longest;
2. normalise every " " to "▁" (no other pre-splitting: a merge may span a newline);
3. BPE over Unicode characters, unknown characters falling back to their UTF-8 byte tokens,
   merging the lowest-rank pair first (leftmost on ties) until no merge applies.
Decoding turns "▁" back into spaces and runs of byte tokens back into UTF-8.
"""

from __future__ import annotations

import heapq
import re
from dataclasses import dataclass
from pathlib import Path

from gguf import GGUFReader

from dgemma.convert import constants as C

from .inspect import InspectError, field_value

SPACE = "▁"
_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@dataclass
class Tokenizer:
    tokens: list[str]
    types: list[int]
    merges: dict[tuple[str, str], int]  # pair -> rank
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    chat_template: str | None = None

    def __post_init__(self) -> None:
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        special = [t for t, k in zip(self.tokens, self.types) if k in (C.TokenType.CONTROL, C.TokenType.USER_DEFINED) and t]
        special.sort(key=len, reverse=True)
        self._special_re = re.compile("|".join(re.escape(t) for t in special)) if special else None
        self.byte_ids = {}
        for i, t in enumerate(self.tokens):
            m = _BYTE.fullmatch(t)
            if m and self.types[i] == C.TokenType.BYTE:
                self.byte_ids[int(m.group(1), 16)] = i
        self._byte_of = {i: b for b, i in self.byte_ids.items()}
        # tokens that end a generation, as llama.cpp's loader marks them for Gemma 4
        self.eog_ids = {i for i in (self.eos_id,) if i is not None}
        self.eog_ids |= {self.ids[t] for t in ("<turn|>", "<|tool_response>", "<end_of_turn>") if t in self.ids}

    @classmethod
    def from_gguf(cls, reader: GGUFReader, path: str | Path = "") -> "Tokenizer":
        tokens = field_value(reader, C.TOKENIZER_TOKENS)
        if not tokens:
            raise InspectError(f"{path}: metadata key '{C.TOKENIZER_TOKENS}' missing (no tokenizer in this GGUF)")
        model = field_value(reader, C.TOKENIZER_MODEL)
        if model != C.TOKENIZER_MODEL_NAME:
            raise InspectError(f"{path}: tokenizer model '{model}' is not supported (expected '{C.TOKENIZER_MODEL_NAME}')")
        types = field_value(reader, C.TOKENIZER_TOKEN_TYPE) or [int(C.TokenType.NORMAL)] * len(tokens)
        merges = {}
        for rank, m in enumerate(field_value(reader, C.TOKENIZER_MERGES) or []):
            a, _, b = m.partition(" ")  # Gemma tokens hold no literal space ("▁" instead)
            merges.setdefault((a, b), rank)

        def special(role: str) -> int | None:
            value = field_value(reader, C.SPECIAL_TOKEN_KEYS[role])
            return int(value) if value is not None else None

        return cls(list(tokens), [int(t) for t in types], merges, special("bos"), special("eos"), special("unk"),
                   special("pad"), field_value(reader, C.TOKENIZER_CHAT_TEMPLATE))

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    # ---- encoding --------------------------------------------------------------------------------
    def encode(self, text: str, *, add_bos: bool = False, parse_special: bool = True) -> list[int]:
        ids = [self.bos_id] if add_bos and self.bos_id is not None else []
        pos = 0
        if parse_special and self._special_re is not None:
            for m in self._special_re.finditer(text):
                ids += self._bpe(text[pos : m.start()])
                ids.append(self.ids[m.group(0)])
                pos = m.end()
        ids += self._bpe(text[pos:])
        return ids

    def _bpe(self, text: str) -> list[int]:
        if not text:
            return []
        syms = list(text.replace(" ", SPACE))  # one symbol per Unicode character
        nxt = list(range(1, len(syms))) + [-1]
        prv = list(range(-1, len(syms) - 1))
        heap = [(self.merges[p], i) for i in range(len(syms) - 1) if (p := (syms[i], syms[i + 1])) in self.merges]
        heapq.heapify(heap)
        while heap:
            rank, i = heapq.heappop(heap)
            j = nxt[i]
            if syms[i] is None or j == -1 or self.merges.get((syms[i], syms[j])) != rank:
                continue  # stale entry: a neighbour changed since it was pushed
            syms[i] += syms[j]
            syms[j] = None
            nxt[i] = nxt[j]
            if nxt[j] != -1:
                prv[nxt[j]] = i
            for a, b in ((prv[i], i), (i, nxt[i])):
                if a != -1 and b != -1 and (r := self.merges.get((syms[a], syms[b]))) is not None:
                    heapq.heappush(heap, (r, a))
        out: list[int] = []
        for s in syms:
            if s is None:
                continue
            if s in self.ids:
                out.append(self.ids[s])
                continue
            raw = s.replace(SPACE, " ").encode("utf-8")
            if all(b in self.byte_ids for b in raw):
                out += [self.byte_ids[b] for b in raw]
            elif self.unk_id is not None and not (out and out[-1] == self.unk_id):
                out.append(self.unk_id)  # fuse_unk: one <unk> for a run of unknowns
        return out

    # ---- decoding --------------------------------------------------------------------------------
    def decode(self, ids: list[int], *, skip_special: bool = False) -> str:
        return self.decode_bytes(ids, skip_special=skip_special).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: list[int], *, skip_special: bool = False) -> bytes:
        out = bytearray()
        for i in ids:
            if i in self._byte_of:
                out.append(self._byte_of[i])
            elif skip_special and self.types[i] in (C.TokenType.CONTROL, C.TokenType.USER_DEFINED):
                continue  # as HF's skip_special_tokens: every added special token
            else:
                out += self.tokens[i].replace(SPACE, " ").encode("utf-8")
        return bytes(out)

    def token_text(self, i: int) -> str:
        """One token for display (byte tokens shown as their byte, control tokens verbatim)."""
        if i in self._byte_of:
            return bytes([self._byte_of[i]]).decode("utf-8", errors="replace")
        return self.tokens[i].replace(SPACE, " ")

"""Gemma 4 tokenizer files -> the `tokenizer.*` GGUF keys, as llama.cpp's converter writes them.

Reads `tokenizer.json` (BPE with byte fallback), `tokenizer_config.json` and the chat template
(`tokenizer_config.json["chat_template"]`, else `chat_template.jinja`) with plain JSON, no
transformers. Token types: BYTE for `<0xXX>`, CONTROL for special added tokens except the seven
that llama.cpp keeps visible (USER_DEFINED), NORMAL otherwise; every score is -1000.
One deliberate difference: where the tokenizer has fewer tokens than the model's `vocab_size`,
llama.cpp trims the embedding, we pad the token list with UNUSED `[PADn]` tokens instead, so the
sampler's uniform re-noising draws from the same vocabulary as transformers does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import constants as C
from .source import ConvertError, read_json

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass
class Vocab:
    tokens: list[str]
    scores: list[float]
    types: list[int]
    merges: list[str]
    special_ids: dict[str, int] = field(default_factory=dict)  # role ("bos", ...) -> id
    add_eos: bool | None = None
    chat_template: str | None = None
    n_padded: int = 0  # [PADn] tokens appended to reach the model's vocab_size

    def write_kv(self, kv: Any) -> None:
        kv.add(C.TOKENIZER_MODEL, C.TOKENIZER_MODEL_NAME, "string")
        kv.add(C.TOKENIZER_TOKENS, self.tokens, "string_array")
        kv.add(C.TOKENIZER_SCORES, self.scores, "float32_array")
        kv.add(C.TOKENIZER_TOKEN_TYPE, self.types, "int32_array")
        kv.add(C.TOKENIZER_MERGES, self.merges, "string_array")
        for role, key in C.SPECIAL_TOKEN_KEYS.items():
            if role in self.special_ids:
                kv.add(key, self.special_ids[role], "uint32")
        kv.add(C.TOKENIZER_ADD_BOS, True, "bool")  # llama.cpp forces BOS for Gemma 4
        if self.add_eos is not None:
            kv.add(C.TOKENIZER_ADD_EOS, self.add_eos, "bool")
        kv.add(C.TOKENIZER_ADD_SPACE_PREFIX, False, "bool")
        if self.chat_template:
            kv.add(C.TOKENIZER_CHAT_TEMPLATE, self.chat_template, "string")


def _content(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def load_vocab(root: Path, model_config: dict[str, Any], n_vocab: int) -> Vocab:
    tok_path = root / TOKENIZER_FILE
    tj = read_json(tok_path, "expected the Gemma 4 tokenizer (BPE with byte fallback)")
    model = tj.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE" or not model.get("byte_fallback"):
        raise ConvertError(f"{tok_path}: field 'model' must be a BPE model with byte_fallback (Gemma 4's tokenizer)")
    base = model.get("vocab")
    if not isinstance(base, dict) or not base:
        raise ConvertError(f"{tok_path}: field 'model.vocab' missing or empty")
    added = [a for a in tj.get("added_tokens") or [] if isinstance(a, dict) and "id" in a and "content" in a]

    by_id: dict[int, str] = {int(i): t for t, i in base.items()}
    for a in added:
        by_id.setdefault(int(a["id"]), a["content"])
    n_tok = max(by_id) + 1
    if n_tok > n_vocab:
        raise ConvertError(f"{tok_path}: {n_tok} tokens, but config.json field 'vocab_size' is {n_vocab}")
    missing = [i for i in range(n_tok) if i not in by_id]
    if missing:
        raise ConvertError(f"{tok_path}: token ids are not contiguous (id {missing[0]} has no token)")

    special = {int(a["id"]) for a in added if a.get("special")}
    tokens, types = [], []
    for i in range(n_tok):
        text = by_id[i]
        if text in C.VISIBLE_SPECIAL_TOKENS:
            kind = C.TokenType.USER_DEFINED
        elif _BYTE_TOKEN.fullmatch(text):
            kind = C.TokenType.BYTE
        elif i in special:
            kind = C.TokenType.CONTROL
        else:
            kind = C.TokenType.NORMAL
        tokens.append(text)
        types.append(int(kind))
    n_pad = n_vocab - n_tok
    tokens += [C.PAD_TOKEN_FORMAT.format(i) for i in range(n_tok, n_vocab)]
    types += [int(C.TokenType.UNUSED)] * n_pad

    merges = []
    for m in model.get("merges") or []:
        if isinstance(m, str):
            merges.append(m)
        elif isinstance(m, list) and len(m) == 2:
            # llama.cpp's merge format is "a b": a space inside a part is written as U+0120
            merges.append(" ".join(part.replace(" ", chr(ord(" ") + 256)) for part in m))
        else:
            raise ConvertError(f"{tok_path}: field 'model.merges' has an entry that is not a pair: {m!r}")
    if not merges:
        raise ConvertError(f"{tok_path}: field 'model.merges' is empty (llama.cpp's gemma4 tokenizer needs merges)")

    cfg_path = root / TOKENIZER_CONFIG_FILE
    tcfg = read_json(cfg_path, "tokenizer config") if cfg_path.exists() else {}
    by_content = {a["content"]: int(a["id"]) for a in added}
    special_ids: dict[str, int] = {}
    for role in C.SPECIAL_TOKEN_KEYS:
        content = _content(tcfg.get(f"{role}_token"))
        if content is not None and content in by_content:
            special_ids[role] = by_content[content]
            continue
        text_cfg = model_config.get("text_config") or {}
        value = model_config.get(f"{role}_token_id", text_cfg.get(f"{role}_token_id"))
        if isinstance(value, int) and not isinstance(value, bool):
            special_ids[role] = value
    for role, tid in special_ids.items():
        if not 0 <= tid < n_vocab:
            raise ConvertError(f"{cfg_path}: {role} token id {tid} is outside the vocabulary of {n_vocab}")

    template = tcfg.get("chat_template")
    if template is None and (root / CHAT_TEMPLATE_FILE).is_file():
        template = (root / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    if template is not None and not isinstance(template, str):
        raise ConvertError(f"{cfg_path}: field 'chat_template' must be a string (named template lists are not supported)")
    add_eos = tcfg.get("add_eos_token") if isinstance(tcfg.get("add_eos_token"), bool) else None
    return Vocab(tokens, [C.TOKEN_SCORE] * n_vocab, types, merges, special_ids, add_eos, template, n_pad)

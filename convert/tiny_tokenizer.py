"""A tiny tokenizer in Gemma 4's format, for test checkpoints.

Gemma 4 checkpoints ship `tokenizer.json` (BPE, byte fallback, spaces normalised to "▁"),
`tokenizer_config.json` (`GemmaTokenizer` with named extra special tokens) and
`chat_template.jinja`. This module lays out a small vocabulary the same way — control tokens at
Gemma 4's ids, the 256 byte tokens at ids 238-493, learned BPE pieces in the free slots, the
multimodal tokens last — and saves it with transformers' own `GemmaTokenizer.save_pretrained`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

# Gemma 4 control tokens at their real ids (all < 238, so they fit every tiny vocabulary)
FIXED_TOKENS: dict[int, str] = {
    0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 4: "<mask>", 5: "[multimodal]",
    46: "<|tool>", 47: "<tool|>", 48: "<|tool_call>", 49: "<tool_call|>", 50: "<|tool_response>",
    51: "<tool_response|>", 52: '<|"|>', 98: "<|think|>", 100: "<|channel>", 101: "<channel|>",
    105: "<|turn>", 106: "<turn|>", 107: "\n", 108: "\n\n", 109: "\n\n\n",
}
BYTE_TOKENS_START = 238  # <0x00> .. <0xFF> occupy 238..493, as in Gemma 4
# multimodal tokens: at 255999.. in the real vocabulary, the last ids of a tiny one
MULTIMODAL_TOKENS = ("<|image>", "<|audio>", "<|image|>", "<|audio|>", "<image|>", "<audio|>", "<|video|>")
MIN_VOCAB = BYTE_TOKENS_START + 256 + len(MULTIMODAL_TOKENS) + 8

# The attribute names Gemma 4's tokenizer_config.json gives its extra special tokens
EXTRA_SPECIAL_TOKENS = {
    "image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>", "audio_token": "<|audio|>",
    "boa_token": "<|audio>", "eoa_token": "<audio|>", "sot_token": "<|turn>", "eot_token": "<turn|>",
    "soc_token": "<|channel>", "eoc_token": "<channel|>", "think_token": "<|think|>", "escape_token": '<|"|>',
    "str_token": "<|tool_response>", "etr_token": "<tool_response|>", "stc_token": "<|tool_call>",
    "etc_token": "<tool_call|>", "std_token": "<|tool>", "etd_token": "<tool|>",
}

# Renders conversations as Gemma 4's template does (large-model variant: an empty thought channel after the
# generation prompt when thinking is off), tools included: declarations in the system turn, a reply's calls
# `<|tool_call>call:NAME{...}<tool_call|>` with the tool messages after it as `<|tool_response>response:NAME{value:
# ...}<tool_response|>` in the same model turn, which goes on (no new generation prompt) after them. Values as
# Gemma 4's format_argument writes them: strings between <|"|> tokens, keys sorted and bare. Written for dgemma;
# images are not part of it.
CHAT_TEMPLATE = """{{- bos_token -}}
{%- macro arg(v) -%}
{%- if v is string -%}{{- '<|"|>' + v + '<|"|>' -}}
{%- elif v is boolean -%}{{- 'true' if v else 'false' -}}
{%- elif v is none -%}{{- 'null' -}}
{%- elif v is mapping -%}{{- '{' -}}{%- for k, x in v | dictsort -%}{{- k + ':' + arg(x) -}}{{- ',' if not loop.last -}}{%- endfor -%}{{- '}' -}}
{%- elif v is iterable -%}{{- '[' -}}{%- for x in v -%}{{- arg(x) -}}{{- ',' if not loop.last -}}{%- endfor -%}{{- ']' -}}
{%- else -%}{{- v | string -}}
{%- endif -%}
{%- endmacro -%}
{%- set thinking = enable_thinking | default(false) -%}
{%- set loop_messages = messages -%}
{%- if thinking or tools or (messages and messages[0]['role'] in ['system', 'developer']) -%}
{{- '<|turn>system\\n' -}}
{%- if thinking -%}{{- '<|think|>\\n' -}}{%- endif -%}
{%- if messages and messages[0]['role'] in ['system', 'developer'] -%}
{{- messages[0]['content'] | trim -}}
{%- set loop_messages = messages[1:] -%}
{%- endif -%}
{%- for tool in tools or [] -%}
{%- set fn = tool['function'] if tool['function'] is defined else tool -%}
{{- '<|tool>declaration:' + fn['name'] + '{description:' + arg(fn['description'] | default('')) + ',parameters:' + arg(fn['parameters'] | default({})) + '}<tool|>' -}}
{%- endfor -%}
{{- '<turn|>\\n' -}}
{%- endif -%}
{%- set ns = namespace(open=false) -%}
{%- for message in loop_messages -%}
{%- if message['role'] == 'tool' -%}
{{- '<|tool_response>response:' + (message['name'] or 'unknown') + '{value:' + arg(message['content'] or '') + '}<tool_response|>' -}}
{%- else -%}
{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
{%- if ns.open and role != 'model' -%}{{- '<turn|>\\n' -}}{%- endif -%}
{%- if not (ns.open and role == 'model') -%}{{- '<|turn>' + role + '\\n' -}}{%- endif -%}
{{- (message['content'] or '') | trim -}}
{%- for call in message['tool_calls'] or [] -%}
{{- '<|tool_call>call:' + call['function']['name'] + arg(call['function']['arguments']) + '<tool_call|>' -}}
{%- endfor -%}
{%- set ns.open = role == 'model' and (message['tool_calls'] or []) | length > 0 -%}
{%- if not ns.open -%}{{- '<turn|>\\n' -}}{%- endif -%}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt and not ns.open -%}
{{- '<|turn>model\\n' -}}
{%- if not thinking -%}{{- '<|channel>thought\\n<channel|>' -}}{%- endif -%}
{%- endif -%}"""

CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps in the sun.",
    "Once upon a time there was a little model that learned to write text out of noise.",
    "Diffusion models start from random tokens and refine the whole canvas at every step.",
    "def add(a, b):\n    return a + b\n\n\nfor i in range(10):\n    print(i, add(i, i))\n",
    "if x > 0:\n\tprint('positive')\nelse:\n\tprint('negative')\n",
    "Hello, world! How are you today? I am fine, thank you.\nSee you tomorrow.",
    "  leading spaces,   runs of spaces, and trailing spaces  \n\n\n",
    "Numbers like 3.14159, 2026 and 1e-6 appear in text; so do symbols: #, @, %, &, *.",
] * 4


def _merge_pair(seq: list[str], pair: tuple[str, str], merged: str) -> list[str]:
    out, i = [], 0
    while i < len(seq):
        if i + 1 < len(seq) and seq[i] == pair[0] and seq[i + 1] == pair[1]:
            out.append(merged)
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return out


def train_bpe(texts: list[str], n_pieces: int) -> tuple[list[str], list[tuple[str, str]]]:
    """A plain BPE trainer over whole texts with Gemma's normaliser (" " -> "▁", no pre-splitting):
    start from the characters, merge the most frequent adjacent pair (ties: the smallest pair) until
    `n_pieces` pieces exist or no pair occurs twice. Deterministic, pure Python."""
    seqs = [list(t.replace(" ", "▁")) for t in texts if t]
    pieces = sorted({c for s in seqs for c in s})
    merges: list[tuple[str, str]] = []
    while len(pieces) < n_pieces:
        counts = Counter(p for s in seqs for p in zip(s, s[1:]))
        if not counts:
            break
        pair, n = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        if n < 2:
            break
        merged = pair[0] + pair[1]
        merges.append(pair)
        if merged not in pieces:
            pieces.append(merged)
        seqs = [_merge_pair(s, pair, merged) for s in seqs]
    return pieces, merges


Trainer = Callable[[int], tuple[list[str], list[tuple[str, str]]]]


def _default_train(n_pieces: int) -> tuple[list[str], list[tuple[str, str]]]:
    return train_bpe(CORPUS, n_pieces)


def build_vocab(vocab_size: int, train: Trainer | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Gemma 4's layout at `vocab_size`; the learned pieces come from `train(n_pieces)` (default: the
    pure-Python `train_bpe` over the built-in CORPUS), which returns (pieces in priority order, merges)."""
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"tiny Gemma 4 tokenizer needs vocab_size >= {MIN_VOCAB}, got {vocab_size}")
    ids: dict[int, str] = dict(FIXED_TOKENS)
    for b in range(256):
        ids[BYTE_TOKENS_START + b] = f"<0x{b:02X}>"
    for i, tok in enumerate(MULTIMODAL_TOKENS):
        ids[vocab_size - len(MULTIMODAL_TOKENS) + i] = tok
    free = [i for i in range(vocab_size) if i not in ids]
    taken = set(ids.values())
    pieces, merges = (train or _default_train)(len(free) + len(taken))
    pieces = [p for p in pieces if p not in taken]
    for slot, piece in zip(free, pieces):
        ids[slot] = piece
    for n, slot in enumerate(i for i in free if i not in ids):
        ids[slot] = f"<unused{n}>"
    vocab = {tok: i for i, tok in ids.items()}
    merges = [(a, b) for a, b in merges if a in vocab and b in vocab and a + b in vocab]
    return vocab, merges


def tokenizer_json(vocab: dict[str, int], merges: list[tuple[str, str]]) -> dict:
    """tokenizer.json exactly as transformers' GemmaTokenizer.save_pretrained lays it out."""
    specials = {"<pad>", "<eos>", "<bos>", "<unk>", "<mask>", *EXTRA_SPECIAL_TOKENS.values()}
    added = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True}
        for t, i in sorted(vocab.items(), key=lambda kv: kv[1]) if t in specials
    ]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        "pre_tokenizer": {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": False},
        "post_processor": {
            "type": "TemplateProcessing", "single": [{"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {},
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"},
        ]},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
            "vocab": vocab, "merges": [list(m) for m in merges],
        },
    }


def write_tokenizer_files(out_dir: str | Path, vocab_size: int, train: Trainer | None = None) -> None:
    """The three tokenizer files of a Gemma 4 checkpoint, written without transformers (`train`: as in
    `build_vocab`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab(vocab_size, train)
    (out / "tokenizer.json").write_text(json.dumps(tokenizer_json(vocab, merges), ensure_ascii=False, indent=2))
    config = {"backend": "tokenizers", "bos_token": "<bos>", "eos_token": "<eos>", "extra_special_tokens": [],
              "mask_token": "<mask>", "model_max_length": 1000000000000000019884624838656, "pad_token": "<pad>",
              "padding_side": "left", "tokenizer_class": "GemmaTokenizer", "unk_token": "<unk>",
              **EXTRA_SPECIAL_TOKENS}
    (out / "tokenizer_config.json").write_text(json.dumps(dict(sorted(config.items())), indent=2, ensure_ascii=False))
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def make_tokenizer(vocab_size: int):
    from transformers import GemmaTokenizer

    vocab, merges = build_vocab(vocab_size)
    return GemmaTokenizer(
        vocab=vocab, merges=merges, add_bos_token=False, padding_side="left",
        extra_special_tokens=dict(EXTRA_SPECIAL_TOKENS), chat_template=CHAT_TEMPLATE,
    )


def save_tokenizer(out_dir: str | Path, vocab_size: int) -> None:
    make_tokenizer(vocab_size).save_pretrained(str(out_dir))

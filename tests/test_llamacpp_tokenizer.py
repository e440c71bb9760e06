"""Our tokenizer against llama.cpp's `gemma4` tokenizer (llama-cpp-python, vocab-only load).

llama.cpp pre-splits text into runs of newlines and runs of everything else before BPE
(LLAMA_VOCAB_PRE_TYPE_GEMMA4: "[^\\n]+|[\\n]+"); Hugging Face's GemmaTokenizer does not, so a vocabulary
with merges across a newline (our tiny tokenizer has "b):\\n▁▁", "0:\\n\\tprint('") tokenizes
differently. We follow Hugging Face (the model was trained with it): docs/TOKENIZER.md. These tests
pin the difference down: llama.cpp == HF applied to each newline-split piece, on every text.
"""

from __future__ import annotations

import re

import pytest
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from dgemma.convert import convert
from dgemma.plugin.tokenizer import Tokenizer
from test_tokenizer import CORPUS

llama_cpp = pytest.importorskip("llama_cpp")


def vocab_only_gguf(src, dst) -> None:
    """The tokenizer keys of a DiffusionGemma GGUF under arch `gemma4`, which libllama knows."""
    reader = GGUFReader(src)
    w = GGUFWriter(dst, "gemma4")
    for key, f in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        kind, value = f.types[0], f.contents()
        if kind == GGUFValueType.ARRAY:
            w.add_array(key, value)
        else:
            {GGUFValueType.STRING: w.add_string, GGUFValueType.BOOL: w.add_bool,
             GGUFValueType.UINT32: w.add_uint32}[kind](key, value)
    w.add_uint32("gemma4.block_count", 1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory, base_checkpoint):
    d = tmp_path_factory.mktemp("llamacpp")
    convert(base_checkpoint, d / "m.gguf", "F16", quiet=True)
    vocab_only_gguf(d / "m.gguf", d / "vocab.gguf")
    llm = llama_cpp.Llama(str(d / "vocab.gguf"), vocab_only=True, verbose=False)
    return Tokenizer.from_gguf(GGUFReader(d / "m.gguf")), llm


def newline_split_encode(tok: Tokenizer, text: str) -> list[int]:
    """HF's tokenization applied separately to each special token, newline run and non-newline run."""
    ids: list[int] = []
    pos = 0
    pieces = []
    for m in tok._special_re.finditer(text):
        pieces += re.findall(r"[^\n]+|\n+", text[pos : m.start()]) + [m.group(0)]
        pos = m.end()
    pieces += re.findall(r"[^\n]+|\n+", text[pos:])
    for piece in pieces:
        ids += tok.encode(piece)
    return ids


@pytest.mark.parametrize("text", CORPUS)
def test_llamacpp_equals_hf_on_newline_split_pieces(tokenizers, text):
    ours, llm = tokenizers
    theirs = llm.tokenize(text.encode(), add_bos=False, special=True)
    assert theirs == newline_split_encode(ours, text)


def test_the_difference_is_real_and_only_at_newlines(tokenizers):
    ours, llm = tokenizers
    differing = [t for t in CORPUS if ours.encode(t) != llm.tokenize(t.encode(), add_bos=False, special=True)]
    assert differing and all("\n" in t for t in differing)
    # llama.cpp forces BOS for Gemma 4 when asked for special tokens; HF adds none
    assert llm.tokenize(b"hi", add_bos=True, special=True)[0] == ours.bos_id

"""The tokenizer files dgemma writes without transformers equal what transformers' GemmaTokenizer saves."""

from __future__ import annotations

import json

import pytest

from dgemma.convert.tiny_tokenizer import MIN_VOCAB, build_vocab, save_tokenizer, train_bpe, write_tokenizer_files


@pytest.mark.parametrize("vocab_size", [512, 700])
def test_pure_writer_equals_transformers_save(tmp_path, vocab_size):
    save_tokenizer(tmp_path / "hf", vocab_size)
    write_tokenizer_files(tmp_path / "ours", vocab_size)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert json.loads((tmp_path / "ours" / name).read_text()) == json.loads((tmp_path / "hf" / name).read_text())
    assert (tmp_path / "ours" / "chat_template.jinja").read_text() == (tmp_path / "hf" / "chat_template.jinja").read_text()


def test_vocab_layout_is_gemma4s_and_deterministic():
    vocab, merges = build_vocab(600)
    assert build_vocab(600) == (vocab, merges)
    assert sorted(vocab.values()) == list(range(600))
    assert vocab["<pad>"] == 0 and vocab["<bos>"] == 2 and vocab["<|turn>"] == 105 and vocab["<turn|>"] == 106
    assert vocab["<0x00>"] == 238 and vocab["<0xFF>"] == 493 and vocab["<|video|>"] == 599
    assert all(a in vocab and b in vocab and a + b in vocab for a, b in merges)
    with pytest.raises(ValueError, match=str(MIN_VOCAB)):
        build_vocab(MIN_VOCAB - 1)


def test_train_bpe_merges_the_most_frequent_pair_first():
    pieces, merges = train_bpe(["ab ab ab cd"], 10)
    assert merges[0] == ("a", "b") and "ab" in pieces
    assert ("b", "▁") in merges or ("ab", "▁") in merges

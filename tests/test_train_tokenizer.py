"""The default model's tokenizer trainer (train/tokenizer.py): word-aligned pieces in Gemma 4's layout."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # train/ is a folder of the repository, not a package

tokenizers = pytest.importorskip("tokenizers")
from train import tokenizer as T

CORPUS = [
    "Fools rush in -- and get the best seats in the house.",
    "I stick my neck out for nobody.\n-- Humphrey Bogart, \"Casablanca\"",
    "If God had intended Man to Watch TV, He would have given him Rabbit Ears.",
    "  Indented   lines,\tspaces and\n\nblank lines.  ",
    "A yawn is a silent shout.\n-- G. K. Chesterton",
] * 40


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    T.write_tokenizer(out, CORPUS, vocab_size=700)
    return out


def test_pieces_hold_a_space_only_in_front(trained):
    model = json.loads((trained / "tokenizer.json").read_text())["model"]
    assert len(model["vocab"]) == 700
    learned = ["".join(m.split(" ", 1)) if isinstance(m, str) else "".join(m) for m in model["merges"]]
    assert any(p.startswith("▁") and len(p) > 3 for p in learned)  # whole words were learned
    assert not [p for p in learned if "▁" in p[1:] or "\n" in p]


def test_saved_tokenizer_encodes_like_the_training_split(trained):
    from tokenizers import Tokenizer, pre_tokenizers

    saved = T.load(trained)
    split = Tokenizer.from_file(str(trained / "tokenizer.json"))
    split.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"),
                                                   pre_tokenizers.Split("▁", "merged_with_next")])
    texts = CORPUS[:5] + ["Rabbit Ears shout the best house.", "  two  spaces\n\n\nand newlines ", "unseen wordz qx"]
    for text in texts:
        assert saved.encode(text).ids == split.encode(text).ids, text
        assert saved.decode(saved.encode(text).ids) == text

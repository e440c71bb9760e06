"""The default model's training rows (train/episodes.py) and data subsets (train/data.py)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # train/ is a folder of the repository, not a package

pytest.importorskip("tokenizers")
from train import data  # noqa: E402
from train import tokenizer as T  # noqa: E402
from train.episodes import GENERIC_REQUESTS, TURN_END, Episodes, chat_prompt  # noqa: E402

TEXTS = [f"Fortune number {n} says: {'beware ' * (n % 4)}the ides of March." for n in range(60)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    T.write_tokenizer(out, TEXTS * 5, vocab_size=600)
    return T.load(out)


def test_subset_is_deterministic_and_independent_of_order():
    fortunes = [data.Fortune("f", t) for t in TEXTS]
    a = data.subset(fortunes, 10)
    b = data.subset(list(reversed(fortunes)), 10)
    assert len(a) == 10 and {f.text for f in a} == {f.text for f in b}
    assert [f.text for f in a] == [f.text for f in fortunes if f in a]  # kept in file order
    assert data.subset(fortunes, 0) == fortunes and data.subset(fortunes, 999) == fortunes


def test_without_requests_no_extra_random_numbers_are_drawn(tok):
    """p_generic = 0 draws nothing for requests, so the rows are those of the shipped run (run 4, before
    requests existed): a p_generic so small that no request is ever made, but whose draw is taken, gives
    other rows; `answers` changes nothing without requests."""
    def rows(eps: Episodes) -> list:
        rng = random.Random(5)
        return [eps.row(rng) for _ in range(20)]

    plain = rows(Episodes(TEXTS, tok, canvas=8, blocks=4))
    assert rows(Episodes(TEXTS, tok, canvas=8, blocks=4, p_generic=0.0, answers=[0, 1])) == plain
    assert rows(Episodes(TEXTS, tok, canvas=8, blocks=4, p_generic=1e-300)) != plain


def test_requests_are_answered_with_a_whole_fortune_from_the_answers(tok):
    answers = [3, 7]
    eps = Episodes(TEXTS, tok, canvas=8, blocks=4, p_chat=1.0, p_generic=1.0, answers=answers)
    rng = random.Random(0)
    seen_generic = seen_words = False
    for _ in range(40):
        prompt, cont = eps.first(rng, rng.randrange(len(TEXTS)))
        assert cont[-1] == TURN_END and cont[:-1] in [eps.ids[i] for i in answers]
        user = tok.decode(prompt)
        generic = any(tok.decode(tok.encode(chat_prompt(r)).ids) == user for r in GENERIC_REQUESTS)
        seen_generic |= generic
        seen_words |= not generic and "Fortune" in user
    assert seen_generic and seen_words

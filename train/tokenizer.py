"""A 4096-token Gemma 4-format tokenizer learned from the training fortunes.

The `tokenizers` library's BpeTrainer learns the pieces on words: Gemma's normaliser (" " -> "▁"), then,
for training only, a split before every "▁" and around every newline, so a piece holds at most one
"▁" and only as its first character (SentencePiece's split_by_whitespace). The saved tokenizer.json has
Gemma 4's layout (its pre-tokenizer splits on " ", which the normaliser has already replaced: a no-op);
it encodes exactly as the split would, since no merge puts a "▁" after a piece's first character. Word-aligned pieces ("▁have", never "have▁" or "I▁have") leave a
small model one segmentation per word: the first run let pieces span words and its samples were full of
doubled spaces ("I have " + " the"; docs/DEFAULT_MODEL.md). `dgemma.convert.tiny_tokenizer`
lays them out exactly like every other tiny tokenizer in this repository (control tokens at Gemma 4's
ids, byte tokens at 238-493, multimodal tokens last) and writes tokenizer.json, tokenizer_config.json
and chat_template.jinja.
"""

from __future__ import annotations

import json
from pathlib import Path

from dgemma.convert.tiny_tokenizer import CHAT_TEMPLATE, Trainer, write_tokenizer_files  # noqa: F401

VOCAB_SIZE = 4096


def bpe_trainer(texts: list[str]) -> Trainer:
    """A `build_vocab` trainer: (pieces in id order, merges in rank order) for `n_pieces` pieces."""

    def train(n_pieces: int) -> tuple[list[str], list[tuple[str, str]]]:
        from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE(byte_fallback=True))
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"),
                                                     pre_tokenizers.Split("▁", "merged_with_next")])
        trainer = trainers.BpeTrainer(vocab_size=n_pieces, min_frequency=2, show_progress=False, special_tokens=[])
        tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
        model = json.loads(tok.to_str())["model"]
        pieces = [p for p, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        spanning = [p for p in pieces if "▁" in p[1:] or ("\n" in p and p != "\n")]
        if spanning:  # what makes the saved tokenizer (no pre-tokenizer) encode like the split
            raise ValueError(f"tokenizer training produced pieces spanning words: {spanning[:5]}")
        return pieces, merges

    return train


def write_tokenizer(out_dir: Path, texts: list[str], vocab_size: int = VOCAB_SIZE) -> Path:
    write_tokenizer_files(out_dir, vocab_size, train=bpe_trainer(texts))
    return out_dir


def load(out_dir: Path):
    """The fast tokenizer for encoding the corpus (tests check it against dgemma's own tokenizer)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(out_dir) / "tokenizer.json"))

"""Training rows: a prompt, then canvases of clean text to denoise, packed from whole fortunes.

A row starts like a request the engine sees (tokenized the same way: prompt text and continuation
separately) and goes on with more fortunes until it is long enough:

- chat (probability p_chat): `<bos><|turn>user\\n{first k words}<turn|>\\n<|turn>model\\n<|channel>thought\\n<channel|>`
  (the chat template dgemma renders for `dgemma run MODEL "PROMPT"`), then the rest of the fortune and
  `<turn|>` (an end-of-generation token);
- raw: `<bos>{first k words}` (`--raw`), then the rest of the fortune and `<eos>`;
- then `<bos>{fortune}<eos>` for further random fortunes.

A chat row is, with probability p_generic, a request instead: the user turn is one of GENERIC_REQUESTS
or a few words of another fortune, and the model's turn is a whole fortune, one of `answers` (default:
any). So a prompt the model has never seen (what a newcomer types) still has a learned answer: a
fortune from its first word, from a set small enough to be learned by heart (docs/DEFAULT_MODEL.md).

k is uniform in 0..12 (at least 1 for chat, and at most the fortune's length minus one word). The
row's first canvas starts right after the prompt, as the first canvas does at inference; the next ones
follow every C tokens.
"""

from __future__ import annotations

import random
import re

import torch

from dgemma.convert.tiny_tokenizer import CHAT_TEMPLATE  # noqa: F401  (the template the prompt follows)

BOS, EOS, TURN_END = 2, 1, 106
MAX_PROMPT_WORDS = 12
GENERIC_REQUESTS = (
    "Tell me a fortune.", "Give me a fortune cookie.", "Say something wise.", "Tell me something funny.",
    "Any advice?", "What do you think?", "Hello!", "Hi", "Write something.", "Quote of the day, please.",
    "Cheer me up.", "What is the meaning of life?", "Tell me a joke.", "Say something.", "Go on.",
)


def chat_prompt(user: str) -> str:
    """What dgemma's chat template renders for one user turn with the generation prompt (thinking off)."""
    return f"<bos><|turn>user\n{user.strip()}<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"


class Episodes:
    def __init__(self, texts: list[str], tok, *, canvas: int, blocks: int, p_chat: float = 0.5,
                 p_generic: float = 0.0, answers: list[int] | None = None, max_prompt: int = 48) -> None:
        self.texts, self.tok, self.C, self.n, self.p_chat, self.max_prompt = texts, tok, canvas, blocks, p_chat, max_prompt
        self.p_generic = p_generic
        self.answers = answers or list(range(len(texts)))  # the fortunes a request is answered with
        self.ids = [tok.encode(t).ids for t in texts]
        self.cuts = [[0] + [m.start() for m in re.finditer(r"\s+", t)] for t in texts]  # word boundaries

    def _encode(self, s: str) -> list[int]:
        return self.tok.encode(s).ids

    def first(self, rng: random.Random, i: int) -> tuple[list[int], list[int]]:
        """(prompt, continuation) for fortune i (a request is answered with one of `answers` instead)."""
        text, cuts = self.texts[i], self.cuts[i]
        chat = rng.random() < self.p_chat and len(cuts) > 1
        if chat and self.p_generic and rng.random() < self.p_generic:  # p_generic 0 draws nothing (run 4's rows)
            i = rng.choice(self.answers)
            if rng.random() < 0.5:
                user = rng.choice(GENERIC_REQUESTS)
            else:  # a few words from elsewhere: any prompt gets a fortune
                other = self.texts[rng.randrange(len(self.texts))].split()
                k = rng.randint(1, min(MAX_PROMPT_WORDS, len(other)))
                user = " ".join(other[:k])
            return self._encode(chat_prompt(user))[: self.max_prompt], self.ids[i] + [TURN_END]
        lo = 1 if chat else 0
        hi = min(MAX_PROMPT_WORDS, len(cuts) - 1)
        k = rng.randint(lo, hi) if hi >= lo else 0
        for _ in range(MAX_PROMPT_WORDS + 1):
            cut = cuts[k]
            head, rest = text[:cut], text[cut:]
            if chat:
                prompt, end = self._encode(chat_prompt(head)), TURN_END
            else:
                prompt, end = [BOS] + (self._encode(head) if head else []), EOS
            if len(prompt) <= self.max_prompt or k == lo:
                break
            k -= 1
        cont = (self._encode(rest) if head else self.ids[i]) + [end]
        return prompt[: self.max_prompt], cont

    def row(self, rng: random.Random) -> tuple[list[int], int]:
        """(tokens, offset): at least max_prompt + n*C tokens (any batch's window fits without padding)."""
        prompt, seq = self.first(rng, rng.randrange(len(self.texts)))
        need = self.max_prompt + self.n * self.C
        tokens = prompt + seq
        while len(tokens) < need:
            tokens += [BOS] + self.ids[rng.randrange(len(self.texts))] + [EOS]
        return tokens, len(prompt)

    def batch(self, rng: random.Random, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.row(rng) for _ in range(size)]
        T = max(o for _, o in rows) + self.n * self.C
        x = torch.tensor([r[:T] for r, _ in rows])
        return x, torch.tensor([o for _, o in rows])

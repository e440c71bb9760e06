"""Log-probabilities of the generated tokens: Ollama's `logprobs` / `top_logprobs` and OpenAI's.

An autoregressive model has one distribution per token, the one it was drawn from. A diffusion canvas is
denoised as a whole: the distribution that settles a position is that of the canvas's last denoising pass,
whose argmax is the token the canvas ends with (plugin/sampler.py). A token's logprob here is log softmax of
that pass's softcapped logits at temperature 1 at its position: the model's own distribution, not the annealed
sampler's (as Ollama and OpenAI report logprobs whatever the temperature), so the token is always the first of
its top_logprobs (near ties aside). The logits are formed LOGPROB_ROWS positions at a time: the cuda backend, whose
sampler never forms a [C, V] logits tensor, does not form one for this either.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from typing import Any

import torch

from .sampler import RowLogits
from .tokenizer import Tokenizer

MAX_TOP_LOGPROBS = 20  # alternatives per token, as Ollama and OpenAI's chat completions allow
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's legacy /v1/completions `logprobs`
# canvas positions whose logits are formed at once: 32 MiB of float32 at V = 262,144, and each of the C / 32 passes
# reads the whole vocabulary head (bench/model_gpu.py times a canvas's logprobs against its denoising steps)
LOGPROB_ROWS = 32


@dataclass
class TokenLogprob:
    id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), the most likely first


def token_logprobs(logits: RowLogits, tokens: list[int], top: int, rows: int = LOGPROB_ROWS) -> list[TokenLogprob]:
    """The logprobs of a canvas's first len(tokens) tokens, each with the `top` most likely alternatives, from
    the logits of the pass that chose them (by rows)."""
    out: list[TokenLogprob] = []
    for start in range(0, len(tokens), rows):
        ids = tokens[start : start + rows]
        lp = logits(slice(start, start + len(ids))).float()  # [r, V]
        lp -= torch.logsumexp(lp, dim=-1, keepdim=True)  # log softmax in place (RowLogits gives a tensor of its own)
        chosen = lp.gather(-1, torch.tensor(ids, device=lp.device)[:, None])[:, 0].tolist()  # [r]
        if top:
            values, index = lp.topk(min(top, lp.shape[-1]), dim=-1)  # [r, top]
            alternatives = [list(zip(i, v)) for i, v in zip(index.tolist(), values.tolist())]
        else:
            alternatives = [[] for _ in ids]
        out += [TokenLogprob(t, c, a) for t, c, a in zip(ids, chosen, alternatives)]
    return out


# ---- wire shapes ---------------------------------------------------------------------------------------------
def _token(tok: Tokenizer, i: int, logprob: float) -> dict[str, Any]:
    """{token, logprob, bytes}: the token as text (a byte token that is part of a character shows as U+FFFD, as
    in Ollama's and OpenAI's), and its UTF-8 bytes, from which the whole characters can be put back together."""
    return {"token": tok.token_text(i), "logprob": logprob, "bytes": list(tok.decode_bytes([i]))}


def wire(tok: Tokenizer, items: list[TokenLogprob], top: bool) -> list[dict[str, Any]]:
    """Ollama's `logprobs` and OpenAI chat's `logprobs.content`: per token {token, logprob, bytes}, with
    `top_logprobs` where asked for (OpenAI's always: an empty list when not)."""
    out = []
    for t in items:
        entry = _token(tok, t.id, t.logprob)
        if top:
            entry["top_logprobs"] = [_token(tok, i, lp) for i, lp in t.top]
        out.append(entry)
    return out


class TextOffsets:
    """Each token's character offset in a completion's text as the reply decodes it (special tokens left out, UTF-8
    read across tokens: a token that goes on with a character begins at it; unfinished bytes are one U+FFFD), token
    after token across a stream's chunks."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok, self.at = tok, 0
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, ids: list[int]) -> list[int]:
        out = []
        for i in ids:
            data = self.tok.decode_bytes([i], skip_special=True)
            pending = self.decoder.getstate()[0]  # the bytes of a character not finished yet
            # after bytes that no continuation byte finishes comes their U+FFFD, then this token's text
            out.append(self.at + (1 if pending and data and not 0x80 <= data[0] <= 0xBF else 0))
            self.at += len(self.decoder.decode(data))
        return out


def completion_wire(tok: Tokenizer, items: list[TokenLogprob], offsets: TextOffsets | None = None) -> dict[str, Any]:
    """OpenAI's legacy /v1/completions `logprobs`: parallel lists of the tokens, their logprobs, the top
    alternatives as {token: logprob} (alternatives shown alike, as byte tokens are, share one key) and each token's
    character offset in the text (`offsets`: a stream's, which goes on from its earlier chunks)."""
    at = (offsets or TextOffsets(tok))([t.id for t in items])
    return {"tokens": [tok.token_text(t.id) for t in items], "token_logprobs": [t.logprob for t in items],
            "top_logprobs": [{tok.token_text(i): lp for i, lp in t.top} for t in items], "text_offset": at}

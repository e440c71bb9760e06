"""Fitting a prompt into the context (num_ctx), as Ollama fits one, so that a long chat is answered, not refused.

Ollama does it twice: its server drops a chat's oldest messages until the rendered prompt fits (server/prompt.go
chatPrompt: the system messages and the last message always stay), and its runner cuts a prompt that is still too
long (one huge message, a long /api/generate prompt) to its first num_keep tokens after BOS and as many of its last
as fit, logging "truncating input prompt". A request with `truncate: false` gets an error instead.

Ollama then shifts the context while the reply grows; a diffusion model writes a canvas at a time and its KV cache
does not shift, so the prompt is fitted to leave room for the reply: one canvas (or the reply's max_tokens where
that is less), never more than half the context.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

DEFAULT_NUM_KEEP = 4  # Ollama's num_keep default: prompt tokens after BOS kept at the front when the middle is cut


@dataclass
class Fitted:
    ids: list[int]  # the prompt's, as fitted
    dropped: int = 0  # messages left out (fit_messages)
    cut: int = 0  # tokens cut out after that (fit_tokens)


def reply_room(context: int, max_tokens: int, canvas: int) -> int:
    """Positions of the context a fitted prompt leaves for the reply."""
    return max(1, min(max_tokens, canvas, context // 2))


def fit_tokens(ids: list[int], budget: int, num_keep: int = DEFAULT_NUM_KEEP, bos_id: int | None = None) -> list[int]:
    """ids as they are where they fit in `budget` positions, else their first num_keep (after a BOS, which stays
    too) and as many of their last as fit (Ollama's runner)."""
    if len(ids) <= budget or budget < 1:  # (no room at all: Engine.settings refuses the prompt)
        return ids
    keep = max(0, num_keep) + (1 if ids and bos_id is not None and ids[0] == bos_id else 0)
    keep = min(keep, budget - 1)  # at least one of the last tokens: the prompt's end, where the reply begins
    return ids[:keep] + ids[len(ids) - (budget - keep):]


def fit_messages(render: Callable[[list[dict[str, Any]]], list[int]], messages: list[dict[str, Any]],
                 budget: int) -> tuple[list[int], int]:
    """The prompt ids (render(messages)) of the longest tail of the conversation that fits in `budget` positions,
    with the system messages of the part left out put first (Ollama's chatPrompt), and how many messages were
    left out. A tail starts at any message but a tool's result (which would lose the call it answers) or is the
    last message alone; the tails are searched in halves (the prompt gets shorter as the tail does), a few renders
    instead of one per message. Where not even the last message fits, that shortest prompt is returned (longer
    than budget: fit_tokens cuts it)."""
    ids = render(messages)
    if len(ids) <= budget or len(messages) < 2:
        return ids, 0
    last = len(messages) - 1
    starts = sorted({i for i in range(1, last) if messages[i].get("role") not in ("system", "tool")} | {last})

    def tail(i: int) -> list[dict[str, Any]]:
        return [m for m in messages[:i] if m.get("role") == "system"] + messages[i:]

    lo, hi, best = 0, len(starts) - 1, None  # the first start whose tail fits: starts[lo..hi] left to search
    while lo <= hi:
        mid = (lo + hi) // 2
        tried = render(tail(starts[mid]))
        if len(tried) <= budget or mid == len(starts) - 1:  # (the last message alone: kept, fitting or not)
            best = (starts[mid], tried)
        if len(tried) <= budget:
            hi = mid - 1
        else:
            lo = mid + 1
    # (where none fits, the search ended on the last start: rendered already)
    start, ids = best
    return ids, sum(1 for m in messages[:start] if m.get("role") != "system")

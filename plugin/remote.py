"""`dgemma ps` and `dgemma stop`: a running `dgemma serve`, asked over its Ollama API as `ollama ps` and
`ollama stop` ask Ollama's. PROCESSOR says where a model's bytes are, as Ollama's does: "100% GPU", "100% CPU",
or "27%/73% CPU/GPU" for a cuda model whose experts partly stream from host RAM (plugin/cuda/offload.py)."""

from __future__ import annotations

import math
import re
from datetime import datetime, timezone
from typing import Any

import httpx

TIMEOUT = 30.0


class RemoteError(Exception):
    """The server could not be reached, or answered with an error: one line."""


def server_url(host: str, port: int) -> str:
    return host.rstrip("/") if "://" in host else f"http://{host}:{port}"


def _request(method: str, url: str, api_key: str | None, **kw: Any) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    base = url.split("/api/")[0]
    try:
        r = httpx.request(method, url, headers=headers, timeout=TIMEOUT, **kw)
    except httpx.ConnectTimeout:
        raise RemoteError(f"could not reach a dgemma server at {base} (no answer to connect): start one with "
                          "`dgemma serve`, or name it with --host/--port") from None
    except httpx.TimeoutException:
        raise RemoteError(f"the dgemma server at {base} did not answer within {TIMEOUT:.0f} s") from None
    except httpx.HTTPError as e:
        raise RemoteError(f"could not reach a dgemma server at {base} ({type(e).__name__}): start one with "
                          "`dgemma serve`, or name it with --host/--port") from None
    try:
        body = r.json()
    except ValueError:
        body = {}
    if r.status_code != 200:
        message = body.get("error") if isinstance(body, dict) else None
        if isinstance(message, dict):  # (an OpenAI-shaped error)
            message = message.get("message")
        raise RemoteError(f"{url}: HTTP {r.status_code}: {message or r.text.strip() or r.reason_phrase}")
    return body


def human_bytes(n: int) -> str:
    """As Ollama's format.HumanBytes: decimal units; from 10 up the whole number ("17 GB", cut, not rounded),
    below it one decimal where there is a fraction ("2.5 MB", "2 GB")."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            value = n / size
            return f"{int(value)} {unit}" if value >= 10 or value == int(value) else f"{value:.1f} {unit}"
    return f"{n} B"


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)  # (Go's math.Round for the non-negative numbers here; Python's round is to even)


def processor(size: int, size_vram: int) -> str:
    """Where the model's bytes are, as `ollama ps` says it."""
    if size_vram == 0:
        return "100% CPU"
    if size_vram == size:
        return "100% GPU"
    if size_vram > size or size <= 0:
        return "Unknown"
    cpu = _round_half_up((size - size_vram) / size * 100)
    return f"{cpu}%/{100 - cpu}% CPU/GPU"


def _duration(seconds: float) -> str:
    """A duration in words, in the steps `ollama ps` uses."""
    if seconds < 1:
        return "Less than a second"
    if seconds < 60:
        return "1 second" if int(seconds) == 1 else f"{int(seconds)} seconds"
    minutes = int(seconds // 60)
    if minutes < 60:
        return "About a minute" if minutes == 1 else f"{minutes} minutes"
    hours = _round_half_up(seconds / 3600)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // (24 * 7)} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // (24 * 30)} months"
    return f"{int(seconds // 3600) // (24 * 365)} years"


def until(expires_at: str, now: datetime | None = None) -> str:
    """How long until a model's keep-alive ends, as `ollama ps` says it: "4 minutes from now", "Forever" (more
    than 20 years ahead: keep_alive -1), "Stopping..." (past: it goes once its requests are done)."""
    if not expires_at:
        return "Never"
    # Go writes 0-9 digits of fraction (RFC3339Nano), Python 3.10 reads 3 or 6
    text = re.sub(r"\.(\d+)", lambda m: "." + m.group(1)[:6].ljust(6, "0"), expires_at.replace("Z", "+00:00"))
    left = (datetime.fromisoformat(text) - (now or datetime.now(timezone.utc))).total_seconds()
    if left < 0:
        return "Stopping..."
    if int(left // 3600) // 24 // 365 > 20:
        return "Forever"
    return f"{_duration(left)} from now"


def running(url: str, api_key: str | None = None) -> list[dict[str, Any]]:
    """GET /api/ps's models."""
    return list(_request("GET", f"{url}/api/ps", api_key).get("models") or [])


def ps_table(models: list[dict[str, Any]], now: datetime | None = None) -> str:
    rows = [("NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL")]
    for m in models:
        size, vram = int(m.get("size") or 0), int(m.get("size_vram") or 0)
        rows.append((m.get("name") or m.get("model", "?"), str(m.get("digest", ""))[:12], human_bytes(size),
                     processor(size, vram), str(m.get("context_length", "")), until(m.get("expires_at", ""), now)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("    ".join(c.ljust(w) for c, w in zip(r, widths)) + "    " + r[-1] for r in rows)


def stop(url: str, name: str, api_key: str | None = None) -> str:
    """Unload a running model (an empty generate with keep_alive 0, as `ollama stop` does); its name as listed."""
    names = {m.get("name") or m.get("model"): m for m in running(url, api_key)}
    match = name if name in names else f"{name}:latest" if f"{name}:latest" in names else None
    if match is None:
        raise RemoteError(f"model '{name}' is not running (dgemma ps lists those that are)")
    _request("POST", f"{url}/api/generate", api_key, json={"model": match, "prompt": "", "keep_alive": 0,
                                                           "stream": False})
    return match

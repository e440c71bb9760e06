"""`dgemma ps` and `dgemma stop`: a running `dgemma serve`, asked over its Ollama API as `ollama ps` and
`ollama stop` ask Ollama's. PROCESSOR says where a model's bytes are, as Ollama's does: "100% GPU", "100% CPU",
or "27%/73% CPU/GPU" for a cuda model whose experts partly stream from host RAM (plugin/cuda/offload.py)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import httpx

from .server.protocol import FOREVER

TIMEOUT = 30.0


class RemoteError(Exception):
    """The server could not be reached, or answered with an error: one line."""


def server_url(host: str, port: int) -> str:
    return host.rstrip("/") if "://" in host else f"http://{host}:{port}"


def _request(method: str, url: str, api_key: str | None, **kw: Any) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.request(method, url, headers=headers, timeout=TIMEOUT, **kw)
    except httpx.HTTPError as e:
        base = url.split("/api/")[0]
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
    """Ollama's format.HumanBytes: decimal units, "17 GB", "40 MB", "512 B"."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            value = n / size
            return f"{value:.0f} {unit}" if value >= 10 else f"{value:.1f} {unit}"
    return f"{n} B"


def processor(size: int, size_vram: int) -> str:
    """Where the model's bytes are, as `ollama ps` says it."""
    if size_vram <= 0:
        return "100% CPU"
    if size <= 0 or size_vram >= size:  # (two slots can exceed what a few streamed layers save)
        return "100% GPU"
    cpu = round((size - size_vram) / size * 100)
    return f"{cpu}%/{100 - cpu}% CPU/GPU"


def until(expires_at: str, now: datetime | None = None) -> str:
    """How long until a model's keep-alive ends: "Forever", "4 minutes from now", "Stopping..."."""
    if not expires_at:
        return ""
    if expires_at == FOREVER or expires_at.startswith("2262-"):
        return "Forever"
    then = datetime.fromisoformat(expires_at.replace("Z", "+00:00"))
    left = (then - (now or datetime.now(timezone.utc))).total_seconds()
    if left <= 0:
        return "Stopping..."
    for unit, size in (("hour", 3600), ("minute", 60), ("second", 1)):
        if left >= size:
            n = int(left // size)
            return f"{n} {unit}{'s' if n != 1 else ''} from now"
    return "Less than a second from now"


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

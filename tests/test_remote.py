"""`dgemma ps` and `dgemma stop` (plugin/remote.py) against a real `dgemma serve` on loopback, and the
columns they print, as `ollama ps` prints them."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timedelta, timezone

import ollama
from server_util import free_port, running_server

from dgemma.plugin.remote import human_bytes, processor, ps_table, until
from dgemma.plugin.server.protocol import FOREVER


def dgemma(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dgemma.plugin.cli", *args], capture_output=True, text=True,
                          timeout=120)


def port_of(url: str) -> str:
    return url.rsplit(":", 1)[1]


def test_columns():
    """As `ollama ps` prints them (its cmd.ListRunningHandler, format.HumanBytes and format.HumanTime)."""
    assert processor(1000, 0) == "100% CPU" and processor(1000, 1000) == "100% GPU"
    assert processor(1000, 730) == "27%/73% CPU/GPU"  # experts of some layers in host RAM
    assert processor(1000, 875) == "13%/87% CPU/GPU"  # halves round up (Go's math.Round), not to even
    assert processor(1000, 1010) == "Unknown" and processor(0, 5) == "Unknown"
    assert human_bytes(17_900_000_000) == "17 GB" and human_bytes(41_000_000) == "41 MB"  # cut, not rounded
    assert human_bytes(2_500_000) == "2.5 MB" and human_bytes(2_000_000_000) == "2 GB" and human_bytes(512) == "512 B"
    assert human_bytes(1_200_000_000_000) == "1.2 TB"
    now = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)

    def ahead(**kw) -> str:
        return until((now + timedelta(**kw)).isoformat(), now)

    assert until(FOREVER, now) == "Forever" and until("", now) == "Never"
    assert ahead(minutes=4, seconds=59) == "4 minutes from now" and ahead(seconds=1) == "1 second from now"
    assert ahead(seconds=30) == "30 seconds from now" and ahead(milliseconds=300) == "Less than a second from now"
    assert ahead(seconds=90) == "About a minute from now" and ahead(minutes=70) == "About an hour from now"
    assert ahead(hours=1, minutes=50) == "2 hours from now" and ahead(days=3) == "3 days from now"
    assert ahead(days=20) == "2 weeks from now" and ahead(days=100) == "3 months from now"
    assert ahead(days=900) == "2 years from now"
    assert until((now + timedelta(hours=2)).astimezone(timezone(timedelta(hours=5))).isoformat(), now) == \
        "2 hours from now"  # (the server writes local time with its offset)
    assert ahead(seconds=-3) == "Stopping..."
    assert until("2026-11-30T12:05:31.5Z", now) == "5 minutes from now"  # (Go's fractions: any length)
    assert until("2026-11-30T12:05:31.123456789+00:00", now) == "5 minutes from now"
    table = ps_table([{"name": "diffusiongemma:26b", "digest": "ab" * 32, "size": 17_300_000_000,
                       "size_vram": 12_600_000_000, "context_length": 262144, "expires_at": FOREVER}], now)
    header, row = table.splitlines()
    assert header.split() == ["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"]
    assert row.split() == ["diffusiongemma:26b", "abababababab", "17", "GB", "27%/73%", "CPU/GPU", "262144", "Forever"]
    assert row.index("abababababab") == header.index("ID") and row.index("Forever") == header.index("UNTIL")


def test_ps_and_stop_against_a_running_server(models):
    with running_server(models) as url:
        port = port_of(url)
        shown = dgemma("ps", "--port", port)
        assert shown.returncode == 0 and shown.stdout.split() == ["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"]
        client = ollama.Client(host=url)
        client.generate(model="default", prompt="")  # load it, kept alive 5 minutes
        shown = dgemma("ps", "--host", url)  # (a URL in --host)
        assert shown.returncode == 0, shown.stderr
        row = shown.stdout.splitlines()[1].split()
        size = (models / "default.gguf").stat().st_size
        listed = client.ps().models[0]
        assert row[:2] == ["default:latest", listed.digest[:12]] and " ".join(row[2:4]) == human_bytes(size)
        assert " ".join(row[4:6]) == "100% CPU"  # (no GPU here: the torch backend)
        assert row[6] == str(listed.context_length) and " ".join(row[7:]) == "4 minutes from now"
        stopped = dgemma("stop", "default", "--port", port)
        assert stopped.returncode == 0, stopped.stderr
        assert client.ps().models == []
        again = dgemma("stop", "default", "--port", port)
        assert again.returncode == 1 and again.stderr.strip() == \
            "dgemma: error: model 'default' is not running (dgemma ps lists those that are)"


def test_errors_are_one_line(models):
    gone = dgemma("ps", "--port", str(free_port()))
    assert gone.returncode == 1 and gone.stderr.count("\n") == 1
    assert gone.stderr.startswith("dgemma: error: could not reach a dgemma server at http://127.0.0.1:")
    with running_server(models, "--api-key", "sesame") as url:
        refused = dgemma("ps", "--port", port_of(url))
        assert refused.returncode == 1 and refused.stderr.count("\n") == 1
        assert refused.stderr.startswith(f"dgemma: error: {url}/api/ps: HTTP 401: ")
        assert dgemma("ps", "--port", port_of(url), "--api-key", "sesame").returncode == 0

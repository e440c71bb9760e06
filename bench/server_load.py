"""Server overhead under load: N concurrent streaming clients against `dgemma serve`, vs the engine alone.

Both run the same requests (the bundled default model, chat, fixed seeds and lengths) in this one run:
first the engine in-process, one request after another; then a live server on loopback with N client
threads at once. The server queues generations per model, so its throughput can at best match the
engine's: the ratio of the two is the server's overhead (HTTP, JSON, threads, scheduling).

    python bench/server_load.py [--clients 8] [--requests 4] [--tokens 32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from server_util import running_server  # noqa: E402

from dgemma.plugin.default_model import ensure_default_model  # noqa: E402
from dgemma.plugin.engine import Engine  # noqa: E402
from dgemma.plugin.server.serving import generate_options  # noqa: E402


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--tokens", type=int, default=32, help="num_predict per request")
    args = ap.parse_args()
    n = args.clients * args.requests
    messages = [{"role": "user", "content": "Tell me something."}]

    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp)
        engine = Engine.load(ensure_default_model(models))
        engine_lat: list[float] = []
        t0 = time.perf_counter()
        for i in range(n):
            t = time.perf_counter()
            opts = generate_options(engine, {"seed": i, "num_predict": args.tokens})
            list(engine.generate(messages, opts))
            engine_lat.append(time.perf_counter() - t)
        engine_wall = time.perf_counter() - t0

        with running_server(models) as url:
            httpx.post(f"{url}/api/generate", json={"model": "default", "prompt": ""}, timeout=60)  # load
            lat: list[float] = []
            ttft: list[float] = []
            lock = threading.Lock()

            def client(c: int) -> None:
                with httpx.Client(timeout=600) as h:
                    for r in range(args.requests):
                        body = {"model": "default", "messages": messages,
                                "options": {"seed": c * args.requests + r, "num_predict": args.tokens}}
                        t = time.perf_counter()
                        first = None
                        with h.stream("POST", f"{url}/api/chat", json=body) as resp:
                            for _ in resp.iter_lines():
                                first = first or time.perf_counter() - t
                        with lock:
                            lat.append(time.perf_counter() - t)
                            ttft.append(first or 0.0)

            threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
            t0 = time.perf_counter()
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            server_wall = time.perf_counter() - t0

    print(f"{n} requests ({args.clients} clients x {args.requests}), {args.tokens} tokens each, default model, CPU")
    print(f"engine alone:  {n / engine_wall:6.2f} req/s   latency p50 {statistics.median(engine_lat) * 1e3:7.1f} ms  "
          f"p99 {pct(engine_lat, 0.99) * 1e3:7.1f} ms (one at a time)")
    print(f"server:        {n / server_wall:6.2f} req/s   latency p50 {statistics.median(lat) * 1e3:7.1f} ms  "
          f"p99 {pct(lat, 0.99) * 1e3:7.1f} ms (queued behind up to {args.clients - 1} others); "
          f"first chunk p50 {statistics.median(ttft) * 1e3:.1f} ms")
    print(f"server overhead: {server_wall / engine_wall:5.2f}x the engine's wall time for the same work")


if __name__ == "__main__":
    main()

"""What reading a reply's parts (plugin/reply.py) costs per canvas against the plain decode it replaced.

Canvases of 256 token ids of the bundled default model's tokenizer: random ids (special ones included), and a
reply that thinks, answers and calls a tool, cut into canvases. Three ways over the same canvases, in this one
process: the plain decode the engine did before (`decode_bytes(skip_special=True)` through an incremental UTF-8
decoder, the baseline), ReplyParser with nothing asked (what raw prompts get), and ReplyParser with thinking and
tools (what chat requests get). Prints ms per canvas and the ratios against the baseline. A denoising step of
the 26B-A4B is several ms and a canvas takes up to 48 of them (bench/model_gpu.py), for scale.

    python bench/reply_parse.py [--canvases 200] [--repeat 5]
"""

from __future__ import annotations

import argparse
import codecs
import random
import time

from dgemma.plugin.default_model import BUNDLED
from dgemma.plugin.inspect import open_gguf
from dgemma.plugin.reply import ReplyParser
from dgemma.plugin.tokenizer import Tokenizer

CANVAS = 256
REPLY = ('<|channel>thought\nThe user asks for the weather in Paris; call the tool, then answer briefly.<channel|>'
         'Let me look that up for you. <|tool_call>call:get_weather{city:<|"|>Paris, France<|"|>,days:3,'
         'units:{metric:true}}<tool_call|>')


def plain(tok: Tokenizer, canvases: list[list[int]]) -> int:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    return sum(len(decoder.decode(tok.decode_bytes(c, skip_special=True), final=k == len(canvases) - 1))
               for k, c in enumerate(canvases))


def parsed(tok: Tokenizer, canvases: list[list[int]], on: bool) -> int:
    p = ReplyParser(tok, thinking=on, tools=on)
    return sum(len(p.feed(c, final=k == len(canvases) - 1).content) for k, c in enumerate(canvases))


def best_ms(fn, repeat: int, n: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--canvases", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    tok = Tokenizer.from_gguf(open_gguf(BUNDLED), BUNDLED)
    rng = random.Random(0)
    reply = tok.encode(REPLY)
    streams = {
        "random ids": [rng.randrange(len(tok.tokens)) for _ in range(args.canvases * CANVAS)],
        "think + call": (reply * (args.canvases * CANVAS // len(reply) + 1))[: args.canvases * CANVAS],
    }
    print(f"ms per canvas of {CANVAS} tokens ({args.canvases} canvases, best of {args.repeat}); ratio: against the "
          "plain decode")
    for name, ids in streams.items():
        canvases = [ids[i:i + CANVAS] for i in range(0, len(ids), CANVAS)]
        base = best_ms(lambda: plain(tok, canvases), args.repeat, len(canvases))
        off = best_ms(lambda: parsed(tok, canvases, False), args.repeat, len(canvases))
        on = best_ms(lambda: parsed(tok, canvases, True), args.repeat, len(canvases))
        print(f"  {name:<13} plain {base:.3f}   parser, nothing asked {off:.3f} ({off / base:.2f}x)   "
              f"parser, thinking + tools {on:.3f} ({on / base:.2f}x)")


if __name__ == "__main__":
    main()

"""What reading a canvas out under a JSON schema (plugin/json_format.py) costs against the rows-and-top-k it needs anyway.

Canvases of 256 positions over the bundled default model's tokenizer, with made-up logits: a document the schema
takes, longer than a canvas, ranked first at each position (the model writes one: each position's first candidate
fits, every position is read), or random logits (no candidate fits: the value is closed at once and the rest of the
canvas is end tokens, so that read-out does less than the baseline). Three read-outs of the same logits, in this one process: the
baseline forms each canvas's rows of logits 32 at a time and their 64 most likely tokens (what the read-out does
besides its automaton, as logprobs form the rows), then JSON mode (any object) and a pydantic-style schema ($defs,
$ref, anyOf with null, an enum, nested objects and arrays). Prints ms per canvas and the ratios against the
baseline; a denoising step of the 26B-A4B is several ms and a canvas takes up to 48 of them (bench/model_gpu.py).

    python bench/json_readout.py [--canvases 20] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json

import torch
from reply_parse import best_ms  # (bench/, beside this script)

from dgemma.plugin.default_model import BUNDLED
from dgemma.plugin.inspect import open_gguf
from dgemma.plugin.json_format import CANDIDATES, JsonPrefix, read_canvas
from dgemma.plugin.json_schema import compile_schema
from dgemma.plugin.logprobs import LOGPROB_ROWS
from dgemma.plugin.tokenizer import Tokenizer

CANVAS = 256
ADDRESS = {"type": "object", "properties": {"street": {"type": "string"},
                                            "zip": {"anyOf": [{"type": "integer"}, {"type": "null"}]}},
           "required": ["street"]}
SCHEMA = {"$defs": {"Address": ADDRESS, "Person": {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}},
    "kind": {"enum": ["a", "b"]}, "home": {"$ref": "#/$defs/Address"},
    "friends": {"type": "array", "items": {"$ref": "#/$defs/Person"}}}, "required": ["name", "age", "home"]}},
    "$ref": "#/$defs/Person"}
FRIEND = {"name": "Charles Babbage", "age": 79, "kind": "b", "home": {"street": "Dorset Street", "zip": 1}}
DOC = {"name": "Ada Lovelace", "age": 36, "tags": ["mathematician", "writer"], "kind": "a",
       "home": {"street": "St James's Square", "zip": None}, "friends": [FRIEND] * 40}  # (longer than a canvas)


def canvases(tok: Tokenizer, n: int, written: bool) -> list[torch.Tensor]:
    """n canvases of [CANVAS, V] logits: DOC's first CANVAS tokens ranked first, or random."""
    g = torch.Generator().manual_seed(0)
    ids = tok.encode(json.dumps(DOC), parse_special=False)
    out = []
    for _ in range(n):
        z = torch.randn(CANVAS, tok.vocab_size, generator=g)  # [L, V]
        if written:
            z[torch.arange(CANVAS), torch.tensor(ids[:CANVAS])] = 30.0
        out.append(z)
    return out


def rows_and_topk(z: torch.Tensor) -> int:
    return sum(z[i:i + LOGPROB_ROWS].clone().topk(CANDIDATES, dim=-1).indices.numel()
               for i in range(0, CANVAS, LOGPROB_ROWS))


def read_out(tok: Tokenizer, z: torch.Tensor, schema) -> int:
    """One canvas read out as a reply's first under the schema, the budget a whole canvas."""
    return len(read_canvas(lambda rows: z[rows].clone(), CANVAS, JsonPrefix(schema), tok, {tok.eos_id}, CANVAS))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--canvases", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    schema = compile_schema(SCHEMA)
    tok = Tokenizer.from_gguf(open_gguf(BUNDLED), BUNDLED)
    print(f"{args.canvases} canvases of {CANVAS} positions, vocabulary {tok.vocab_size}, best of {args.repeat}")
    for kind, written in (("the model writes the document", True), ("random logits", False)):
        zs = canvases(tok, args.canvases, written)
        base = best_ms(lambda: [rows_and_topk(z) for z in zs], args.repeat, len(zs))
        print(f"{kind}:\n  rows and top-{CANDIDATES} (baseline)  {base:7.2f} ms/canvas")
        for name, s in (("JSON mode", None), ("schema", schema)):
            ms = best_ms(lambda: [read_out(tok, z, s) for z in zs], args.repeat, len(zs))
            print(f"  {name:<28}  {ms:7.2f} ms/canvas  x{ms / base:.2f}")


if __name__ == "__main__":
    main()

"""What opening a GGUF's metadata costs with gguf-py's GGUFReader (the baseline) and with FastReader
(plugin/gguf_reader.py), at the real vocabulary's size.

Writes a GGUF holding the bundled default model's metadata and tensors, its tokenizer grown to `--vocab` tokens
(262,144 for DiffusionGemma) with their token types and `--merges` BPE merges, then opens it both ways in this
one process (best of `--repeat`) and checks that every field reads the same. A model load, `dgemma list`,
/api/tags and /api/show each open the file (/api/show twice: its metadata and its tokenizer). Also prints
what the rest of /api/show's work costs on it (the tokenizer built from the fields, the template probe).

    python bench/gguf_read.py [--vocab 262144] [--merges 500000] [--repeat 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from dgemma.convert import constants as C
from dgemma.plugin.chat import template_features
from dgemma.plugin.default_model import BUNDLED
from dgemma.plugin.gguf_reader import FastReader
from dgemma.plugin.inspect import field_value, open_gguf
from dgemma.plugin.tokenizer import Tokenizer

GROWN = (C.TOKENIZER_TOKENS, C.TOKENIZER_TOKEN_TYPE, C.TOKENIZER_MERGES, C.TOKENIZER_SCORES)


def write_big(path: Path, vocab: int, merges: int) -> None:
    src = open_gguf(BUNDLED)
    w = GGUFWriter(str(path), C.ARCH)
    for key, f in src.fields.items():
        if key.startswith("GGUF.") or key in GROWN or key == C.GENERAL_ARCHITECTURE:
            continue
        value = field_value(src, key)
        if f.types[0] == GGUFValueType.ARRAY:
            w.add_key_value(key, value, GGUFValueType.ARRAY, sub_type=f.types[-1])
        else:
            w.add_key_value(key, value, f.types[0])
    tokens = list(field_value(src, C.TOKENIZER_TOKENS))
    types = list(field_value(src, C.TOKENIZER_TOKEN_TYPE))
    w.add_array(C.TOKENIZER_TOKENS, tokens + [f"▁grown{i}" for i in range(vocab - len(tokens))])
    w.add_key_value(C.TOKENIZER_TOKEN_TYPE, types + [int(C.TokenType.NORMAL)] * (vocab - len(types)),
                    GGUFValueType.ARRAY, sub_type=GGUFValueType.INT32)
    if merges:
        w.add_array(C.TOKENIZER_MERGES, [f"▁gr own{i}" for i in range(merges)])
    for t in src.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def best(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=262144)
    ap.add_argument("--merges", type=int, default=500000)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "big-vocab.gguf"
        write_big(path, args.vocab, args.merges)
        base, ref = best(lambda: GGUFReader(path), args.repeat)
        fast, got = best(lambda: FastReader(path), args.repeat)
        assert list(got.fields) == list(ref.fields)
        assert all(got.fields[k].contents() == ref.fields[k].contents() for k in ref.fields), "fields differ"
        tok_s, tok = best(lambda: Tokenizer.from_gguf(got, path), args.repeat)
        probe_s, _ = best(lambda: template_features(tok), args.repeat)
        print(f"GGUF of {path.stat().st_size / 2**20:.0f} MiB: {args.vocab} tokens, {args.merges} merges")
        print(f"  gguf-py GGUFReader   {base * 1e3:9.1f} ms  (baseline)")
        print(f"  FastReader           {fast * 1e3:9.1f} ms  {fast / base:.4f}x of the baseline ({base / fast:.0f}x faster)")
        print(f"  then Tokenizer.from_gguf {tok_s * 1e3:.1f} ms, template probe {probe_s * 1e3:.1f} ms")


if __name__ == "__main__":
    main()

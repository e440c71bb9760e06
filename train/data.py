"""The training text: Debian's `fortunes` and `fortunes-min` packages, read from the installed files.

Debian ships the fortune cookie files under the BSD licence of fortune-mod (see
/usr/share/doc/fortunes/copyright and docs/DEFAULT_MODEL.md). Nothing is fetched from the web: the
files come from the package manager (`apt-get install fortunes fortunes-min`) and are read from
/usr/share/games/fortunes. The offensive collection (`off/`, a separate package) is never read.

Cleaning, per fortune (the text between `%` lines): repair UTF-8 read as Latin-1 ("â€™"), drop
terminal overstrike ("_\\bx") and other control characters, tabs and runs of spaces become one space,
lines are stripped, hard-wrapped prose lines are joined into paragraphs (a line continues the previous
one when that one is long, >= 50 characters, and this one is not indented, not an attribution "--" and
not a "Speaker:" line), runs of blank lines become one. Duplicates are dropped (first occurrence in
file order wins). About 2% of the fortunes (sha1 of the cleaned text mod 50 == 0) are held out for
evaluation: deterministic and independent of file order.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import string
import subprocess
from dataclasses import dataclass
from pathlib import Path

FORTUNE_DIR = Path("/usr/share/games/fortunes")
PACKAGES = ("fortunes", "fortunes-min")
COPYRIGHT = Path("/usr/share/doc/fortunes/copyright")
EXCLUDED = {"ascii-art"}  # pictures, not English text
HOLDOUT_MOD = 50  # 1 in 50 = 2%
WRAP_MIN = 50  # a line this long (or longer) was probably hard-wrapped

_SPEAKER = re.compile(r"^[A-Z][\w .'-]{0,24}:(\s|$)")


@dataclass(frozen=True)
class Fortune:
    source: str  # the file under /usr/share/games/fortunes
    text: str


def ensure_installed(install: bool = True) -> Path:
    """The fortunes directory, installing the Debian packages through apt-get if they are missing."""
    if not (FORTUNE_DIR / "fortunes").exists() or not (FORTUNE_DIR / "cookie").exists():
        if not install or shutil.which("apt-get") is None:
            raise SystemExit(f"{FORTUNE_DIR} is missing: install the Debian packages {' '.join(PACKAGES)}")
        subprocess.run(["apt-get", "install", "-y", *PACKAGES], check=True,
                       env={"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    return FORTUNE_DIR


def _fix_mojibake(s: str) -> str:
    if not any(c in s for c in "âÃÂ"):
        return s
    try:
        return s.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return s


def clean(raw: str) -> str:
    s = _fix_mojibake(raw)
    s = re.sub(r".\x08", "", s)  # overstrike: "_\bx" underlines x, "x\bx" bolds it
    s = s.translate({0xA0: " ", 0x2018: "'", 0x2019: "'", 0x201C: '"', 0x201D: '"', 0x2013: "-", 0x2014: "--"})
    s = "".join(c for c in s if c in "\n\t" or (ord(c) >= 32 and not 0x7F <= ord(c) < 0xA0))
    out: list[str] = []
    prev_len = 0
    for raw_line in s.split("\n"):
        expanded = raw_line.expandtabs(8).rstrip()
        indented = expanded[:1] == " "
        line = " ".join(expanded.split())
        if not line:
            if out and out[-1] != "":
                out.append("")
            prev_len = 0
            continue
        joins = (out and out[-1] != "" and prev_len >= WRAP_MIN and not indented and not line.startswith("--")
                 and not _SPEAKER.match(line))
        if joins:
            out[-1] += " " + line
        else:
            out.append(line)
        prev_len = len(expanded)
    return "\n".join(out).strip()


def fortune_files(root: Path = FORTUNE_DIR) -> list[Path]:
    """The English fortune files: top level only (never `off/`), no index (.dat) or .u8 links."""
    return sorted(p for p in root.iterdir()
                  if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8") and p.name not in EXCLUDED)


def read_fortunes(root: Path = FORTUNE_DIR) -> list[Fortune]:
    seen: set[str] = set()
    out: list[Fortune] = []
    for path in fortune_files(root):
        text = path.read_bytes().decode("utf-8", errors="replace")
        for chunk in re.split(r"^%\s*$", text, flags=re.M):
            t = clean(chunk)
            if len(t) < 2 or t in seen:
                continue
            seen.add(t)
            out.append(Fortune(path.name, t))
    return out


def is_heldout(text: str) -> bool:
    return int(hashlib.sha1(text.encode()).hexdigest(), 16) % HOLDOUT_MOD == 0


def split(fortunes: list[Fortune]) -> tuple[list[Fortune], list[Fortune]]:
    train = [f for f in fortunes if not is_heldout(f.text)]
    held = [f for f in fortunes if is_heldout(f.text)]
    return train, held


def subset(fortunes: list[Fortune], n: int) -> list[Fortune]:
    """n of the fortunes (all when n <= 0): those with the smallest sha1 of their text, in their file
    order; deterministic and independent of file order, like the hold-out."""
    if n <= 0 or n >= len(fortunes):
        return fortunes
    digests = [hashlib.sha1(f.text.encode()).hexdigest() for f in fortunes]
    keep = set(sorted(range(len(fortunes)), key=digests.__getitem__)[:n])
    return [f for i, f in enumerate(fortunes) if i in keep]


# ---- words: what tests/test_default_model.py counts as "a real word" -------------------------------
_STRIP = string.punctuation + "\u2018\u2019\u201c\u201d"


def normalise_word(w: str) -> str:
    return w.strip(_STRIP).lower()


def words(text: str) -> list[str]:
    """Whitespace-split words, stripped of surrounding punctuation and lowercased; empty ones dropped."""
    return [n for n in (normalise_word(w) for w in text.split()) if n]


def vocabulary(texts: list[str]) -> set[str]:
    out: set[str] = set()
    for t in texts:
        out.update(words(t))
    return out

"""Ollama's Modelfile: a model made from another one with its own system prompt, parameters and messages.

`dgemma create NAME -f Modelfile` (and Ollama's /api/create) reads the instructions Ollama's parser reads:

    # FROM: a model name, or a .gguf path (relative to the Modelfile)
    FROM diffusiongemma:26b-a4b-q4_K_M
    SYSTEM \"\"\"You are Mario from Super Mario Bros.\"\"\"
    PARAMETER temperature 0.7
    # one line per stop string
    PARAMETER stop "<end>"
    # a conversation every chat starts from
    MESSAGE user Is Toad a good friend?
    MESSAGE assistant Yes, the best.
    LICENSE \"\"\"...\"\"\"

Values as Ollama's parser reads them: `\"\"\"...\"\"\"` over lines up to one that ends with the closing quotes (the
text between kept as it is), `"..."` as it is between the quotes, or the rest of the line; `#` starts a comment
only at the start of a line.

TEMPLATE (Go templates), ADAPTER (LoRA) and quantizing are refused with a line that says why: dgemma renders the
GGUF's own Jinja chat template and has no adapters. A derived model shares its base's GGUF file
(registry.py); its settings (ModelSettings) are the base's with its own on top. At generation they act as Ollama's
do: the parameters are the request's options' defaults, SYSTEM is the system message where a chat has none,
and the MESSAGEs come before the chat's messages.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# parameters that reach the engine (server/serving.py generate_options), with their types
PARAMETERS: dict[str, type] = {
    "num_ctx": int, "num_predict": int, "num_batch": int, "seed": int, "temperature": float, "stop": list,
    "diffusion_steps": int, "entropy_bound": float, "t_min": float, "t_max": float,
}
# Ollama's other options: a Modelfile written for Ollama may set them; kept and shown, without effect here
OLLAMA_PARAMETERS: dict[str, type] = {
    **{k: int for k in ("top_k", "num_keep", "repeat_last_n", "mirostat", "num_gpu", "main_gpu", "num_thread")},
    **{k: float for k in ("top_p", "min_p", "typical_p", "repeat_penalty", "presence_penalty", "frequency_penalty",
                          "mirostat_tau", "mirostat_eta", "tfs_z")},
    **{k: bool for k in ("penalize_newline", "numa", "use_mmap", "use_mlock", "low_vram", "f16_kv", "vocab_only",
                         "logits_all", "embedding_only")},
}
# the least and the most value a parameter takes (the others: any finite number); a seed is a signed 64-bit
# integer (negative: a random one), denoising steps per canvas are bounded (the sampler's default is at most 48: a
# million would hold the model for hours)
MAX_DIFFUSION_STEPS = 1024
MINIMUM = {"num_ctx": 1, "num_batch": 1, "diffusion_steps": 1, "temperature": 0.0, "entropy_bound": 0.0,
           "t_min": 0.0, "t_max": 0.0, "seed": -(2**63)}
MAXIMUM = {"diffusion_steps": MAX_DIFFUSION_STEPS, "seed": 2**63 - 1}
ROLES = ("system", "user", "assistant")
INSTRUCTIONS = ("from", "system", "parameter", "message", "license", "template", "adapter", "requires")
TRIPLE = '"""'
REFUSED = {
    "template": "TEMPLATE is not supported: dgemma renders the GGUF's own Jinja chat template (Ollama's are Go templates)",
    "adapter": "ADAPTER is not supported: dgemma has no LoRA adapters",
}


class ModelfileError(ValueError):
    """A one-line, user-facing error in a Modelfile or a create request (it names the line or field)."""


def parameter_value(name: str, value: Any) -> Any:
    """A parameter's value in its type (from a Modelfile's text or a request's JSON); stop: a list of strings."""
    kind = PARAMETERS.get(name) or OLLAMA_PARAMETERS.get(name)
    if kind is None:
        raise ModelfileError(f"unknown parameter '{name}' (dgemma's: {', '.join(PARAMETERS)}; Ollama's others are "
                             "accepted and ignored)")
    if kind is list:
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, str) and v for v in values):
            raise ModelfileError(f"parameter 'stop' must be a string or a list of strings (got {value!r})")
        return list(values)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ModelfileError(f"parameter '{name}' must be true or false (got {value!r})")
    if isinstance(value, bool):
        raise ModelfileError(f"parameter '{name}' must be a number (got {value!r})")
    try:
        number = float(value)
        if not math.isfinite(number) or (kind is int and number != int(number)):
            raise ValueError
        number = int(number) if kind is int else number
    except (TypeError, ValueError, OverflowError):
        raise ModelfileError(f"parameter '{name}' must be {'an integer' if kind is int else 'a finite number'} "
                             f"(got {value!r})") from None
    if name in MINIMUM and number < MINIMUM[name]:
        raise ModelfileError(f"parameter '{name}' must be at least {MINIMUM[name]} (got {value!r})")
    if name in MAXIMUM and number > MAXIMUM[name]:
        raise ModelfileError(f"parameter '{name}' must be at most {MAXIMUM[name]} (got {value!r})")
    return number


def check_parameters(parameters: Any) -> dict[str, Any]:
    """A create request's `parameters` object, each value in its type."""
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise ModelfileError(f"parameters must be an object of name: value (got {type(parameters).__name__})")
    return {str(k): parameter_value(str(k), v) for k, v in parameters.items()}


def check_messages(messages: Any) -> list[dict[str, str]]:
    """A create request's `messages`: a list of {role, content} with role system, user or assistant."""
    out = []
    for i, m in enumerate(messages or []):
        role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None)
        if role not in ROLES or not isinstance(content, str):
            raise ModelfileError(f"messages[{i}] must have a role ({', '.join(ROLES)}) and a string content "
                                 f"(got {m!r})")
        out.append({"role": role, "content": content})
    return out


@dataclass
class ModelSettings:
    """What a Modelfile adds to a GGUF: stored in registry.json beside the file's name."""

    system: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, str]] = field(default_factory=list)
    license: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.system is not None or self.parameters or self.messages or self.license)

    def over(self, base: ModelSettings) -> ModelSettings:
        """These settings on top of a base model's: parameters merged, the rest replaced where given (an empty
        SYSTEM keeps the base's, as Ollama's)."""
        return ModelSettings(self.system or base.system,
                             {**base.parameters, **self.parameters}, list(self.messages or base.messages),
                             list(self.license or base.license))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.system is not None:
            out["system"] = self.system
        for key in ("parameters", "messages", "license"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelSettings:
        system = data.get("system")
        license = data.get("license") or []
        return cls(system if isinstance(system, str) else None, check_parameters(data.get("parameters")),
                   check_messages(data.get("messages")), [license] if isinstance(license, str) else list(license))

    # ---- at generation (as Ollama's GenerateHandler / ChatHandler apply a model's settings) ---------------------
    def options(self, options: dict[str, Any] | None) -> dict[str, Any]:
        """A request's options over the model's parameters."""
        return {**self.parameters, **(options or {})}

    def chat(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The model's MESSAGEs, then the chat's; SYSTEM first where the chat does not open with a system message."""
        out = [dict(m) for m in self.messages] + list(messages)
        if self.system and not (messages and messages[0].get("role") == "system"):
            out.insert(0, {"role": "system", "content": self.system})
        return out

    def prompt(self, prompt: str, system: str | None, *, history: bool = True) -> list[dict[str, Any]]:
        """/api/generate's conversation: its own system (else SYSTEM), the MESSAGEs (not when it goes on from a
        `context`: history False), the prompt."""
        system = system or self.system
        head = [{"role": "system", "content": system}] if system else []
        return head + ([dict(m) for m in self.messages] if history else []) + [{"role": "user", "content": prompt}]


@dataclass
class Modelfile:
    base: str  # FROM: a model name or a .gguf path
    settings: ModelSettings


_LINE = re.compile(r"([A-Za-z]+)(?:[ \t]+(.*))?$", re.S)


def _value(text: str, lines: list[str], at: int, where: str) -> tuple[str, int]:
    """The value starting at `text` (the rest of line `at`), and the index of the line after it: triple-quoted up
    to the line that ends with the closing quotes (as Ollama's parser reads it), double-quoted, or bare."""
    stripped = text.strip()
    if stripped.startswith(TRIPLE):
        body, end = [text.lstrip()[len(TRIPLE):]], at
        while not body[-1].rstrip().endswith(TRIPLE):
            end += 1
            if end >= len(lines):
                raise ModelfileError(f"{where}:{at + 1}: unterminated {TRIPLE}")
            body.append(lines[end])
        return "\n".join(body).rstrip()[: -len(TRIPLE)], end + 1
    if len(stripped) >= 2 and stripped[0] == stripped[-1] == '"':
        return stripped[1:-1], at + 1
    return stripped, at + 1


def parse_modelfile(text: str, where: str = "Modelfile") -> Modelfile:
    """A Modelfile's instructions (case-insensitive, `#` comment lines), errors as `where:LINE: ...`."""
    lines = text.removeprefix("\ufeff").replace("\r\n", "\n").split("\n")
    base: str | None = None
    s = ModelSettings()
    i = 0
    while i < len(lines):
        line, n = lines[i].strip(), i + 1
        if not line or line.startswith("#"):
            i += 1
            continue
        m = _LINE.match(line)
        word = m.group(1).lower() if m else ""
        if word not in INSTRUCTIONS:
            raise ModelfileError(f"{where}:{n}: unknown instruction {line.split()[0]!r} (expected one of "
                                 f"{', '.join(w.upper() for w in INSTRUCTIONS)})")
        if word in REFUSED:
            raise ModelfileError(f"{where}:{n}: {REFUSED[word]}")
        rest = lines[i].lstrip()[len(m.group(1)):].lstrip(" \t")
        if word in ("parameter", "message"):
            head, raw = (re.split(r"[ \t]+", rest, maxsplit=1) + [""])[:2]
            if word == "parameter" and (not head or not raw.strip()):
                raise ModelfileError(f"{where}:{n}: PARAMETER needs a name and a value (e.g. PARAMETER temperature 0.7)")
            if word == "message" and head.lower() not in ROLES:
                raise ModelfileError(f"{where}:{n}: MESSAGE needs a role, one of {', '.join(ROLES)} (got {head!r})")
            value, i = _value(raw, lines, i, where)
            if word == "message":
                s.messages.append({"role": head.lower(), "content": value})
                continue
            try:
                typed = parameter_value(head, value)
            except ModelfileError as e:
                raise ModelfileError(f"{where}:{n}: {e}") from None
            s.parameters[head] = s.parameters.get(head, []) + typed if head == "stop" else typed
            continue
        value, i = _value(rest, lines, i, where)
        if not value and word in ("from", "requires"):
            raise ModelfileError(f"{where}:{n}: {word.upper()} needs a value")
        if word == "from":
            base = value
        elif word == "system":
            s.system = value
        elif word == "license":
            s.license.append(value)
        # REQUIRES (the Ollama version a model needs) has no meaning here
    if base is None:
        raise ModelfileError(f"{where}: no FROM line (the model or .gguf file to build on)")
    return Modelfile(base, s)


def read_modelfile(path: str | Path) -> Modelfile:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ModelfileError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise ModelfileError(f"{path}: not UTF-8 text") from None
    return parse_modelfile(text, str(path))


def _quoted(text: str) -> str:
    """Triple quotes; the text reads back as it is unless one of its lines ends with three quotes (Ollama's
    format has no escape)."""
    return f"{TRIPLE}{text}{TRIPLE}"


def _parameter_text(value: Any) -> str:
    if isinstance(value, str):
        return _quoted(value) if "\n" in value or "\r" in value else f'"{value}"'
    return str(value).lower() if isinstance(value, bool) else repr(value)


def parameter_lines(parameters: dict[str, Any]) -> list[tuple[str, Any]]:
    """(name, value) per PARAMETER line: one per stop string."""
    return [(k, x) for k, v in parameters.items() for x in (v if isinstance(v, list) else [v])]


def render_modelfile(base: str, settings: ModelSettings, parameters: dict[str, Any] | None = None,
                     name: str | None = None) -> str:
    """The Modelfile that makes this model again (`dgemma show --modelfile`, /api/show's `modelfile`);
    `parameters`: those to show (default: the settings')."""
    out = ["# Modelfile generated by dgemma"]
    if name:
        out += ["# To build a new Modelfile based on this one, replace the FROM line with:", f"# FROM {name}"]
    out += ["", f"FROM {base}"]
    if settings.system is not None:
        out.append(f"SYSTEM {_quoted(settings.system)}")
    for key, value in parameter_lines(settings.parameters if parameters is None else parameters):
        out.append(f"PARAMETER {key} {_parameter_text(value)}")
    for m in settings.messages:
        out.append(f"MESSAGE {m['role']} {_quoted(m['content'])}")
    for text in settings.license:
        out.append(f"LICENSE {_quoted(text)}")
    return "\n".join(out) + "\n"

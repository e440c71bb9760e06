"""Chat templates from `tokenizer.chat_template`, rendered as transformers' apply_chat_template does.

Same Jinja environment (sandboxed, trim_blocks, lstrip_blocks, loop controls), same helpers
(`raise_exception`, `strftime_now`, a `tojson` that does not escape HTML) and the special tokens'
text as variables (`bos_token`, `eos_token`, ...).
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .tokenizer import Tokenizer


class ChatTemplateError(ValueError):
    """The model's chat template failed to render the conversation."""


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def render_chat(tok: Tokenizer, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                **kwargs: Any) -> str:
    if not tok.chat_template:
        raise ChatTemplateError("this model has no chat template (tokenizer.chat_template); send a raw prompt instead")
    specials = {name: tok.tokens[i] for name, i in
                (("bos_token", tok.bos_id), ("eos_token", tok.eos_id), ("unk_token", tok.unk_id), ("pad_token", tok.pad_id))
                if i is not None}
    try:
        return compile_template(tok.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **specials, **kwargs
        )
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template failed: {e}") from None

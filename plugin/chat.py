"""Chat templates from `tokenizer.chat_template`, rendered as transformers' apply_chat_template does.

Same Jinja environment (sandboxed, trim_blocks, lstrip_blocks, loop controls), same helpers
(`raise_exception`, `strftime_now`, a `tojson` that does not escape HTML) and the special tokens'
text as variables (`bos_token`, `eos_token`, ...).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
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


def _specials(tok: Tokenizer) -> dict[str, str]:
    return {name: tok.tokens[i] for name, i in
            (("bos_token", tok.bos_id), ("eos_token", tok.eos_id), ("unk_token", tok.unk_id), ("pad_token", tok.pad_id))
            if i is not None}


CONTINUE_TAG = "DGEMMA_CONTINUES_HERE "  # ends with a space, which a template that trims the message drops


def continues_final(messages: list[dict[str, Any]]) -> bool:
    """A conversation whose last message is the model's, with text and no tool calls: the reply goes on from
    it (Ollama's /api/chat, llama.cpp's server; transformers' continue_final_message)."""
    last = messages[-1] if messages else {}
    return (last.get("role") == "assistant" and isinstance(last.get("content"), str) and bool(last["content"].strip())
            and not last.get("tool_calls"))


def render_chat(tok: Tokenizer, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                continue_final: bool = False, variables: dict[str, Any] | None = None, **kwargs: Any) -> str:
    """The conversation through the model's chat template, with the template's variables (`variables` and
    kwargs: enable_thinking, tools, ...). continue_final: the text ends where the last message's does (no end of
    turn, no generation prompt), as transformers' continue_final_message renders it: a tag appended to that
    message marks the place, and where the template trimmed the message (its trailing spaces), so is the end.
    Any failure while rendering (the request's values included: a number where the template adds strings) is a
    ChatTemplateError."""
    if not tok.chat_template:
        raise ChatTemplateError("this model has no chat template (tokenizer.chat_template); send a raw prompt instead")
    if continue_final:
        messages = messages[:-1] + [{**messages[-1], "content": messages[-1]["content"] + CONTINUE_TAG}]
    try:
        text = compile_template(tok.chat_template).render(
            {**_specials(tok), **(variables or {}), **kwargs, "messages": messages,
             "add_generation_prompt": add_generation_prompt and not continue_final}
        )
    except Exception as e:  # noqa: BLE001 - jinja2's errors, and Python's from the request's values in it
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from None
    if continue_final:
        at = text.rfind(CONTINUE_TAG.strip())
        if at < 0:
            raise ChatTemplateError("the chat template leaves out the end of the last (assistant) message, so the "
                                    "reply cannot go on from it")
        text = text[:at] if text.startswith(CONTINUE_TAG, at) else text[:at].rstrip()
    return text


PROBE_TOOL = "dgemma_probe_tool"  # a tool's name no template writes unless it renders the tools it is given


@dataclass(frozen=True)
class TemplateFeatures:
    tools: bool  # renders the tools it is given (`tools=`), so the model can call them
    thinking: bool  # `enable_thinking=True` changes the prompt


def template_features(tok: Tokenizer) -> TemplateFeatures:
    """What the model's chat template does with tools and thinking, found by rendering a probe conversation (as
    llama.cpp's minja finds a template's capabilities), since a Jinja template declares nothing."""
    return _features(tok.chat_template, tuple(sorted(_specials(tok).items())))


@lru_cache(maxsize=8)
def _features(source: str | None, specials: tuple[tuple[str, str], ...]) -> TemplateFeatures:
    if not source:
        return TemplateFeatures(False, False)
    messages = [{"role": "user", "content": "x"}]
    tool = {"type": "function", "function": {"name": PROBE_TOOL, "description": "probe",
                                             "parameters": {"type": "object", "properties": {}}}}
    def render(**kw: Any) -> str | None:
        try:
            return compile_template(source).render(messages=messages, add_generation_prompt=True, **dict(specials), **kw)
        except Exception:  # noqa: BLE001 - a template that fails on the probe (or to compile) lacks the feature
            return None

    tools = PROBE_TOOL in (render(tools=[tool]) or "")
    on, off = render(enable_thinking=True), render(enable_thinking=False)
    return TemplateFeatures(tools, on is not None and off is not None and on != off)

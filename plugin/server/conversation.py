"""Conversations, tools and thinking between the two APIs and the chat template; a reply's parts back.

Ollama and OpenAI send a conversation with tools differently. Both become the messages the model's chat
template reads, as transformers' `apply_chat_template` takes them (Gemma 4's template among them):

- a reply's calls as `tool_calls: [{"type": "function", "id", "function": {"name", "arguments": {...}}}]`, the
  arguments an object (OpenAI sends them as a JSON string, Ollama as an object);
- a tool's answer as `{"role": "tool", "content", "name"}`: the name is Ollama's `tool_name`, or that of the call
  whose id OpenAI's `tool_call_id` gives (its `tool_call_id` kept too);
- a reply's thinking (Ollama's `thinking`, OpenAI's `reasoning_content`) as `reasoning_content`.

The reply's parts (plugin/reply.py) go back as Ollama's `message.thinking` / `message.tool_calls` and OpenAI's
`reasoning_content` / `tool_calls` (arguments as a JSON string, finish_reason "tool_calls").
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from ..chat import template_features
from ..engine import Engine
from ..reply import ToolCall
from .serving import ApiError


def _arguments(value: Any, where: str) -> dict[str, Any]:
    """A call's arguments: an object, or a JSON string of one."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as e:
            raise ApiError(400, f"{where}: expected a JSON object ({e})") from None
    if not isinstance(value, dict):
        raise ApiError(400, f"{where}: expected an object, got {type(value).__name__}")
    return value


def _calls(calls: list[Any] | None, where: str) -> list[dict[str, Any]]:
    out = []
    for j, call in enumerate(calls or []):
        at = f"{where}.tool_calls[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ApiError(400, f"{at}.function.name: expected a string")
        entry = {"type": "function", "function": {"name": fn["name"],
                                                   "arguments": _arguments(fn.get("arguments", {}), f"{at}.function.arguments")}}
        if isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        out.append(entry)
    return out


def ollama_messages(messages: list[Any]) -> list[dict[str, Any]]:
    """Ollama's /api/chat messages (protocol.OllamaMessage) for the chat template. A tool message's name: its
    `tool_name` (or legacy `name`), else that of the call whose id its `tool_call_id` gives (as the calls this
    server returns carry ids), else "unknown"."""
    out, names = [], {}  # names: call id -> function name, from the replies so far
    for i, m in enumerate(messages):
        msg: dict[str, Any] = {"role": m.role.lower(), "content": m.content or ""}
        if m.tool_calls:
            msg["tool_calls"] = _calls(m.tool_calls, f"messages[{i}]")
            names.update({c["id"]: c["function"]["name"] for c in msg["tool_calls"] if "id" in c})
        if m.thinking:
            msg["reasoning_content"] = m.thinking
        if msg["role"] == "tool":
            extra = m.model_extra or {}
            name = m.tool_name or extra.get("name")
            if not (isinstance(name, str) and name) and isinstance(extra.get("tool_call_id"), str):
                name = names.get(extra["tool_call_id"])
            msg["name"] = name if isinstance(name, str) and name else "unknown"
        out.append(msg)
    return out


def openai_messages(messages: list[Any], text) -> list[dict[str, Any]]:
    """OpenAI's chat messages (protocol.OpenAIMessage; text(content) reads a content) for the chat template."""
    out, names = [], {}  # names: call id -> function name, from the replies so far
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role
        msg: dict[str, Any] = {"role": role, "content": text(m.content)}
        if m.tool_calls:
            msg["tool_calls"] = _calls(m.tool_calls, f"messages[{i}]")
            names.update({c["id"]: c["function"]["name"] for c in msg["tool_calls"] if "id" in c})
        if m.reasoning_content:
            msg["reasoning_content"] = m.reasoning_content
        if role == "tool":
            name = names.get(m.tool_call_id) or m.name
            if not name:
                raise ApiError(400, f"messages[{i}].tool_call_id: {m.tool_call_id!r} answers no tool call of an earlier "
                                    "assistant message")
            msg["name"] = name
            if m.tool_call_id:
                msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


def tool_list(tools: list[Any] | None) -> list[dict[str, Any]] | None:
    """The request's tools, checked before any model loads: each {"type": "function", "function": {"name", ...}}."""
    if not tools:
        return None
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ApiError(400, f"tools[{i}].function.name: expected a string")
        if tool.get("type", "function") != "function":
            raise ApiError(400, f"tools[{i}].type: expected 'function', got {tool.get('type')!r}")
    return tools


def check_tools(engine: Engine, model: str, tools: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The chat template's `tools` (none: {}); a 400 where the model's chat template renders none (as Ollama
    answers for such a model)."""
    if not tools:
        return {}
    if not template_features(engine.tokenizer).tools:
        raise ApiError(400, f"model '{model}' does not support tools (its chat template renders none)")
    return {"tools": tools}


def check_thinking(engine: Engine, model: str, enable: bool | None) -> dict[str, Any]:
    """The chat template's enable_thinking; a 400 where thinking is asked of a model whose template has none."""
    if enable is None:
        return {}
    if enable and not template_features(engine.tokenizer).thinking:
        raise ApiError(400, f"model '{model}' does not support thinking (its chat template has no thinking mode)")
    return {"enable_thinking": enable}


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def ollama_tool_calls(calls: list[ToolCall], first: int = 0) -> list[dict[str, Any]]:
    return [{"id": call_id(), "function": {"index": first + k, "name": c.name, "arguments": c.arguments}}
            for k, c in enumerate(calls)]


def openai_tool_calls(calls: list[ToolCall], first: int = 0, delta: bool = False) -> list[dict[str, Any]]:
    """OpenAI's tool_calls: in a stream's delta each carries its index (the whole call in one delta)."""
    return [{**({"index": first + k} if delta else {}), "id": call_id(), "type": "function",
             "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
            for k, c in enumerate(calls)]

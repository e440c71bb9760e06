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
from typing import Any

from ..chat import template_features
from ..engine import Engine
from ..reply import ToolCall
from .protocol import completion_id
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


def _function_name(item: Any, where: str) -> str:
    """The function name of a tool or a call, {"function": {"name": ...}}; a 400 naming where it is missing."""
    fn = item.get("function") if isinstance(item, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ApiError(400, f"{where}.function.name: expected a string")
    return fn["name"]


def _calls(calls: list[Any], where: str) -> list[dict[str, Any]]:
    out = []
    for j, call in enumerate(calls):
        at = f"{where}.tool_calls[{j}]"
        entry = {"type": "function", "function": {"name": _function_name(call, at), "arguments": _arguments(
            call["function"].get("arguments", {}), f"{at}.function.arguments")}}
        if isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        out.append(entry)
    return out


def _for_template(turns: list[dict[str, Any]], strict: bool) -> list[dict[str, Any]]:
    """API messages read into role, content, calls, thinking, tool_name, tool_call_id (None where absent), as
    the chat template takes them. A tool message's name: that of the call its tool_call_id answers, else its own
    tool name; where neither, a 400 (strict) or "unknown"."""
    out, names = [], {}  # names: call id -> function name, from the replies so far
    for i, t in enumerate(turns):
        msg: dict[str, Any] = {"role": t["role"], "content": t["content"]}
        if t["calls"]:
            msg["tool_calls"] = _calls(t["calls"], f"messages[{i}]")
            names.update({c["id"]: c["function"]["name"] for c in msg["tool_calls"] if "id" in c})
        if t["thinking"]:
            msg["reasoning_content"] = t["thinking"]
        if t["role"] == "tool":
            call = t["tool_call_id"] if isinstance(t["tool_call_id"], str) else None
            name = names.get(call) or (t["tool_name"] if isinstance(t["tool_name"], str) else None)
            if not name and strict:
                raise ApiError(400, f"messages[{i}].tool_call_id: {call!r} answers no tool call of an earlier "
                                    "assistant message")
            msg["name"] = name or "unknown"
            if call:
                msg["tool_call_id"] = call
        out.append(msg)
    return out


def ollama_messages(messages: list[Any]) -> list[dict[str, Any]]:
    """Ollama's /api/chat messages (protocol.OllamaMessage) for the chat template; a tool message names its
    tool by `tool_name` (or the legacy `name`), or by the `tool_call_id` of a call this server returned."""
    return _for_template([{
        "role": m.role.lower(), "content": m.content or "", "calls": m.tool_calls, "thinking": m.thinking,
        "tool_name": m.tool_name or (m.model_extra or {}).get("name"),
        "tool_call_id": (m.model_extra or {}).get("tool_call_id")} for m in messages], strict=False)


def openai_messages(messages: list[Any], text) -> list[dict[str, Any]]:
    """OpenAI's chat messages (protocol.OpenAIMessage; text(content) reads a content) for the chat template."""
    return _for_template([{
        "role": "system" if m.role == "developer" else m.role, "content": text(m.content), "calls": m.tool_calls,
        "thinking": m.reasoning_content, "tool_name": m.name, "tool_call_id": m.tool_call_id} for m in messages],
        strict=True)


def tool_list(tools: list[Any] | None) -> list[dict[str, Any]] | None:
    """The request's tools, checked before any model loads: each {"type": "function", "function": {"name", ...}}."""
    for i, tool in enumerate(tools or []):
        _function_name(tool, f"tools[{i}]")
        if tool.get("type", "function") != "function":
            raise ApiError(400, f"tools[{i}].type: expected 'function', got {tool.get('type')!r}")
    return tools or None


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


def ollama_tool_calls(calls: list[ToolCall], first: int = 0) -> list[dict[str, Any]]:
    return [{"id": completion_id("call"), "function": {"index": first + k, "name": c.name, "arguments": c.arguments}}
            for k, c in enumerate(calls)]


def openai_tool_calls(calls: list[ToolCall], first: int = 0, delta: bool = False) -> list[dict[str, Any]]:
    """OpenAI's tool_calls: in a stream's delta each carries its index (the whole call in one delta)."""
    return [{**({"index": first + k} if delta else {}), "id": completion_id("call"), "type": "function",
             "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
            for k, c in enumerate(calls)]

"""Wire formats: request models (pydantic) and response builders for the Ollama and OpenAI APIs.

Field names and shapes follow Ollama's api/types.go and docs/api.md, and OpenAI's chat/completions
objects as Ollama and LM Studio serve them (see docs/SERVER.md).
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..engine import DoneEvent
from ..registry import FAMILY, ModelEntry, ModelInfo, display_name  # noqa: F401 - (P.display_name in the routers)

OLLAMA_VERSION = "0.12.0"  # what /api/version reports: frontends compare it with their minimum Ollama
FORMAT = "gguf"
FOREVER = "2262-04-11T23:47:16.854775807Z"  # expires_at of a model kept loaded forever (Go's max time)
# /api/show `parameters`: the diffusion sampler defaults, under the option names requests use
SHOW_SAMPLER_PARAMS = [("diffusion_steps", "diffusion.eb_max_steps"), ("entropy_bound", "diffusion.eb_entropy_bound"),
                       ("t_min", "diffusion.eb_t_min"), ("t_max", "diffusion.eb_t_max")]


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields are ignored, as Ollama does


# ---- Ollama requests ---------------------------------------------------------------------------------
class OllamaMessage(_Lenient):
    role: str
    content: str | None = ""
    images: list[str] | None = None
    tool_calls: list[Any] | None = None
    thinking: str | None = None
    tool_name: str | None = None  # a tool message: the tool that answered


class GenerateRequest(_Lenient):
    model: str = ""
    prompt: str | None = None
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    stream: bool | None = None
    raw: bool | None = None
    format: Any = None
    images: list[str] | None = None
    options: dict[str, Any] | None = None
    keep_alive: Any = None
    think: Any = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    truncate: bool | None = None  # False: a prompt too long for num_ctx is an error, not cut (plugin/fit.py)


class ChatRequest(_Lenient):
    model: str = ""
    messages: list[OllamaMessage] | None = None
    tools: list[Any] | None = None
    stream: bool | None = None
    format: Any = None
    options: dict[str, Any] | None = None
    keep_alive: Any = None
    think: Any = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    truncate: bool | None = None  # False: a chat too long for num_ctx is an error, not fitted (plugin/fit.py)


class ShowRequest(_Lenient):
    model: str | None = None
    name: str | None = None  # legacy field, still sent by Continue
    verbose: bool | None = None


class DeleteRequest(_Lenient):
    model: str | None = None
    name: str | None = None


class CreateRequest(_Lenient):
    model: str | None = None
    name: str | None = None  # the legacy field
    from_: str | None = Field(None, alias="from")
    files: dict[str, str] | None = None  # {"file.gguf": "sha256:..."}, blobs uploaded first
    adapters: dict[str, str] | None = None
    template: str | None = None
    license: str | list[str] | None = None
    system: str | None = None
    parameters: dict[str, Any] | None = None
    messages: list[dict[str, Any]] | None = None
    quantize: str | None = None
    modelfile: str | None = None  # the legacy form: the Modelfile's text
    stream: bool | None = None


class CopyRequest(_Lenient):
    source: str = ""
    destination: str = ""


# ---- OpenAI requests ---------------------------------------------------------------------------------
class StreamOptions(_Lenient):
    include_usage: bool | None = None


class OpenAIMessage(_Lenient):
    role: str
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None  # a tool message: the call it answers
    name: str | None = None
    reasoning_content: str | None = None


class ChatCompletionRequest(_Lenient):
    model: str
    messages: list[OpenAIMessage]
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None  # False: one call at most (under a forced tool_choice)
    reasoning_effort: str | None = None  # "none": thinking off; "minimal" ... "high": on (the template has one mode)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's and llama.cpp's: variables for the chat template


class ResponsesRequest(_Lenient):
    """OpenAI's /v1/responses (plugin/server/responses.py)."""

    model: str
    input: str | list[Any] | None = None
    instructions: str | None = None
    stream: bool | None = False
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    reasoning: dict[str, Any] | None = None
    text: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    previous_response_id: str | None = None
    conversation: Any = None
    truncation: str | None = None  # "disabled": a conversation too long for the context is an error; "auto" (the
    # default here, as Ollama fits every chat): its oldest items left out


class CompletionRequest(_Lenient):
    model: str
    prompt: str | list[str]
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    suffix: str | None = None
    echo: bool | None = None
    logprobs: int | None = None  # the legacy API's: this many alternatives per token (0: the token's own only)


# ---- builders ------------------------------------------------------------------------------------
def now_rfc3339() -> str:
    """UTC now as Go's RFC3339Nano (trailing zeros trimmed), e.g. 2023-08-04T19:22:45.499127Z."""
    ns = time.time_ns()
    base = datetime.fromtimestamp(ns // 1_000_000_000, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    frac = f"{ns % 1_000_000_000:09d}".rstrip("0")
    return f"{base}.{frac}Z" if frac else f"{base}Z"


def rfc3339(dt: datetime) -> str:
    return dt.astimezone().isoformat()


def human_number(n: int) -> str:
    """Ollama's format.HumanNumber: 26.2B, 494.03M, 300K."""
    for unit, scale, digits in (("B", 1e9, 1), ("M", 1e6, 2), ("K", 1e3, 0)):
        if n >= scale:
            if n % int(scale) == 0:
                return f"{n // int(scale)}{unit}"
            return f"{n / scale:.{digits}f}{unit}"
    return str(n)


def details(info: ModelInfo) -> dict[str, Any]:
    return {"parent_model": "", "format": FORMAT, "family": FAMILY, "families": [FAMILY],
            "parameter_size": human_number(info.n_params), "quantization_level": info.quantization}


def show_parameters(entry: ModelEntry, stops: list[str], info: ModelInfo) -> dict[str, Any]:
    """/api/show's `parameters` (and `dgemma show --parameters`): the defaults a request starts from, the
    model's own (its end-of-generation tokens as stops, the diffusion sampler's), then its Modelfile's."""
    from .serving import DEFAULT_NUM_CTX

    return {"num_ctx": DEFAULT_NUM_CTX, "stop": stops,
            **{k: info.metadata[key] for k, key in SHOW_SAMPLER_PARAMS if key in info.metadata},
            **entry.settings.parameters}


def tag_entry(entry: ModelEntry, info: ModelInfo) -> dict[str, Any]:
    name = display_name(entry.name)
    return {"name": name, "model": name, "modified_at": rfc3339(entry.modified_at), "size": entry.size,
            "digest": entry.digest, "details": {**details(info), "parent_model": entry.base or ""}}


def metrics(done: DoneEvent, total_ns: int, load_ns: int) -> dict[str, int]:
    # prompt_eval_count counts the prompt's tokens taken from the kept KV cache too, and prompt_eval_cached_count
    # those, as current Ollama reports them
    return {"total_duration": total_ns, "load_duration": load_ns, "prompt_eval_count": done.prompt_eval_count,
            "prompt_eval_cached_count": done.prompt_cached_count, "prompt_eval_duration": done.prompt_eval_duration,
            "eval_count": done.eval_count, "eval_duration": done.eval_duration}


def openai_error(message: str, status: int, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    kind = {400: "invalid_request_error", 404: "not_found_error", 401: "authentication_error"}.get(status, "api_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


FinishReason = Literal["stop", "length", "tool_calls"]


def finish_reason(done: DoneEvent, tool_calls: bool = False) -> FinishReason:
    """OpenAI's: "tool_calls" where the reply called tools (and was not cut by max_tokens)."""
    if done.done_reason == "length":
        return "length"
    return "tool_calls" if tool_calls else "stop"


def usage(done: DoneEvent) -> dict[str, Any]:
    return {"prompt_tokens": done.prompt_eval_count, "completion_tokens": done.eval_count,
            "total_tokens": done.prompt_eval_count + done.eval_count,
            "prompt_tokens_details": {"cached_tokens": done.prompt_cached_count}}

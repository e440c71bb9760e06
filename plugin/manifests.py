"""Drop-in provider files that point chat frontends at `dgemma serve`.

`render(base_url, models)` returns {relative path: file text}; `dgemma manifests --out DIR` writes them.
The repository's `manifests/` folder is this rendering for the defaults (http://127.0.0.1:11435,
`default:latest`); tests keep it in sync and check that every file names a URL and models a live
server really serves. Formats as each project documents them (notes in docs/SERVER.md).
"""

from __future__ import annotations

import json
from pathlib import Path

from .server import DEFAULT_HOST, DEFAULT_PORT

DEFAULT_BASE_URL = f"http://{DEFAULT_HOST}:{DEFAULT_PORT}"
DEFAULT_MODELS = ("default:latest",)
DUMMY_KEY = "sk-dgemma-local"  # OpenAI clients insist on a key; dgemma serve ignores it unless --api-key


def _yaml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid YAML scalar


def open_webui(base: str, models: list[str]) -> str:
    return (
        "# Open WebUI: dgemma as an Ollama connection (and the same server as an OpenAI connection, off by\n"
        "# default so that models are not listed twice). Open WebUI keeps these in its database after the\n"
        "# first start: set ENABLE_PERSISTENT_CONFIG=False or change them in Admin > Settings > Connections.\n"
        "# From inside Docker use http://host.docker.internal instead of 127.0.0.1.\n"
        "ENABLE_OLLAMA_API=True\n"
        f"OLLAMA_BASE_URL={base}\n"
        "ENABLE_OPENAI_API=False\n"
        f"OPENAI_API_BASE_URL={base}/v1\n"
        f"OPENAI_API_KEY={DUMMY_KEY}\n"
    )


def continue_config(base: str, models: list[str]) -> str:
    lines = ["# Continue (~/.continue/config.yaml): dgemma through its Ollama API", "name: dgemma",
             "version: 1.0.0", "schema: v1", "models:"]
    for m in models:
        lines += [f"  - name: {_yaml_str('DiffusionGemma ' + m)}", "    provider: ollama", f"    model: {_yaml_str(m)}",
                  f"    apiBase: {_yaml_str(base)}", "    roles: [chat, edit, apply, summarize]"]
    return "\n".join(lines) + "\n"


def litellm_config(base: str, models: list[str]) -> str:
    lines = ["# LiteLLM proxy: litellm --config config.yaml", "model_list:"]
    for m in models:
        alias = m.split(":")[0] if m.endswith(":latest") else m.replace(":", "-")
        lines += [f"  - model_name: {_yaml_str(alias)}", "    litellm_params:",
                  f"      model: {_yaml_str('ollama_chat/' + m)}", f"      api_base: {_yaml_str(base)}",
                  f"  - model_name: {_yaml_str(alias + '-openai')}", "    litellm_params:",
                  f"      model: {_yaml_str('openai/' + m)}", f"      api_base: {_yaml_str(base + '/v1')}",
                  f"      api_key: {_yaml_str(DUMMY_KEY)}"]
    return "\n".join(lines) + "\n"


def anythingllm_env(base: str, models: list[str]) -> str:
    return (
        "# AnythingLLM (server/.env or the docker .env): dgemma as the Ollama LLM provider.\n"
        "# For the generic OpenAI provider instead: LLM_PROVIDER='generic-openai' with\n"
        f"# GENERIC_OPEN_AI_BASE_PATH='{base}/v1' GENERIC_OPEN_AI_MODEL_PREF='{models[0]}'\n"
        f"# GENERIC_OPEN_AI_MODEL_TOKEN_LIMIT=4096 GENERIC_OPEN_AI_API_KEY='{DUMMY_KEY}'\n"
        "LLM_PROVIDER='ollama'\n"
        f"OLLAMA_BASE_PATH='{base}'\n"
        f"OLLAMA_MODEL_PREF='{models[0]}'\n"
        "OLLAMA_MODEL_TOKEN_LIMIT=4096\n"
    )


def jan_model(base: str, models: list[str]) -> str:
    m = models[0]
    return json.dumps({
        "sources": [{"url": f"{base}/v1"}], "id": m, "object": "model", "name": f"DiffusionGemma {m}",
        "version": "1.0", "description": "DiffusionGemma served by dgemma (OpenAI-compatible endpoint)",
        "format": "api", "settings": {}, "parameters": {"max_tokens": 1024, "stream": True},
        "metadata": {"author": "Google DeepMind", "tags": ["remote", "diffusion"]}, "engine": "openai",
    }, indent=2) + "\n"


def lmstudio_manifest(base: str, models: list[str]) -> str:
    return json.dumps({"type": "plugin", "runner": "node", "owner": "dgemma", "name": "diffusiongemma",
                       "revision": 1}, indent=2) + "\n"


def lmstudio_package(base: str, models: list[str]) -> str:
    return json.dumps({"name": "diffusiongemma", "version": "0.1.0", "private": True,
                       "description": "LM Studio generator plugin: DiffusionGemma through dgemma serve",
                       "main": "src/index.ts", "dependencies": {"@lmstudio/sdk": "^1.5.0"}}, indent=2) + "\n"


LMSTUDIO_INDEX = """// LM Studio generator plugin: DiffusionGemma via dgemma's OpenAI-compatible endpoint.
// `lms dev` in this folder runs it; the generator then appears in the model picker.
// The model's thinking shows as reasoning; LM Studio's tools go to the model where its chat template renders
// them (/api/show's capabilities), else the model answers without them.
import {
  type Chat,
  type ChatMessage,
  type GeneratorController,
  type PluginContext,
  createConfigSchematics,
} from "@lmstudio/sdk";

const globalConfig = createConfigSchematics()
  .field("baseUrl", "string", { displayName: "dgemma URL (OpenAI API)" }, "__BASE__/v1")
  .field("model", "string", { displayName: "Model" }, "__MODEL__")
  .build();

interface OpenAIToolCall {
  id: string;
  function: { name: string; arguments: string };
}

// One LM Studio message as OpenAI's: a tool message per result, an assistant's tool calls with it.
function toOpenAI(m: ChatMessage): Array<Record<string, unknown>> {
  const role = m.getRole();
  if (role === "tool") {
    return m.getToolCallResults().map((r) => ({ role: "tool", tool_call_id: r.toolCallId, content: r.content }));
  }
  const message: Record<string, unknown> = { role, content: m.getText() };
  const calls = role === "assistant" ? m.getToolCallRequests() : [];
  if (calls.length > 0) {
    message.tool_calls = calls.map((c) => ({
      id: c.id,
      type: "function",
      function: { name: c.name, arguments: JSON.stringify(c.arguments ?? {}) },
    }));
  }
  return [message];
}

// Whether the model takes tools: "tools" among the capabilities dgemma's Ollama API (beside /v1) reports.
async function takesTools(baseUrl: string, model: string, signal: AbortSignal): Promise<boolean> {
  const root = baseUrl.endsWith("/v1") ? baseUrl.slice(0, -3) : baseUrl.endsWith("/v1/") ? baseUrl.slice(0, -4) : baseUrl;
  try {
    const response = await fetch(`${root}/api/show`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      signal,
      body: JSON.stringify({ model }),
    });
    const info = (await response.json()) as { capabilities?: Array<string> };
    return response.ok && (info.capabilities ?? []).includes("tools");
  } catch {
    return false;
  }
}

export async function generate(ctl: GeneratorController, history: Chat): Promise<void> {
  const cfg = ctl.getGlobalPluginConfig(globalConfig);
  const messages = history.getMessagesArray().flatMap(toOpenAI);
  const defined = ctl.getToolDefinitions();
  const withTools = defined.length > 0 && (await takesTools(cfg.get("baseUrl"), cfg.get("model"), ctl.abortSignal));
  const tools = withTools ? defined : [];
  const response = await fetch(`${cfg.get("baseUrl")}/chat/completions`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    signal: ctl.abortSignal,
    body: JSON.stringify({ model: cfg.get("model"), messages, stream: true, ...(tools.length > 0 ? { tools } : {}) }),
  });
  if (!response.ok || !response.body) {
    throw new Error(`dgemma answered ${response.status}: ${await response.text()}`);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (let chunk = await reader.read(); !chunk.done; chunk = await reader.read()) {
    buffer += decoder.decode(chunk.value, { stream: true });
    const lines = buffer.split("\\n");
    buffer = lines.pop() ?? "";
    for (const line of lines.map((l) => l.trim())) {
      if (!line.startsWith("data:") || line === "data: [DONE]") continue;
      const event = JSON.parse(line.slice(5));
      if (event.error) throw new Error(event.error.message);
      const delta = event.choices?.[0]?.delta ?? {};
      if (delta.reasoning_content) ctl.fragmentGenerated(delta.reasoning_content, { reasoningType: "reasoning" });
      if (delta.content) ctl.fragmentGenerated(delta.content);
      for (const call of (delta.tool_calls ?? []) as Array<OpenAIToolCall>) {
        // dgemma sends each call whole, in the delta of the canvas that finished it
        ctl.toolCallGenerationStarted({ toolCallId: call.id });
        ctl.toolCallGenerationNameReceived(call.function.name);
        ctl.toolCallGenerationArgumentFragmentGenerated(call.function.arguments);
        ctl.toolCallGenerationEnded({
          type: "function",
          id: call.id,
          name: call.function.name,
          arguments: JSON.parse(call.function.arguments),
        });
      }
    }
  }
}

export async function main(context: PluginContext): Promise<void> {
  context.withGlobalConfigSchematics(globalConfig);
  context.withGenerator(generate);
}
"""


def lmstudio_index(base: str, models: list[str]) -> str:
    return LMSTUDIO_INDEX.replace("__BASE__", base).replace("__MODEL__", models[0])


def codex_config(base: str, models: list[str]) -> str:
    return (
        "# Codex CLI (~/.codex/config.toml): dgemma through its Responses API (POST /v1/responses). Root keys come\n"
        "# before the tables in TOML: put model and model_provider at the top of your file. Codex reads the file\n"
        "# at startup. With `dgemma serve --api-key KEY` add env_key = \"DGEMMA_API_KEY\" and export that variable.\n"
        f"model = {_yaml_str(models[0])}\n"
        'model_provider = "dgemma"\n'
        "\n"
        "[model_providers.dgemma]\n"
        'name = "dgemma"\n'
        f"base_url = {_yaml_str(base + '/v1')}\n"
        'wire_api = "responses"\n'
    )


def readme(base: str, models: list[str]) -> str:
    return f"""# Provider files for dgemma serve

Rendered by `dgemma manifests` for {base} and {", ".join(models)}; re-render for your host, port and
models with `dgemma manifests --out DIR --host H --port P`.

| frontend | file | how |
|---|---|---|
| Open WebUI | `open-webui.env` | `docker run --env-file open-webui.env ...` (Docker: use host.docker.internal) |
| Continue | `continue/config.yaml` | copy to `~/.continue/config.yaml` (or merge its `models:`) |
| LiteLLM | `litellm/config.yaml` | `litellm --config litellm/config.yaml` |
| AnythingLLM | `anythingllm/.env` | merge into AnythingLLM's server `.env` |
| Jan | `jan/model.json` | older Jan: `~/jan/data/models/<id>/model.json`; current Jan: Settings > Model Providers > Add Provider, Base URL `{base}/v1`, any key |
| LM Studio | `lmstudio-plugin/` | `cd lmstudio-plugin && npm install && lms dev` (a generator plugin using the `/v1` endpoint: the thinking as reasoning, LM Studio's tools and their results passed on) |
| Codex CLI | `codex/config.toml` | merge into `~/.codex/config.toml` (the Responses API, `/v1/responses`) |
"""


FILES = {
    "README.md": readme,
    "open-webui.env": open_webui,
    "continue/config.yaml": continue_config,
    "litellm/config.yaml": litellm_config,
    "anythingllm/.env": anythingllm_env,
    "jan/model.json": jan_model,
    "lmstudio-plugin/manifest.json": lmstudio_manifest,
    "lmstudio-plugin/package.json": lmstudio_package,
    "lmstudio-plugin/src/index.ts": lmstudio_index,
    "codex/config.toml": codex_config,
}


def render(base_url: str = DEFAULT_BASE_URL, models: list[str] | tuple[str, ...] = DEFAULT_MODELS) -> dict[str, str]:
    base, models = base_url.rstrip("/"), list(models)
    if not models:
        raise ValueError("at least one model is needed")
    return {path: make(base, models) for path, make in FILES.items()}


def write(out: Path, files: dict[str, str]) -> list[Path]:
    written = []
    for rel, text in files.items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written

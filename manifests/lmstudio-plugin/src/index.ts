// LM Studio generator plugin: DiffusionGemma via dgemma's OpenAI-compatible endpoint.
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
  .field("baseUrl", "string", { displayName: "dgemma URL (OpenAI API)" }, "http://127.0.0.1:11435/v1")
  .field("model", "string", { displayName: "Model" }, "default:latest")
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
    const lines = buffer.split("\n");
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

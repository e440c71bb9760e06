// LM Studio generator plugin: DiffusionGemma via dgemma's OpenAI-compatible endpoint.
// `lms dev` in this folder runs it; the generator then appears in the model picker.
import { type Chat, type GeneratorController, type PluginContext, createConfigSchematics } from "@lmstudio/sdk";

const globalConfig = createConfigSchematics()
  .field("baseUrl", "string", { displayName: "dgemma URL (OpenAI API)" }, "http://127.0.0.1:11435/v1")
  .field("model", "string", { displayName: "Model" }, "default:latest")
  .build();

async function generate(ctl: GeneratorController, history: Chat): Promise<void> {
  const cfg = ctl.getGlobalPluginConfig(globalConfig);
  const messages = history
    .getMessagesArray()
    .filter((m) => m.getRole() !== "tool")
    .map((m) => ({ role: m.getRole(), content: m.getText() }));
  const response = await fetch(`${cfg.get("baseUrl")}/chat/completions`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    signal: ctl.abortSignal,
    body: JSON.stringify({ model: cfg.get("model"), messages, stream: true }),
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
      const text = event.choices?.[0]?.delta?.content;
      if (text) ctl.fragmentGenerated(text);
    }
  }
}

export async function main(context: PluginContext): Promise<void> {
  context.withGlobalConfigSchematics(globalConfig);
  context.withGenerator(generate);
}

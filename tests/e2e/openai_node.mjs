// Drives fallback-cache-proxy with the official `openai` Node SDK: one streamed chat
// completion per prompt, read with the SDK's own iterator.
//
//     node openai_node.mjs BASE_URL PROMPTS_JSON
//
// Prints one JSON list: {"ok", "cache", "reason", "output": [chunks]} or
// {"ok": false, "error": {"class", "status"}} per prompt. The SDK comes from the folder in
// FALLBACK_CACHE_TEST_NODE_MODULES (scripts/test.sh installs it under target/), and does not
// retry.
import { createRequire } from "node:module";
import path from "node:path";

const modules = process.env.FALLBACK_CACHE_TEST_NODE_MODULES;
if (!modules) {
  console.error("FALLBACK_CACHE_TEST_NODE_MODULES is not set (see scripts/test.sh)");
  process.exit(2);
}
const require = createRequire(path.join(modules, "package.json"));
const { default: OpenAI } = await import(require.resolve("openai"));

const [baseURL, prompts] = [process.argv[2], JSON.parse(process.argv[3])];
const client = new OpenAI({ baseURL, apiKey: process.env.OPENAI_API_KEY, maxRetries: 0, timeout: 60000 });
const results = [];
for (const prompt of prompts) {
  try {
    const { data: stream, response } = await client.chat.completions
      .create({ model: "gpt-4o-mini", messages: [{ role: "user", content: prompt }], stream: true })
      .withResponse();
    const chunks = [];
    for await (const chunk of stream) chunks.push(chunk);
    results.push({
      ok: true,
      cache: response.headers.get("x-fallback-cache"),
      reason: response.headers.get("x-fallback-cache-reason"),
      output: chunks,
    });
  } catch (error) {
    results.push({
      ok: false,
      cache: error.headers?.get?.("x-fallback-cache") ?? null,
      reason: error.headers?.get?.("x-fallback-cache-reason") ?? null,
      error: { class: error.constructor.name, status: error.status ?? null },
    });
  }
}
console.log(JSON.stringify(results));

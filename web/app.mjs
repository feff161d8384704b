// The page: load an exported folder (`?model=URL`, default `model/`), stream generated text into the page.
// `?threads=N` sets the WASM threads (default: up to 4 when the page is cross-origin isolated, else 1).
// `window.minrnn` exposes the loaded model, the last run and a decode benchmark to scripts (the tests drive it).
import { ExportedModel, argmax, generate, seededRandom } from "./minrnn.mjs";

const params = new URLSearchParams(location.search);
const folder = new URL(params.get("model") || "model/", location.href);
if (!folder.pathname.endsWith("/")) folder.pathname += "/";
const maxThreads = crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;
const threads = Number(params.get("threads") || maxThreads);

const $ = (id) => document.getElementById(id);
const status = (text) => {
  $("status").textContent = text;
};
const formatBytes = (n) => (n >= 1e6 ? `${(n / 1e6).toFixed(1)} MB` : `${(n / 1e3).toFixed(1)} kB`);
const mean = (values) => values.reduce((a, b) => a + b, 0) / values.length;
const median = (values) => {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
};
// Let the page paint and handle clicks (the Stop button) between tokens, once a frame: a task, so that input and
// rendering run (a `scheduler.yield()` continuation goes before them and starves the click on Stop).
let lastYield = 0;
const yieldToPage = async () => {
  if (performance.now() - lastYield < 16) return;
  await new Promise((resolve) => setTimeout(resolve, 0));
  lastYield = performance.now();
};

let model;
let stopRequested = false;

async function onGenerate() {
  const prompt = $("prompt").value;
  const promptIds = model.tokenizer.encode(prompt).ids;
  const options = {
    maxNewTokens: Number($("max-new-tokens").value),
    doSample: $("do-sample").checked,
    temperature: Number($("temperature").value),
    topK: Number($("top-k").value),
    seed: Number($("seed").value),
  };
  const output = $("output");
  output.replaceChildren(Object.assign(document.createElement("span"), { className: "prompt", textContent: prompt }));
  const generated = output.appendChild(document.createElement("span"));
  const newIds = [];
  stopRequested = false;
  $("generate").disabled = true;
  $("stop").disabled = false;
  status("generating");
  try {
    const result = await generate(model, promptIds, {
      ...options,
      shouldStop: () => stopRequested,
      onToken: async (id, stepMs) => {
        newIds.push(id);
        generated.textContent = model.tokenizer.decode(newIds, { skip_special_tokens: true });
        $("token-count").textContent = `${newIds.length} tokens`;
        if (stepMs.length) $("ms-per-token").textContent = `${mean(stepMs).toFixed(2)} ms/token`;
        await yieldToPage();
      },
    });
    window.minrnn.lastRun = { prompt, promptIds, ...options, ...result, text: generated.textContent,
      msPerToken: result.stepMs.length ? mean(result.stepMs) : null };
    status(result.reason === "stopped" ? "stopped" : "done");
  } catch (error) {
    status(`error: ${error.message}`);
    throw error;
  } finally {
    $("generate").disabled = false;
    $("stop").disabled = true;
  }
}

/** Median ms of `steps` greedy steps after reading `context` random tokens from a fresh state, for each context.
 * Untimed steps come first, at least `warmup` and `warmupMs` of them: the browser compiles the hot WASM functions
 * again, optimized, after they have run a while. */
async function benchmark({ contexts = [128, 8192], steps = 16, warmup = 8, warmupMs = 1000, seed = 0 } = {}) {
  const random = seededRandom(seed);
  const rows = [];
  for (const context of contexts) {
    const ids = Array.from({ length: context }, () => Math.floor(random() * model.meta.vocab_size));
    let t0 = performance.now();
    let { logits, state } = await model.forward(ids, model.freshState());
    const contextMs = performance.now() - t0;
    const step = async () => ({ logits, state } = await model.run("decode", [argmax(logits)], state));
    const warmStart = performance.now();
    for (let i = 0; i < warmup || performance.now() - warmStart < warmupMs; i++) await step();
    const stepMs = [];
    for (let i = 0; i < steps; i++) {
      t0 = performance.now();
      await step();
      stepMs.push(performance.now() - t0);
    }
    rows.push({ context, contextMs, msPerToken: median(stepMs), stepMs });
  }
  return { threads: model.threads, crossOriginIsolated, modelBytes: model.modelBytes, rows };
}

async function main() {
  window.minrnn = { benchmark, lastRun: null };
  status("loading");
  model = await ExportedModel.load(folder, { threads });
  window.minrnn.model = model;
  const meta = model.meta;
  const isolation = crossOriginIsolated ? "cross-origin isolated" : "not cross-origin isolated: one thread";
  $("model-info").textContent =
    `${meta.cell_type} · ${meta.num_hidden_layers} layer${meta.num_hidden_layers === 1 ? "" : "s"} · ` +
    `hidden ${meta.hidden_size} · vocab ${meta.vocab_size} · ` +
    `${meta.quantization || "fp32"} · model ${formatBytes(model.modelBytes)} loaded · state ` +
    `${formatBytes(model.stateBytes)} per sequence, whatever the context · WASM, ${threads} thread` +
    `${threads === 1 ? "" : "s"} (${isolation})`;
  $("generate").disabled = false;
  $("generate").addEventListener("click", onGenerate);
  $("stop").addEventListener("click", () => {
    stopRequested = true;
  });
  status("ready");
}

main().catch((error) => {
  status(`error: ${error.message}`);
  $("model-info").textContent = `Could not load ${folder}: ${error.message}`;
  throw error;
});

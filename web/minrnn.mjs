// Run a folder written by `python -m modeling_minrnn.export --format onnx` with onnxruntime-web: the step and prefill
// graphs take the state as `past_*` tensors and return it as `present_*`, which are fed back for the next call.
import * as ort from "./vendor/ort.wasm.min.mjs";
import { Tokenizer } from "./vendor/tokenizers.min.mjs";

const METADATA_FILE = "minrnn_export.json";

async function fetchOk(url, as) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}; is it an exported folder (--format onnx)?`);
  return as === "json" ? response.json() : new Uint8Array(await response.arrayBuffer());
}

/** The model of one exported folder: its tokenizer, its ONNX sessions and the shapes of its state. */
export class ExportedModel {
  /** Load `folderUrl` (ending in "/"); `threads`: WASM threads (more than 1 needs a cross-origin isolated page). */
  static async load(folderUrl, { threads = 1 } = {}) {
    ort.env.wasm.wasmPaths = new URL("./vendor/", import.meta.url).href;
    ort.env.wasm.numThreads = threads;
    const meta = await fetchOk(new URL(METADATA_FILE, folderUrl), "json");
    if (meta.format !== "onnx") throw new Error(`${folderUrl} holds a ${meta.format} export; the page runs ONNX.`);
    const [tokenizerJson, tokenizerConfig] = await Promise.all(
      ["tokenizer.json", "tokenizer_config.json"].map((name) => fetchOk(new URL(name, folderUrl), "json")),
    );
    const graphs = {};
    const sizes = {};
    for (const name of meta.files.filter((file) => file.endsWith(".onnx") || file.endsWith(".onnx.data"))) {
      graphs[name] = await fetchOk(new URL(name, folderUrl));
      sizes[name] = graphs[name].byteLength;
    }
    const dataFiles = Object.keys(graphs).filter((name) => name.endsWith(".data"));
    const options = {
      executionProviders: ["wasm"],
      graphOptimizationLevel: "all",
      // Both graphs read the one weights file: hand each session the same bytes.
      externalData: dataFiles.map((path) => ({ path, data: graphs[path] })),
    };
    const sessions = {};
    for (const [kind, file] of Object.entries(meta.methods)) {
      sessions[kind] = await ort.InferenceSession.create(graphs[file], options);
    }
    return new ExportedModel(meta, new Tokenizer(tokenizerJson, tokenizerConfig), sessions, sizes, threads);
  }

  constructor(meta, tokenizer, sessions, sizes, threads) {
    this.meta = meta;
    this.tokenizer = tokenizer;
    this.sessions = sessions;
    this.sizes = sizes;
    this.threads = threads;
    this.stateSpecs = meta.inputs.slice(1);
  }

  /** Bytes of the graphs and weights loaded. */
  get modelBytes() {
    return Object.values(this.sizes).reduce((a, b) => a + b, 0);
  }

  /** Bytes of one sequence's state: the same after 10 tokens or 10,000. */
  get stateBytes() {
    return this.stateSpecs.reduce((total, spec) => total + 4 * spec.shape.slice(1).reduce((a, b) => a * b, 1), 0);
  }

  /** Zeros for every `past_*` input: a fresh sequence. */
  freshState() {
    const state = {};
    for (const spec of this.stateSpecs) {
      const shape = [1, ...spec.shape.slice(1)];
      state[spec.name] = new ort.Tensor("float32", new Float32Array(shape.reduce((a, b) => a * b, 1)), shape);
    }
    return state;
  }

  async run(kind, ids, state) {
    const inputIds = new ort.Tensor("int64", BigInt64Array.from(ids, (id) => BigInt(id)), [1, ids.length]);
    const outputs = await this.sessions[kind].run({ input_ids: inputIds, ...state });
    const next = {};
    for (const name of Object.keys(state)) next[name] = outputs[name.replace("past_", "present_")];
    const vocab = this.meta.vocab_size;
    return { logits: outputs.logits.data.subarray((ids.length - 1) * vocab, ids.length * vocab), state: next };
  }

  /** Consume `ids` from `state`: whole prefill chunks through the prefill graph, the rest one token at a time.
   * Returns the last token's logits and the state after it. */
  async forward(ids, state) {
    const chunk = this.meta.prefill_length;
    let start = 0;
    let result;
    for (; ids.length - start >= chunk; start += chunk) {
      result = await this.run("prefill", ids.slice(start, start + chunk), result ? result.state : state);
    }
    for (; start < ids.length; start++) {
      result = await this.run("decode", [ids[start]], result ? result.state : state);
    }
    return result;
  }
}

/** The index of the largest logit (the first of equals, as torch.argmax). */
export function argmax(logits) {
  let best = 0;
  for (let i = 1; i < logits.length; i++) if (logits[i] > logits[best]) best = i;
  return best;
}

/** A seeded generator of uniform numbers in [0, 1) (mulberry32), so that a seed repeats a sample. */
export function seededRandom(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Sample from softmax(logits / temperature) restricted to the `topK` largest logits (0: all). */
export function sample(logits, { temperature, topK, random }) {
  let candidates = Array.from(logits.keys());
  if (topK > 0 && topK < logits.length) {
    // The k-th largest value by a numeric sort of a typed copy (fast); all above it, then ties with it up to k.
    const threshold = Float32Array.from(logits).sort()[logits.length - topK];
    const above = candidates.filter((i) => logits[i] > threshold);
    const ties = candidates.filter((i) => logits[i] === threshold);
    candidates = above.concat(ties.slice(0, topK - above.length));
  }
  let max = -Infinity;
  for (const i of candidates) max = Math.max(max, logits[i]);
  const weights = candidates.map((i) => Math.exp((logits[i] - max) / temperature));
  let u = random() * weights.reduce((a, b) => a + b, 0);
  for (let k = 0; k < candidates.length; k++) {
    u -= weights[k];
    if (u < 0) return candidates[k];
  }
  return candidates[candidates.length - 1];
}

/** Generate after `promptIds`, calling `onToken(id, stepMs)` after each new token; stops after `maxNewTokens`, at
 * the end-of-sequence token, or when `shouldStop()` turns true. Greedy unless `doSample`. Returns the new ids, the
 * time of the prompt, the time of each step (one token through the step graph and the choice of the next) and why it
 * stopped ("length", "eos" or "stopped"). */
export async function generate(model, promptIds, { maxNewTokens, doSample = false, temperature = 1, topK = 0,
  seed = 0, onToken = () => {}, shouldStop = () => false }) {
  if (promptIds.length === 0) throw new Error("The prompt is empty: type some text.");
  const random = seededRandom(seed);
  const pick = (logits) => (doSample ? sample(logits, { temperature, topK, random }) : argmax(logits));
  const eos = model.meta.eos_token_id;
  let t0 = performance.now();
  let { logits, state } = await model.forward(promptIds, model.freshState());
  let id = pick(logits);
  const prefillMs = performance.now() - t0;
  const ids = [];
  const stepMs = [];
  while (true) {
    ids.push(id);
    await onToken(id, stepMs);
    if (ids.length >= maxNewTokens || id === eos) {
      return { ids, prefillMs, stepMs, reason: id === eos ? "eos" : "length" };
    }
    if (shouldStop()) return { ids, prefillMs, stepMs, reason: "stopped" };
    t0 = performance.now();
    ({ logits, state } = await model.run("decode", [id], state));
    id = pick(logits);
    stepMs.push(performance.now() - t0);
  }
}

// Vendor the runtime next to the page, so the folder is a static site that works offline (npm only at install).
import { copyFileSync, mkdirSync, rmSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const vendor = join(here, "vendor");
const files = {
  // onnxruntime-web's WASM build: the JS API, and the SIMD + threads runtime it loads (the one WASM file it needs).
  "onnxruntime-web/dist/ort.wasm.min.mjs": "ort.wasm.min.mjs",
  "onnxruntime-web/dist/ort-wasm-simd-threaded.mjs": "ort-wasm-simd-threaded.mjs",
  "onnxruntime-web/dist/ort-wasm-simd-threaded.wasm": "ort-wasm-simd-threaded.wasm",
  "@huggingface/tokenizers/dist/tokenizers.min.mjs": "tokenizers.min.mjs",
};
rmSync(vendor, { recursive: true, force: true });
mkdirSync(vendor);
for (const [source, target] of Object.entries(files)) {
  copyFileSync(join(here, "node_modules", source), join(vendor, target));
}
console.log(`vendored ${Object.keys(files).length} files into ${vendor}`);
